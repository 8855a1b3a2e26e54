"""The sandbox, tried as an attacker would: every escape attempt in fedgate's own suite fails
inside and works outside (so the check could fail), with and without Landlock; from outside,
the host sees no connection, no changed file, no leftover process; a task that times out,
crashes or writes garbage ends the sandbox and is answered with a rule, and the next task
gets a fresh sandbox that reads nothing of the old one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, RecordDict

from conftest import instruction
from fedgate.flower_adapter import context_to_bytes, message_from_bytes, message_to_bytes
from fedgate.sandbox import procs
from fedgate.sandbox.check import CHECK_LIMITS, run_check
from fedgate.sandbox.runner import AppRef, SandboxRefused, SandboxWorker
from fedgate.sandbox.spec import Limits, SandboxSpec

TESTS = Path(__file__).resolve().parents[1]
MUST_WORK_OUTSIDE = ("tcp-loopback", "unix-pathname", "socketpair-sendto", "io-uring", "sysv-shm", "write-data",
                     "chmod-data", "read-secret", "signal-node", "node-environ")  # fmt: skip


@pytest.fixture(scope="module", params=[True, False], ids=["landlock", "no-landlock"])
def check(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return run_check(tmp_path_factory.mktemp("check"), landlock=request.param)


def test_every_layer_is_established_and_seen_from_outside(check: Any) -> None:
    layers = {layer["layer"]: layer for layer in check.isolation.layers}
    for name in ("namespaces", "privileges", "seccomp", "limits", "network", "mounts", "descriptors"):
        assert layers[name]["established"], layers[name]
    assert "host uid 0" not in layers["privileges"]["detail"]
    assert check.isolation.enforced


def test_every_escape_is_held_inside(check: Any) -> None:
    escaped = [(row.name, row.inside, row.detail) for row in check.rows if not row.held]
    assert not escaped, escaped
    assert {row.group for row in check.rows} >= {"network", "ipc", "files", "processes", "kernel", "terminal", "limits"}
    assert check.all_held


def test_the_same_attempts_work_outside(check: Any) -> None:
    """Without the sandbox the attempts succeed: the "held" above is the sandbox's doing."""
    outside = {row.name: row.outside for row in check.rows}
    for name in MUST_WORK_OUTSIDE:
        assert outside[name] == "worked", (name, outside[name])


def test_the_limits_hold_for_the_whole_tree(check: Any) -> None:
    rows = {row.name: row for row in check.rows}
    assert "fork failed after" in rows["fork-bomb"].detail
    assert "No space left" in rows["disk-bomb-scratch"].detail and "No space left" in rows["disk-bomb-shm"].detail
    assert "memory" in rows["memory-bomb"].detail  # the sum over processes, each under its own rlimit
    assert rows["nothing-outlives"].held


# -- lifetime and protocol ---------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "scan-0.png").write_bytes(b"pixels")
    yield {"tmp": tmp_path, "data": data}


def _worker(world: dict[str, Any], timeout_s: float = 60) -> SandboxWorker:
    limits = Limits(**{**CHECK_LIMITS.__dict__, "timeout_s": timeout_s})
    spec = SandboxSpec(read_only=(), data_dir=world["data"], cache_seed=world["tmp"] / "cache", limits=limits)
    return SandboxWorker(spec, AppRef("sandbox_apps:app", (TESTS,)), world["tmp"] / "sandbox.log")


def _task(worker: SandboxWorker, behaviour: str, timeout_s: float | None = None, **config: object) -> Any:
    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(),
                      run_config={"behaviour": behaviour, **config})  # fmt: skip
    return worker.run(message_to_bytes(instruction()), context_to_bytes(context), timeout_s)


def test_a_timed_out_task_ends_its_sandbox_and_the_next_task_reads_nothing_of_it(world: dict[str, Any]) -> None:
    worker = _worker(world)
    worker.start()
    try:
        first_pid = worker.worker_pid
        late = _task(worker, "sleep", timeout_s=2, **{"sleep-s": 4})
        assert late.reply is None and late.rule == "sandbox-timeout"
        assert not worker.alive  # the whole sandbox is gone, with the task's pipes
        worker.start()
        assert worker.worker_pid != first_pid
        answer = _task(worker, "honest")
        assert answer.ok and answer.reply is not None
        assert "pid" in message_from_bytes(answer.reply).content["metrics"]
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("behaviour", "rule"),
    [("garbage", "sandbox-protocol"), ("huge-frame", "sandbox-protocol"), ("wrong-keys", "sandbox-protocol"),
     ("crash", "client-error"), ("exit", "sandbox-protocol")],
)  # fmt: skip
def test_a_bad_answer_is_a_rule_not_a_crash(world: dict[str, Any], behaviour: str, rule: str) -> None:
    with _worker(world) as worker:
        outcome = _task(worker, behaviour)
        assert outcome.reply is None and outcome.rule == rule, (outcome.rule, outcome.error)
        if rule == "client-error":
            assert "ValueError" in outcome.error
            assert worker.alive  # the app's own exception: its task's child is gone, the sandbox stays
        else:
            assert not worker.alive  # a broken answer ends the whole sandbox
            worker.start()
        assert _task(worker, "honest").ok


def test_a_daemon_does_not_outlive_its_task(world: dict[str, Any]) -> None:
    with _worker(world) as worker:
        assert _task(worker, "daemon").ok
        assert worker.worker_pid is not None and procs.descendants(worker.worker_pid) == []


def test_each_task_is_a_fresh_process_and_state_comes_only_through_the_context(world: dict[str, Any]) -> None:
    with _worker(world) as worker:
        pids = set()
        for _ in range(3):
            outcome = _task(worker, "count")
            metrics = message_from_bytes(outcome.reply).content["metrics"]
            pids.add(metrics["pid"])
        assert len(pids) == 3


def test_the_kept_cache_comes_back_to_the_next_sandbox_as_plain_files(world: dict[str, Any]) -> None:
    with _worker(world) as worker:
        assert _task(worker, "fill-cache").ok
    kept = world["tmp"] / "cache"
    assert (kept / "decoded.bin").read_bytes() == b"x" * 1000
    assert not (kept / "link").exists() and (kept / "tool").stat().st_mode & 0o7777 == 0o644
    with _worker(world) as worker:  # a fresh sandbox (the node's next task) finds it in /cache
        outcome = _task(worker, "read-cache")
        assert message_from_bytes(outcome.reply).content["metrics"]["size"] == 1000


def test_scratch_does_not_outlive_its_task(world: dict[str, Any]) -> None:
    with _worker(world) as worker:
        assert _task(worker, "leave-scratch").ok
        outcome = _task(worker, "find-scratch")
        assert message_from_bytes(outcome.reply).content["metrics"]["found"] == 0


def test_output_goes_to_the_task_log_not_the_node(world: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    with _worker(world) as worker:
        _task(worker, "crash")
    out, err = capfd.readouterr()
    assert "a bug in the research team's code" not in out + err
    assert "a bug in the research team's code" in (world["tmp"] / "sandbox.log").read_text()


def test_without_bubblewrap_the_code_is_refused_unless_a_downgrade_is_allowed(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("fedgate.sandbox.bwrap.os.access", lambda *a: False)
    with pytest.raises(SandboxRefused, match="bubblewrap"):
        _worker(world).start()
    worker = _worker(world)
    worker.allow_downgrade = True
    try:
        isolation = worker.start()
        assert not isolation.enforced and "namespaces" in isolation.downgraded
        assert _task(worker, "honest").ok  # it ran, and the downgrade is on record
    finally:
        worker.stop()
    assert os.environ["PATH"] == "/nonexistent"
