"""The reference app's tensor layout on one CPU thread (as each simulated hospital runs it):
`train` and `evaluate` as shipped (channels-last, evaluation in batches of 64) against the same
functions with the default layout and the former evaluation batch of 256, alternating in this
process.

    python benchmarks/app_layout.py [--repeats 5] [--hospital 4]

Prints the median time of one local epoch on a hospital's share (the demo's largest by
default, 897 images) and of the server's evaluation of the 600 held-out images, and the
ratios shipped / baseline."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FEDGATE_CACHE", str(Path(tempfile.gettempdir()) / "fedgate-bench-cache"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "medical"))

import torch
from torch import nn

from fedgate_medical import task


@contextlib.contextmanager
def default_layout(model: nn.Module) -> Iterator[nn.Module]:
    yield model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hospital", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = task.AppConfig()
    train_set, _ = task.hospital_data(cfg, args.hospital, 5)
    test_set = task.global_test_data(cfg, 5)
    shipped = task.channels_last
    times: dict[str, list[float]] = {"train shipped": [], "train baseline": [], "eval shipped": [], "eval baseline": []}
    for repeat in range(args.repeats + 1):  # the first round warms both paths and is dropped
        for name, layout, eval_batch in (("shipped", shipped, 64), ("baseline", default_layout, 256)):
            task.channels_last = layout  # type: ignore[assignment]
            model = task.new_model(cfg)
            started = time.perf_counter()
            task.train(model, train_set, epochs=1, lr=cfg.lr, batch_size=32, seed=repeat)
            trained = time.perf_counter()
            task.evaluate(model, test_set, batch_size=eval_batch)
            if repeat:
                times[f"train {name}"].append(trained - started)
                times[f"eval {name}"].append(time.perf_counter() - trained)
    task.channels_last = shipped  # type: ignore[assignment]
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:15s} median {median[name]:.3f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    train_ratio = median["train shipped"] / median["train baseline"]
    eval_ratio = median["eval shipped"] / median["eval baseline"]
    print(f"one epoch on {len(train_set.labels)} images: shipped / baseline {train_ratio:.2f}x")
    print(f"evaluation of {len(test_set.labels)} images: shipped / baseline {eval_ratio:.2f}x")


if __name__ == "__main__":
    main()
