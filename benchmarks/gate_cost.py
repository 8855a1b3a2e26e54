"""Where the gate's time goes per reply, against one raw SHA-256 pass over the same payload.

    nice -n 10 python benchmarks/gate_cost.py [--repeats 5] [--models cnn,resnet18]
        [--threads N] [--before-src DIR] [--ledger-sizes 100,10000] [--skip-stages]

Everything is timed in one process per source tree, medians of the repeats, wall and CPU
seconds (CPU of all threads of the process) side by side, each as a ratio to
`hashlib.sha256` over the reply's outgoing payload timed in the same process: the floor, as
the ledger must hash every byte. On a shared 2-core machine the wall clock of two threads
says as much about the neighbours as about the code; the load average is printed.

1. End to end (`pipeline`), per model and per tree: `GatePipeline.admit(instruction bytes)`
   then `conclude(admission, AppOutcome(reply bytes))` and the bytes the executor ships
   (`Outcome.wire` where the tree has it, else `message_to_bytes(outcome.message)`), with
   N earlier ledger entries for each N in --ledger-sizes: one gate per N, filled first, then
   the gates take turns reply by reply, each reply followed by its own SHA-256 pass; "x sha"
   is the median of those per-reply ratios (the neighbours' load falls on both alike). Two
   rows per N: "back to back" calls conclude right after admit; "app between" first lets
   what admit starts on threads finish — the instruction's SHA-256 and the reply's noise,
   which depends on the model's size and the policy, not on the reply — untimed: in a
   round the ClientApp runs there for seconds (on a GPU hospital, with the CPU idle). That
   row is the wall clock on the reply's path; the CPU column counts all of it in both rows.
   The release slot's wait (a policy choice, not a cost) is skipped; the policy is the
   shipped one with no budget limit. --before-src is a source tree of another version (e.g.
   `git archive HEAD src | tar -x -C /tmp/fedgate-before`),
   run the same way in its own process.
2. Per stage (`stages`), this tree, same payload: decode (Flower's parse and `Array.numpy()`,
   as before; the gate's `decode_reply`: views), checks (manifest, integer tensors),
   norm, clip (+ write), noise, the whole `noised_update`, encode (Flower's serde, as before;
   `npy_array` + `codec.encode_message`, the slow path a reply held for review or masked by
   SecAgg+ still takes), the fast path (`codec.LaidOutReply`: lay out the reply, then
   `noised_update` writing into it: no encode step at all) and the ledger append with fsync.
3. The noise generator's throughput in samples per second, per tree: numpy PCG64DXSM `normal`
   (the generator before issue 15's first half) and `NoiseSource.integer_gaussian` on one
   thread and on all."""

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
Row = tuple[str, float, float]


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


