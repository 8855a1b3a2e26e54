"""Where the gate's time goes per reply, against one raw SHA-256 pass over the same payload.

    nice -n 10 python benchmarks/gate_cost.py [--repeats 5] [--models cnn,resnet18]
        [--threads N] [--before-src DIR] [--pipeline]

For the reference app's SmallCNN (~63k parameters) and ResNet-18-style model (~11.2M), all in
one process, medians over the repeats, each stage printed in ms and as a ratio to
`hashlib.sha256` over the outgoing payload (the floor: the ledger must hash every byte):

  decode         protobuf bytes of the reply -> RecordDict -> Array.numpy() per tensor (as
                 decide.py decodes today; copies), and as read-only views (`gate.decode`)
  checks         every float finite, the manifest (names, shapes, dtypes) equal to the global's
  norm           L2 norm of (reply - global), float64 accumulator, in blocks, on every core
  clip           scale into the ball and round to the grid, write the outgoing buffers
  noise          integer Gaussian noise from the AES-256-CTR source, added on the grid
  stage          the whole `noised_update` (norm + clip + noise), what the gate calls
  encode         numpy -> Flower Array -> RecordDict -> protobuf bytes
  ledger         Ledger.append with that payload (hash, blob, fsync, SQLite, signature)

then the noise generator's throughput (samples/s): numpy PCG64DXSM `normal` (float64, the old
gate) against `NoiseSource.integer_gaussian` on one thread and on all.

--pipeline also times `GatePipeline.process_with_evidence` per reply on the 11.2M model, end to
end, for this tree (after) and for --before-src (a source tree of the old gate, e.g. made with
`git archive HEAD src | tar -x -C /tmp/fedgate-before`), each in its own process with its own
SHA-256 baseline. CPU seconds are printed beside wall seconds: on a shared machine the wall
clock of two threads says more about the neighbours than about the code."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 0.01  # the shipped policy: C = 1, z = 0.01
CLIP = 1.0


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and CPU (all threads of this process) seconds of fn()."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def model_arrays(name: str) -> OrderedDict[str, np.ndarray]:
    import torch

    sys.path.insert(0, str(ROOT / "apps" / "medical"))
    from fedgate_medical.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(name, n_classes=2)
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def trained(arrays: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return OrderedDict(
        (k, (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy())
        for k, v in arrays.items()
    )


def content_bytes(arrays: OrderedDict[str, np.ndarray]) -> bytes:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    content = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items())),
            "metrics": MetricRecord({"train-loss": 0.43, "num-examples": 500}),
        }
    )
    return bytes(recorddict_to_proto(content).SerializeToString())


def decode_copies(raw: bytes) -> OrderedDict[str, np.ndarray]:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    record = recorddict_from_proto(ProtoRecordDict.FromString(raw)).array_records["arrays"]
    return OrderedDict((k, a.numpy()) for k, a in record.items())


def decode_views(raw: bytes) -> OrderedDict[str, np.ndarray]:
    """Read-only views over the decoded bytes: the gate's own decoder where it has one."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    record = recorddict_from_proto(ProtoRecordDict.FromString(raw)).array_records["arrays"]
    try:
        from fedgate.gate.decode import decode_array  # type: ignore[attr-defined]
    except ImportError:
        return OrderedDict((k, a.numpy()) for k, a in record.items())
    return OrderedDict((k, decode_array(k, a)) for k, a in record.items())


def checks(base: OrderedDict[str, np.ndarray], reply: OrderedDict[str, np.ndarray]) -> None:
    manifest = [(k, v.shape, str(v.dtype)) for k, v in base.items()]
    if [(k, v.shape, str(v.dtype)) for k, v in reply.items()] != manifest:
        raise AssertionError("manifest")
    hashlib.sha256(json.dumps([[k, list(s), d] for k, s, d in manifest]).encode()).hexdigest()
    for value in reply.values():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise AssertionError("non-finite")


def encode(arrays: OrderedDict[str, np.ndarray]) -> bytes:
    return content_bytes(arrays)


