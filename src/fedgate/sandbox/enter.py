"""`python -I -B -m fedgate.sandbox.enter LANDLOCK LIMITS_JSON -- CMD ...`: inside the sandbox,
apply the same inner layers a task's worker applies (limits, Landlock), then become CMD.

This is how `fedgate sandbox run` gives an auditor exactly the sandbox a task gets, with a
command of their own: the bubblewrap command line, the seccomp filter and these layers come
from the same code as the worker's."""

from __future__ import annotations

import json
import os
import sys

from fedgate.sandbox.layers import apply_landlock, apply_limits
from fedgate.sandbox.spec import Limits


def main() -> None:
    landlock, limits_json, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        sys.exit("usage: python -m fedgate.sandbox.enter LANDLOCK LIMITS_JSON -- CMD ...")
    raw = json.loads(limits_json)
    limits = Limits(**{k: v for k, v in raw.items() if k != "timeout_s"})
    for layer in (apply_limits(limits), apply_landlock(landlock == "1")):
        state = "established" if layer.established else "NOT established"
        print(f"fedgate sandbox: {layer.layer} {state}: {layer.detail}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
