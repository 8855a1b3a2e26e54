"""Limits on the whole sandbox tree with a cgroup v2 subtree, when the node has one delegated.

A systemd unit with `Delegate=yes` gives the node its own cgroup subtree (docs/deploy.md).
The node's own processes must then live in a leaf (cgroup v2 allows no processes in a
cgroup whose controllers are enabled for children), so we move the node into `node/` once
and give each sandbox a sibling `sandbox-*/` with memory.max, memory.swap.max, pids.max and
cpu.max. Without a delegated subtree (a plain shell, cgroup v1 or hybrid hosts) `create`
returns None and the sandbox relies on RLIMIT_NPROC inside its user namespace, the tmpfs
sizes and the runner's monitor; the ledger says which."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from fedgate.sandbox.spec import Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")
NEEDED = {"memory", "pids", "cpu"}


def _own_cgroup(root: Path = CGROUP_ROOT) -> Path | None:
    """This process's cgroup v2 folder, when the host runs the unified hierarchy."""
    if not (root / "cgroup.controllers").is_file():
        return None  # cgroup v1 or hybrid
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / line[3:].lstrip("/")
    except OSError:
        return None
    return None


def delegated_parent(root: Path = CGROUP_ROOT) -> Path | None:
    """The folder under which sandbox cgroups can be made, or None."""
    own = _own_cgroup(root)
    if own is None:
        return None
    parent = own.parent if own.name == "node" else own
    try:
        available = set((parent / "cgroup.controllers").read_text().split())
    except OSError:
        return None
    if not available >= NEEDED or not os.access(parent / "cgroup.subtree_control", os.W_OK):
        return None
    if own.name != "node":  # leave the parent's process list empty, as cgroup v2 requires
        leaf = parent / "node"
        try:
            leaf.mkdir(exist_ok=True)
            for pid in (parent / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.procs").write_text(pid)
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(NEEDED)))
        except OSError:
            return None
    return parent


class TreeCgroup:
    """One sandbox's cgroup; every process of the sandbox is moved in before any task runs."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits

    @classmethod
    def create(cls, limits: Limits, name: str, root: Path = CGROUP_ROOT) -> TreeCgroup | None:
        parent = delegated_parent(root)
        if parent is None:
            return None
        path = parent / f"sandbox-{name}"
        try:
            path.mkdir()
            (path / "memory.max").write_text(str(limits.memory_mb << 20))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (path / "memory.swap.max").write_text("0")
            (path / "pids.max").write_text(str(limits.processes))
            (path / "cpu.max").write_text("100000 100000")  # at most one core's worth
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path, limits)

    def adopt(self, pids: Iterable[int]) -> None:
        for pid in pids:
            (self.path / "cgroup.procs").write_text(str(pid))

    def describe(self) -> str:
        return (
            f"whole tree: cgroup v2 {self.path} (memory.max {self.limits.memory_mb} MiB, "
            f"pids.max {self.limits.processes}, cpu.max one core)"
        )

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / "cgroup.kill").write_text("1")
        with contextlib.suppress(OSError):
            self.path.rmdir()