def stage_rows(name: str, repeats: int, threads: int, folder: Path) -> list[tuple[str, float, float]]:
    from fedgate.gate import update as stage
    from fedgate.gate.noise import NoiseSource
    from fedgate.ledger.store import Ledger

    base = model_arrays(name)
    reply = trained(base)
    raw_reply = content_bytes(reply)
    base_views = decode_views(content_bytes(base))
    reply_views = decode_views(raw_reply)
    floats = [k for k, v in base.items() if v.dtype.kind == "f"]
    g = [base_views[k] for k in floats]
    r = [reply_views[k] for k in floats]
    result = stage.noised_update(g, r, CLIP, SIGMA, NoiseSource.from_os_entropy(), threads=threads)
    out = OrderedDict(base_views)
    out.update(zip(floats, result.arrays, strict=True))
    payload = encode(out)
    size = sum(v.size for v in g)

    bases, replies = [np.ravel(a) for a in g], [np.ravel(a) for a in r]
    tasks = stage._tasks([a.size for a in bases])

    def norm_pass() -> None:
        stage._run(tasks, threads, lambda task: stage._block_squares(bases, replies, task, 1.0))

    def clip_only() -> None:
        stage.noised_update(g, r, CLIP, 0.0, NoiseSource.from_os_entropy(), threads=threads)

    def full() -> None:
        stage.noised_update(g, r, CLIP, SIGMA, NoiseSource.from_os_entropy(), threads=threads)

    def sha() -> None:
        hashlib.sha256(payload).digest()

    rows: list[tuple[str, float, float]] = []
    rows.append(("sha256 (payload)", *timed(sha, repeats)))
    rows.append(("decode: Array.numpy()", *timed(lambda: decode_copies(raw_reply), repeats)))
    rows.append(("decode: views", *timed(lambda: decode_views(raw_reply), repeats)))
    rows.append(("checks", *timed(lambda: checks(base_views, reply_views), repeats)))
    t_norm = timed(norm_pass, repeats)
    t_clip = timed(clip_only, repeats)
    t_full = timed(full, repeats)
    rows.append(("norm", *t_norm))
    rows.append(("clip (+ write)", t_clip[0] - t_norm[0], t_clip[1] - t_norm[1]))
    rows.append(("noise", t_full[0] - t_clip[0], t_full[1] - t_clip[1]))
    rows.append(("stage = noised_update", *t_full))
    rows.append(("encode", *timed(lambda: encode(out), repeats)))
    with Ledger(folder / f"ledger-{name}") as ledger:
        ledger.append({"kind": "warm-up"})
        distinct = iter([i.to_bytes(8, "little") + payload[8:] for i in range(repeats)])
        rows.append(
            ("ledger append + fsync", *timed(lambda: ledger.append({"kind": "b"}, {"sent": next(distinct)}), repeats))
        )
    rows.append(("sha256 (payload, again)", *timed(sha, repeats)))
    print(
        f"\n{name}: {size:,} float parameters, payload {len(payload) / 1e6:.1f} MB, {threads} threads, {repeats} runs"
    )
    return rows


def print_rows(rows: list[tuple[str, float, float]]) -> None:
    sha_wall = min(w for n, w, _ in rows if n.startswith("sha256"))
    sha_cpu = min(c for n, _, c in rows if n.startswith("sha256"))
    print(f"  {'stage':26s} {'wall ms':>9s} {'x sha':>7s} {'cpu ms':>9s} {'x sha':>7s}")
    for name, wall, cpu in rows:
        print(f"  {name:26s} {wall * 1e3:9.1f} {wall / sha_wall:7.2f} {cpu * 1e3:9.1f} {cpu / sha_cpu:7.2f}")
    by = {n: (w, c) for n, w, c in rows}
    parts = ["decode: views", "checks", "stage = noised_update", "encode", "ledger append + fsync"]
    wall, cpu = sum(by[p][0] for p in parts), sum(by[p][1] for p in parts)
    print(
        f"  {'gate, composed (sum)':26s} {wall * 1e3:9.1f} {wall / sha_wall:7.2f} {cpu * 1e3:9.1f} {cpu / sha_cpu:7.2f}"
    )


