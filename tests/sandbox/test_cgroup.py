"""The cgroup v2 path of the sandbox's whole-tree limits, against a cgroup file system laid out
in a temporary folder (this CI host runs cgroup v1/hybrid, so the kernel's own files cannot be
used here): what a node with a delegated subtree (`Delegate=yes`, docs/deploy.md) writes, and
that it does nothing where no subtree is delegated."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgate.sandbox.cgroup import TreeCgroup, delegated_parent
from fedgate.sandbox.spec import Limits


def own_cgroup(root: Path) -> Path:
    """Where `/proc/self/cgroup` says this process lives, under `root`."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    pytest.fail("this kernel lists no cgroup v2 line for the process")  # every kernel since 4.5 does


def delegated(root: Path, controllers: str = "cpu memory pids io", writable: bool = True) -> Path:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")  # marks the unified hierarchy
    own = own_cgroup(root)
    own.mkdir(parents=True, exist_ok=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.procs").write_text("101\n102\n")
    if writable:  # absent: not delegated to this user (root passes any mode check, so no chmod here)
        (own / "cgroup.subtree_control").write_text("")
    return own


def test_a_delegated_subtree_gets_a_node_leaf_and_a_limited_cgroup_per_sandbox(tmp_path: Path) -> None:
    own = delegated(tmp_path)
    limits = Limits(memory_mb=512, processes=64, cpu_seconds=30)
    cgroup = TreeCgroup.create(limits, "fedgate-1", root=tmp_path)
    assert cgroup is not None and cgroup.path == own / "sandbox-fedgate-1"
    # cgroup v2 allows no process in a cgroup whose controllers are enabled for its children:
    # the node's processes move to a leaf of their own, then the controllers are enabled
    assert (own / "node" / "cgroup.procs").read_text() == "102"  # each pid written in turn (the kernel appends)
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (cgroup.path / "memory.max").read_text() == str(512 << 20)
    assert (cgroup.path / "memory.swap.max").read_text() == "0"
    assert (cgroup.path / "pids.max").read_text() == "64"
    assert (cgroup.path / "cpu.max").read_text() == "100000 100000"
    cgroup.adopt([4242])
    assert (cgroup.path / "cgroup.procs").read_text() == "4242"
    assert "cgroup v2" in cgroup.describe() and "pids.max 64" in cgroup.describe()
    (cgroup.path / "cgroup.procs").unlink()
    for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max"):
        (cgroup.path / name).unlink()
    cgroup.remove()  # writes cgroup.kill (every process of the tree), then removes the folder
    assert (cgroup.path / "cgroup.kill").read_text() == "1"


def test_finding_the_delegated_parent_again_changes_nothing(tmp_path: Path) -> None:
    own = delegated(tmp_path)
    assert delegated_parent(tmp_path) == own
    assert delegated_parent(tmp_path) == own  # a second sandbox: the same parent
    assert sorted(p.name for p in own.iterdir() if p.is_dir()) == ["node"]


@pytest.mark.parametrize(
    ("controllers", "writable", "unified"),
    [("memory pids", True, True), ("cpu memory pids", False, True), ("cpu memory pids", True, False)],
    ids=["a controller missing", "subtree not delegated", "cgroup v1 or hybrid"],
)
def test_without_a_delegated_subtree_the_sandbox_falls_back(
    tmp_path: Path, controllers: str, writable: bool, unified: bool
) -> None:
    """Then no cgroup is made (None), and the runner records its fallback: RLIMIT_NPROC in the
    user namespace, tmpfs sizes and its monitor (tests/sandbox/test_sandbox.py)."""
    delegated(tmp_path, controllers, writable)
    if not unified:
        (tmp_path / "cgroup.controllers").unlink()
    assert TreeCgroup.create(Limits(), "fedgate-2", root=tmp_path) is None
    assert not any(p.name.startswith("sandbox-") for p in tmp_path.rglob("*"))
