"""The reference app's speed on one CPU thread (as each simulated hospital runs it): `train` and
`evaluate` as shipped (channels-last tensors, evaluation in batches of 64, the small CNN pooling
before its ReLU) against the same functions with the default layout and evaluation batches of
256, with and without the network's former order (ReLU before pooling), alternating in this
process.

    python benchmarks/app_layout.py [--repeats 5] [--hospital 4]

Prints the median time of one local epoch on a hospital's share (the demo's largest by default,
897 images) and of the server's evaluation of the 600 held-out images, and the ratios of the
shipped app against the app as it was (default layout, ReLU first, batches of 256) and against
each change alone."""

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


def relu_first(model: nn.Module) -> nn.Module:
    """The small CNN as it was: each block's ReLU before its pooling (same parameters)."""
    blocks = list(model.features)  # type: ignore[arg-type]
    model.features = nn.Sequential(
        *[m for i in range(0, len(blocks), 4) for m in (*blocks[i : i + 2], blocks[i + 3], blocks[i + 2])]
    )
    return model


VARIANTS = {  # name: (layout, ReLU before pooling, evaluation batch)
    "shipped": (task.channels_last, False, 64),
    "relu first": (task.channels_last, True, 64),
    "default layout": (default_layout, False, 256),
    "as before": (default_layout, True, 256),
}


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
    times: dict[str, list[float]] = {f"{kind} {name}": [] for name in VARIANTS for kind in ("train", "eval")}
    for repeat in range(args.repeats + 1):  # the first round warms every path and is dropped
        for name, (layout, old_order, eval_batch) in VARIANTS.items():
            task.channels_last = layout  # type: ignore[assignment]
            model = task.new_model(cfg)
            if old_order:
                relu_first(model)
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
        print(f"{name:22s} median {median[name]:.3f} s  ({', '.join(f'{v:.2f}' for v in values)})")
    for kind, what in (("train", f"one epoch on {len(train_set.labels)} images"),
                       ("eval", f"evaluation of {len(test_set.labels)} images")):  # fmt: skip
        ours = median[f"{kind} shipped"]
        print(f"{what}: shipped / as before {ours / median[f'{kind} as before']:.2f}x; pooling first alone "
              f"{ours / median[f'{kind} relu first']:.2f}x; channels-last (and batches of 64) alone "
              f"{ours / median[f'{kind} default layout']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