def throughput(repeats: int, threads: int) -> None:
    from fedgate.gate import update as stage
    from fedgate.gate.noise import BLOCK, NoiseSource

    n = 11_168_706
    generator = np.random.Generator(np.random.PCG64DXSM(12345))
    before = timed(lambda: generator.normal(0.0, SIGMA, size=n), repeats)
    blocks = [(b, min(BLOCK, n - b * BLOCK)) for b in range((n + BLOCK - 1) // BLOCK)]
    source = NoiseSource.from_os_entropy()
    source.claim()
    scale = SIGMA * 2.0**19

    def draw(workers: int) -> None:
        def one(block: tuple[int, int]) -> None:
            out = np.empty(BLOCK)
            source.integer_gaussian(0, block[0], block[1], scale, out)

        stage._run(blocks, workers, one)  # type: ignore[arg-type]

    after_1 = timed(lambda: draw(1), repeats)
    after_n = timed(lambda: draw(threads), repeats)
    print(f"\nnoise generator, {n:,} samples (medians of {repeats}; wall / cpu)")
    for label, (wall, cpu) in (
        ("before: numpy PCG64DXSM normal, 1 thread", before),
        ("after: AES-256-CTR rounded Gaussian, 1 thread", after_1),
        (f"after: AES-256-CTR rounded Gaussian, {threads} threads", after_n),
    ):
        print(f"  {label:52s} {n / wall / 1e6:7.1f} M samples/s wall  {n / cpu / 1e6:7.1f} M samples/s per cpu-s")


def pipeline_child(repeats: int) -> None:
    """One process, one source tree (PYTHONPATH): process_with_evidence per reply, and SHA-256."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import fedgate
    from fedgate.gate.pipeline import GatePipeline
    from fedgate.policy import load_policy

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 4242, 1, 1
    base = model_arrays("resnet18")
    reply_arrays = trained(base)

    def record(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))

    content = RecordDict({"arrays": record(base), "config": ConfigRecord({"server-round": 1})})
    instruction = Message(content, dst_node_id=17, message_type="train")
    instruction.metadata.__dict__["_message_id"] = instruction.object_id  # as the Grid does on push
    payload = content_bytes(reply_arrays)
    walls, cpus, shas = [], [], []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        gate = GatePipeline(load_policy(None), Path(tmp) / "hospital-0", "hospital-0", "bench://server")
        for run in range(repeats + 1):  # the first run creates the ledger and records the policy
            metrics = MetricRecord({"train-loss": 0.43, "num-examples": 500})
            reply = Message(RecordDict({"arrays": record(reply_arrays), "metrics": metrics}), reply_to=instruction)
            wall, cpu = time.perf_counter(), time.process_time()
            outcome = gate.process_with_evidence(instruction, reply)  # type: ignore[attr-defined]  # the old API
            if run:
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            if not outcome.decision.sent:
                raise SystemExit(f"refused: {outcome.decision.reason}")
            start = time.perf_counter()
            hashlib.sha256(payload).digest()
            shas.append(time.perf_counter() - start)
        gate.close()
    result = {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "sha": min(shas)}
    print(json.dumps({**result, "mb": len(payload) / 1e6, "fedgate": fedgate.__file__}))


def pipeline(repeats: int, before_src: Path | None) -> None:
    print(f"\nGatePipeline.process_with_evidence, ResNet-18-style model, medians of {repeats} (own process each)")
    trees = [("after (this tree)", ROOT / "src")]
    if before_src is not None:
        trees.insert(0, (f"before ({before_src})", before_src))
    for label, src in trees:
        env = {**os.environ, "PYTHONPATH": str(src)}
        command = [sys.executable, __file__, "--pipeline-child", "--repeats", str(repeats)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"  {label:40s} could not run: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  {label:40s} {got['wall'] * 1e3:8.1f} ms wall ({got['wall'] / got['sha']:5.1f}x sha256), "
            f"{got['cpu'] * 1e3:8.1f} ms cpu; sha256 {got['sha'] * 1e3:.1f} ms over {got['mb']:.1f} MB "
            f"[{got['fedgate']}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pipeline", action="store_true", help="also time GatePipeline end to end")
    parser.add_argument("--before-src", type=Path, default=None, help="source tree of the old gate, for --pipeline")
    parser.add_argument("--pipeline-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        pipeline_child(args.repeats)
        return
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for name in args.models.split(","):
            print_rows(stage_rows(name, args.repeats, args.threads, Path(tmp)))
    throughput(args.repeats, args.threads)
    if args.pipeline:
        pipeline(args.repeats, args.before_src)


if __name__ == "__main__":
    main()