def messages(name: str) -> tuple[OrderedDict[str, np.ndarray], OrderedDict[str, np.ndarray], Any, bytes, bytes]:
    """(global, trained, instruction Message, instruction bytes, reply bytes) as the executor
    sees them: the SuperLink's instruction and the ClientApp's reply, serialised by Flower."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgate.flower_adapter import make_instruction

    try:
        from fedgate.flower_adapter import flower_message_to_bytes as serialise  # type: ignore[attr-defined]
    except ImportError:  # an older tree: its message_to_bytes is Flower's
        from fedgate.flower_adapter import message_to_bytes as serialise

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 4242, 1, 1
    base = model_arrays(name)
    reply_arrays = trained(base)

    def record(arrays: OrderedDict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))

    content = RecordDict({"arrays": record(base), "config": ConfigRecord({"server-round": 1})})
    instruction = make_instruction(content, "train", dst_node_id=17, run_id=4242)
    metrics = MetricRecord({"train-loss": 0.43, "num-examples": 500})
    reply = Message(RecordDict({"arrays": record(reply_arrays), "metrics": metrics}), reply_to=instruction)
    return base, reply_arrays, instruction, serialise(instruction), serialise(reply)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


# -- 1. end to end -------------------------------------------------------------------------------


def pipeline_child(name: str, repeats: int, sizes: list[int]) -> None:
    """One process, one source tree (PYTHONPATH): admit + conclude + the shipped bytes."""
    import dataclasses

    import fedgate
    import fedgate.gate.pipeline as pipeline_module
    from fedgate.flower_adapter import message_to_bytes
    from fedgate.gate.pipeline import AppOutcome, GatePipeline
    from fedgate.policy import load_policy
    from fedgate.policy.model import ReleasePolicy

    try:
        from fedgate.gate.update import compile_kernels  # type: ignore[attr-defined]
    except ImportError:
        compile_kernels = None
    setup = time.perf_counter()
    if compile_kernels is not None:
        compile_kernels()  # once per process, before the first reply (numba's cache when there is one)
    setup = time.perf_counter() - setup
    waits: list[float] = []

    def skip_wait(at: float) -> None:  # the release slot is a policy choice, not a cost
        waits.append(max(0.0, at - time.time()))

    pipeline_module.wait_until = skip_wait  # type: ignore[assignment]
    _, _, _, raw_instruction, raw_reply = messages(name)
    policy = dataclasses.replace(load_policy(None), release=ReleasePolicy(slot_s=0.001, max_slots=1 << 30),
                                 max_total_bits=0.0)  # fmt: skip
    results: dict[str, Any] = {"tree": fedgate.__file__, "model": name, "reply_mb": len(raw_reply) / 1e6,
                               "compile_s": setup, "load": load_line(), "sizes": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        gates = {size: GatePipeline(policy, Path(tmp) / f"hospital-{size}", "hospital-0", "bench://server")
                 for size in sizes}  # fmt: skip

        def once(gate: Any, app_between: bool = False) -> tuple[int, float, float]:
            """(shipped bytes, wall s without the app's run, CPU s of everything)."""
            wall, cpu = time.perf_counter(), time.process_time()
            admission = gate.admit(raw_instruction)
            waited = time.perf_counter()
            digest, noise = getattr(admission, "digest", None), getattr(admission, "noise", None)
            if app_between:  # the ClientApp runs here: the instruction's hash and the noise end on their threads
                if digest is not None:
                    digest.hexdigest()
                if noise is not None:
                    noise.wait()
            waited = time.perf_counter() - waited
            outcome = gate.conclude(admission, AppOutcome(raw_reply))
            if not outcome.decision.sent:
                raise SystemExit(f"refused: {outcome.decision.reason}")
            wire = getattr(outcome, "wire", None)  # what the executor ships (`outcome.message` is read
            shipped = len(wire if wire is not None else message_to_bytes(outcome.message))  # back from it)
            return shipped, time.perf_counter() - wall - waited, time.process_time() - cpu

        fills: dict[int, float] = {}
        payload = 0
        for size, gate in gates.items():
            payload, _, _ = once(gate)  # records the policy, pins the model, warms every path
            filler = {k: v for k, v in gate.ledger.entries()[-1].items() if k not in ("seq", "time", "payloads")}
            fill = time.perf_counter()
            while _size(gate) < size:
                gate.ledger.append(filler)  # a sent reply's entry, without its payload blob
            fills[size] = time.perf_counter() - fill
        # the ledger sizes take turns, reply by reply, each beside a SHA-256 pass of its own:
        # the neighbours' load falls on all of them alike
        modes = {"back to back": False, "app between": True}
        rows = {(size, mode): {"wall": [], "cpu": [], "sha": [], "sha_cpu": [], "before": []}
                for size in sizes for mode in modes}  # fmt: skip
        for _ in range(repeats):
            for (size, mode), row in rows.items():
                gate = gates[size]
                row["before"].append(_size(gate))
                waits.clear()
                _, wall, cpu = once(gate, modes[mode])
                row["wall"].append(wall)
                row["cpu"].append(cpu)
                start, start_cpu = time.perf_counter(), time.process_time()
                hashlib.sha256(raw_reply).digest()
                row["sha"].append(time.perf_counter() - start)
                row["sha_cpu"].append(time.process_time() - start_cpu)
        for (size, mode), row in rows.items():
            results["sizes"][f"{size} {mode}"] = {
                "mode": mode,
                "entries_before": int(row["before"][0]),
                "wall": statistics.median(row["wall"]),
                "cpu": statistics.median(row["cpu"]),
                "sha": statistics.median(row["sha"]),
                "sha_cpu": statistics.median(row["sha_cpu"]),
                "ratio": statistics.median(w / h for w, h in zip(row["wall"], row["sha"], strict=True)),
                "cpu_ratio": statistics.median(c / h for c, h in zip(row["cpu"], row["sha_cpu"], strict=True)),
                "fill_s": fills[size],
            }
        for gate in gates.values():
            gate.close()
        results["shipped_mb"] = payload / 1e6
    print(json.dumps(results))


def _size(gate: Any) -> int:
    """The ledger's size from its latest signed head (O(1), unlike reading every entry)."""
    try:
        return int(gate.ledger.db.execute("SELECT size FROM tip WHERE id = 0").fetchone()[0])
    except Exception:
        return len(gate.ledger.entries())


def pipeline(models: list[str], repeats: int, sizes: list[int], before_src: Path | None) -> None:
    trees: list[tuple[str, Path]] = [("after", ROOT / "src")]
    if before_src is not None:
        trees.insert(0, ("before", before_src))
    print(f"\n1. end to end: admit + conclude + the shipped bytes, medians of {repeats}, {load_line()}")
    print(f"  {'tree':8s} {'model':9s} {'earlier':>8s} {'':13s} {'wall ms':>9s} {'x sha':>6s} {'cpu ms':>8s} "
          f"{'x sha':>6s} {'sha ms':>7s}")  # fmt: skip
    for label, src in trees:
        for name in models:
            env = {**os.environ, "PYTHONPATH": str(src)}
            command = [sys.executable, __file__, "--pipeline-child", name, "--repeats", str(repeats),
                       "--ledger-sizes", ",".join(map(str, sizes))]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"  {label:8s} {name:9s} could not run: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            for row in got["sizes"].values():
                print(
                    f"  {label:8s} {name:9s} {row['entries_before']:>8d} {row['mode']:13s} {row['wall'] * 1e3:9.1f} "
                    f"{row['ratio']:6.2f} {row['cpu'] * 1e3:8.1f} {row['cpu_ratio']:6.2f} "
                    f"{row['sha'] * 1e3:7.1f}   (fill {row['fill_s']:.0f} s)"
                )
            print(f"  {'':8s} {name:9s} reply {got['reply_mb']:.1f} MB, shipped {got['shipped_mb']:.1f} MB, "
                  f"kernels ready in {got['compile_s']:.2f} s, {got['load']}")  # fmt: skip


# -- 2. per stage ----------------------------------------------------------------------------------


def stage_rows(name: str, repeats: int, threads: int, folder: Path) -> tuple[list[Row], int, int]:
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    from fedgate.flower_adapter import flower_message_to_bytes, make_reply
    from fedgate.gate import codec, rules
    from fedgate.gate import update as stage
    from fedgate.gate.decode import decode_instruction, decode_reply
    from fedgate.gate.noise import NoiseSource
    from fedgate.ledger.store import Ledger

    stage.compile_kernels()
    _, _, _, raw_instruction, raw_reply = messages(name)
    instruction = decode_instruction(raw_instruction, ("train",))
    reply = decode_reply(raw_reply, instruction)
    floats = [k for k, v in instruction.model.items() if v.dtype.kind == "f"]
    g = [instruction.model[k] for k in floats]
    r = [reply.arrays[k] for k in floats]
    result = stage.noised_update(g, r, CLIP, SIGMA, NoiseSource.from_os_entropy(), threads=threads)
    model = OrderedDict(instruction.model)
    model.update(zip(floats, result.arrays, strict=True))

    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    def content(array: Callable[[np.ndarray], Any]) -> RecordDict:
        record = ArrayRecord(OrderedDict((n, array(np.ascontiguousarray(v))) for n, v in model.items()))
        return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 500})})

    outgoing = make_reply(instruction.message, time.time(), content(codec.npy_array), None)
    wire, span = codec.encode_message(outgoing)
    payload = memoryview(wire)[span]

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

    def decode_before() -> None:
        message = message_from_proto(ProtoMessage.FromString(raw_reply))
        [a.numpy() for a in message.content.array_records["arrays"].values()]

    def encode_before() -> None:
        flower_message_to_bytes(make_reply(instruction.message, time.time(), content(Array), None))

    def encode_after() -> None:
        codec.encode_message(make_reply(instruction.message, time.time(), content(codec.npy_array), None))

    rows: list[Row] = [("sha256 (payload)", *timed(sha, repeats))]
    rows.append(("decode: Flower + .numpy()", *timed(decode_before, repeats)))
    rows.append(("decode: codec views", *timed(lambda: decode_reply(raw_reply, instruction), repeats)))
    rows.append(("checks", *timed(lambda: (rules.check_manifest(instruction, reply),
                                           rules.check_values(instruction, reply)), repeats)))  # fmt: skip
    t_norm = timed(norm_pass, repeats)
    t_clip = timed(clip_only, repeats)
    t_full = timed(full, repeats)
    rows.append(("norm", *t_norm))
    rows.append(("clip (+ write)", t_clip[0] - t_norm[0], t_clip[1] - t_norm[1]))
    rows.append(("noise", t_full[0] - t_clip[0], t_full[1] - t_clip[1]))
    rows.append(("stage = noised_update", *t_full))
    rows.append(("encode: Flower serde", *timed(encode_before, max(1, repeats // 2))))
    rows.append(("encode: npy_array + codec", *timed(encode_after, repeats)))  # the slow path
    rows.append(("  of which encode_message", *timed(lambda: codec.encode_message(outgoing), repeats)))
    specs = [(n, v.dtype, tuple(v.shape)) for n, v in instruction.model.items()]
    rows.append(("fast path: lay out", *timed(lambda: codec.LaidOutReply("arrays", specs, 4096), repeats)))

    def noise_into_wire() -> None:
        laid = codec.LaidOutReply("arrays", specs, 4096)
        into = dict(zip(instruction.model, laid.arrays, strict=True))
        stage.noised_update(g, r, CLIP, SIGMA, NoiseSource.from_os_entropy(), threads=threads,
                            out=[into[k] for k in floats])  # fmt: skip

    rows.append(("fast path: + noised_update", *timed(noise_into_wire, repeats)))
    with Ledger(folder / f"ledger-{name}") as ledger:
        ledger.append({"kind": "warm-up"})
        distinct = iter([i.to_bytes(8, "little") + bytes(payload[8:]) for i in range(repeats)])
        rows.append(("ledger append + fsync",
                     *timed(lambda: ledger.append({"kind": "b"}, {"sent": next(distinct)}), repeats)))  # fmt: skip
    rows.append(("sha256 (payload, again)", *timed(sha, repeats)))
    return rows, sum(v.size for v in g), len(payload)


def print_rows(name: str, rows: list[Row], size: int, payload: int, threads: int, repeats: int) -> None:
    print(f"\n2. {name}: {size:,} float parameters, payload {payload / 1e6:.1f} MB, {threads} threads, "
          f"medians of {repeats}, {load_line()}")  # fmt: skip
    sha_wall = min(w for n, w, _ in rows if n.startswith("sha256"))
    sha_cpu = min(c for n, _, c in rows if n.startswith("sha256"))
    print(f"  {'stage':28s} {'wall ms':>9s} {'x sha':>7s} {'cpu ms':>9s} {'x sha':>7s}")
    for label, wall, cpu in rows:
        print(f"  {label:28s} {wall * 1e3:9.1f} {wall / sha_wall:7.2f} {cpu * 1e3:9.1f} {cpu / sha_cpu:7.2f}")


# -- 3. the noise generator ----------------------------------------------------------------------


def throughput_child(repeats: int, threads: int) -> None:
    from fedgate.gate import update as stage
    from fedgate.gate.noise import BLOCK, NoiseSource

    try:
        from fedgate.gate.noise import compile_kernels  # type: ignore[attr-defined]

        compile_kernels()
    except ImportError:
        pass
    n = 11_168_706
    generator = np.random.Generator(np.random.PCG64DXSM(12345))
    numpy_normal = timed(lambda: generator.normal(0.0, SIGMA, size=n), repeats)
    blocks = [(b, min(BLOCK, n - b * BLOCK)) for b in range((n + BLOCK - 1) // BLOCK)]
    source = NoiseSource.from_os_entropy()
    source.claim()
    scale = SIGMA * 2.0**19

    def draw(workers: int) -> None:
        def one(block: tuple[int, int]) -> None:
            out = np.empty(BLOCK)
            source.integer_gaussian(0, block[0], block[1], scale, out)

        stage._run(blocks, workers, one)  # type: ignore[arg-type]

    one_thread = timed(lambda: draw(1), repeats)
    all_threads = timed(lambda: draw(threads), repeats)
    print(json.dumps({"n": n, "numpy": numpy_normal, "one": one_thread, "all": all_threads, "threads": threads}))


def throughput(repeats: int, threads: int, before_src: Path | None) -> None:
    print(f"\n3. noise generator, 11,168,706 samples, medians of {repeats}, {load_line()}")
    trees = [("after", ROOT / "src")]
    if before_src is not None:
        trees.insert(0, ("before", before_src))
    for label, src in trees:
        env = {**os.environ, "PYTHONPATH": str(src)}
        command = [sys.executable, __file__, "--throughput-child", "--repeats", str(repeats),
                   "--threads", str(threads)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"  {label}: could not run: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        got = json.loads(done.stdout.strip().splitlines()[-1])
        n = got["n"]
        rows = [("numpy PCG64DXSM normal (not cryptographic), 1 thread", got["numpy"]),
                ("AES-256-CTR rounded Gaussian, 1 thread", got["one"]),
                (f"AES-256-CTR rounded Gaussian, {got['threads']} threads", got["all"])]  # fmt: skip
        for what, (wall, cpu) in rows:
            print(f"  {label:6s} {what:54s} {n / wall / 1e6:7.1f} M/s wall {n / cpu / 1e6:7.1f} M/s per cpu-s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--ledger-sizes", default="100,10000", help="earlier ledger entries to measure after")
    parser.add_argument("--before-src", type=Path, default=None, help="source tree of another version")
    parser.add_argument("--skip-stages", action="store_true", help="only the end-to-end and noise sections")
    parser.add_argument("--pipeline-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--throughput-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.ledger_sizes.split(",") if s]
    if args.pipeline_child:
        pipeline_child(args.pipeline_child, args.repeats, sizes)
        return
    if args.throughput_child:
        throughput_child(args.repeats, args.threads)
        return
    models = args.models.split(",")
    pipeline(models, args.repeats, sizes, args.before_src)
    if not args.skip_stages:
        with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
            for name in models:
                rows, size, payload = stage_rows(name, args.repeats, args.threads, Path(tmp))
                print_rows(name, rows, size, payload, args.threads, args.repeats)
    throughput(args.repeats, args.threads, args.before_src)


if __name__ == "__main__":
    main()
