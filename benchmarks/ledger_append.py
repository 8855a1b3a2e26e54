"""Appending an 11M-parameter float32 model (about 45 MB) to the ledger, against raw SHA-256.

    python benchmarks/ledger_append.py [--repeats 5] [--mb 44.7] [--history 100,10000]

Reports, as medians over the repeats, in one process (these machines are noisy):
  - raw:     hashlib.sha256 over the payload bytes (the floor: the ledger must hash them once)
  - append:  Ledger.append with that payload (hash + blob write + fsync of file and folder
             + SQLite WAL commit with synchronous=FULL + tree head signature)
  - disk:    write + fsync of the same bytes to a plain file (what the disk alone costs),
             and an fsync of 1 MiB
and the throughput ratios raw/append and disk/append. Target: append >= 0.8x raw sha256.

Then the cost of one small append (no payload) after 100 and after 10,000 earlier entries:
it should be flat, since an append checks the latest signed head against the compact range
(O(log n)) and never re-reads earlier leaves. The history is written with synchronous=OFF
(only to build it quickly); the timed appends run with synchronous=FULL, as in production."""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from fedgate.ledger.store import CHUNK, Ledger


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def append_after(history: int, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process) of one small append to a ledger
    that already holds `history` entries. CPU time leaves out the fsync waits, which on a
    shared disk vary more than the work itself."""
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp, Ledger(Path(tmp) / "ledger") as ledger:
        ledger.db.execute("PRAGMA synchronous=OFF")
        for index in range(history):
            ledger.append({"kind": "history", "index": index})
        ledger.db.execute("PRAGMA synchronous=FULL")
        wall, cpu = [], []
        for index in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            ledger.append({"kind": "timed", "index": index})
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--mb", type=float, default=11_168_706 * 4 / 1e6, help="payload size in MB (default: ResNet-18)"
    )
    parser.add_argument("--history", default="100,10000", help="earlier entries before the small appends")
    parser.add_argument("--small-repeats", type=int, default=50)
    args = parser.parse_args()
    payload = os.urandom(int(args.mb * 1e6))
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        folder = Path(tmp)
        with Ledger(folder / "ledger") as ledger:
            ledger.append({"kind": "warm-up"})  # key creation and schema are not the steady state
            # A distinct payload each time, as each round's model differs (no dedup shortcut);
            # built before timing so that only the append is measured.
            distinct = iter([index.to_bytes(8, "little") + payload[8:] for index in range(args.repeats)])

            def append() -> None:
                ledger.append({"kind": "benchmark"}, {"sent": next(distinct)})

            def raw() -> None:
                hashlib.sha256(payload).digest()

            def write_fsync() -> None:
                view = memoryview(payload)
                with open(folder / "plain.bin", "wb", buffering=0) as handle:
                    for start in range(0, len(view), CHUNK):
                        handle.write(view[start : start + CHUNK])
                    os.fsync(handle.fileno())

            def fsync_only() -> None:
                with open(folder / "plain.bin", "rb+", buffering=0) as handle:
                    handle.write(payload[:CHUNK])  # dirty one chunk again, as an append's rename needs
                    os.fsync(handle.fileno())

            t_raw = timed(raw, args.repeats)
            t_append = timed(append, args.repeats)
            t_disk = timed(write_fsync, args.repeats)
            t_fsync = timed(fsync_only, args.repeats)
            t_raw_after = timed(raw, args.repeats)  # the baseline again, to see drift
    mb = len(payload) / 1e6
    raw_best = min(t_raw, t_raw_after)
    print(f"payload {mb:.1f} MB, {args.repeats} repeats, medians")
    print(f"raw sha256        {raw_best * 1e3:8.1f} ms  {mb / raw_best:8.0f} MB/s")
    print(f"ledger append     {t_append * 1e3:8.1f} ms  {mb / t_append:8.0f} MB/s")
    print(f"write + fsync     {t_disk * 1e3:8.1f} ms  {mb / t_disk:8.0f} MB/s  (plain file, same chunking)")
    print(f"fsync of 1 MiB    {t_fsync * 1e3:8.1f} ms")
    print(f"ratio append / raw sha256 (throughput): {raw_best / t_append:.2f}x   (target >= 0.8x)")
    print(f"ratio append / plain write + fsync:     {t_disk / t_append:.2f}x")
    sizes = [int(x) for x in args.history.split(",") if x]
    small = {n: append_after(n, args.small_repeats) for n in sizes}
    for n, (wall, cpu) in small.items():
        print(
            f"small append after {n:>7,} entries  {wall * 1e3:8.2f} ms wall  {cpu * 1e3:6.2f} ms CPU"
            f"  (medians of {args.small_repeats})"
        )
    if len(sizes) >= 2:
        (wall_a, cpu_a), (wall_b, cpu_b) = small[sizes[0]], small[sizes[-1]]
        print(
            f"ratio small append {sizes[-1]:,} / {sizes[0]:,} entries: {wall_b / wall_a:.2f}x wall, "
            f"{cpu_b / cpu_a:.2f}x CPU  (flat: ~1x)"
        )


if __name__ == "__main__":
    main()
