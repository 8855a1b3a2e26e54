"""The sandboxed child: establish every isolation layer, report them, then (if the parent
says so) load the ClientApp and answer one message. Run as `python -m fedgate.sandbox.child
IN_FD OUT_FD`; everything it needs from fedgate and Flower is imported before the layers
close the file system."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedgate.executor.loading import load_client_app
from fedgate.sandbox.layers import LayerResult, Limits, apply_landlock, apply_limits, apply_seccomp, enter_namespaces
from fedgate.sandbox.wire import recv_bytes, recv_json, send_bytes, send_json


def readable_system_paths() -> list[Path]:
    """What Python, NumPy and torch need to start: the interpreter, its libraries, this
    process's own /proc entry and CPU topology. Not /etc (no name resolution files), not
    other processes' /proc entries, not the hospital's folders."""
    paths = [Path(p) for p in ("/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", "/dev/urandom", "/dev/zero")]
    paths += [Path(p) for p in ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/sys/devices/system/cpu")]
    paths += [Path(f"/proc/{os.getpid()}")]
    paths += [
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        Path(os.path.realpath(sys.executable)).parent,
    ]
    paths += [Path(p) for p in sys.path if p and Path(p).resolve() != Path.cwd().resolve()]
    return paths


def establish(header: dict[str, object]) -> list[LayerResult]:
    limits = Limits(**header["limits"])  # type: ignore[arg-type]
    read_only = [*readable_system_paths(), Path(str(header["app_dir"])), Path(str(header["data_dir"]))]
    read_write = [*(Path(str(p)) for p in header["scratch_dirs"]), Path("/dev/null")]  # type: ignore[attr-defined]
    steps: list[tuple[str, Callable[[], LayerResult]]] = [
        ("limits", lambda: apply_limits(limits)),
        ("network-namespace", enter_namespaces),
        ("landlock", lambda: apply_landlock(read_only, read_write)),
        ("seccomp", apply_seccomp),  # last: it denies the syscalls the layers above were set up with
    ]
    results = []
    for name, step in steps:
        try:
            results.append(step())
        except Exception as err:  # a layer that cannot be set up is reported, not fatal
            results.append(LayerResult(name, False, f"{type(err).__name__}: {err}"))
    return results


def main() -> None:
    fd_in, fd_out = int(sys.argv[1]), int(sys.argv[2])
    header = recv_json(fd_in)
    layers = establish(header)
    send_json(fd_out, {"isolation": [layer.to_json() for layer in layers]})
    if not recv_json(fd_in).get("run"):
        return
    message = message_from_proto(ProtoMessage.FromString(recv_bytes(fd_in)))
    message.metadata.__dict__["_message_id"] = str(header["message_id"])
    context = context_from_proto(ProtoContext.FromString(recv_bytes(fd_in)))
    try:
        sys.path.insert(0, str(header["app_dir"]))
        app = load_client_app(str(header["app_ref"]))
        reply = app(message, context)
    except BaseException as err:  # everything the app does wrong is reported, never raised past here
        send_json(
            fd_out, {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-4000:]}
        )
        return
    send_json(fd_out, {"ok": True})
    send_bytes(fd_out, message_to_proto(reply).SerializeToString())
    send_bytes(fd_out, context_to_proto(context).SerializeToString())


if __name__ == "__main__":
    main()
