"""The bubblewrap command lines that build a sandbox.

One sandbox, built by one unprivileged `bwrap` (the *inner* one): new user, IPC, PID, network,
UTS and cgroup namespaces, no capabilities, uid/gid 65534 inside, a new root on a tmpfs with
only the allowed paths bound in read-only (nosuid, nodev), a fresh /proc, a minimal /dev,
size-limited tmpfs for scratch and shared memory, no further user namespaces, a new session
(no controlling terminal), death with its parent, and the seccomp filter loaded last.

When the node runs as root (discouraged; `fedgate node --allow-root`), an *outer* `bwrap`
runs first, as root, only to stage the same paths (root can traverse folders such as a
pyenv under /root that other users cannot), then `setpriv` drops to the unprivileged sandbox
uid and the same inner `bwrap` runs from there. So the sandboxed code is never uid 0 on the
host: RLIMIT_NPROC holds (the kernel exempts uid 0 from it) and root-owned files stay closed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fedgate.sandbox.spec import (
    CACHE,
    CACHE_SEED,
    SANDBOX_GID,
    SANDBOX_UID,
    SCRATCH,
    SHM,
    SandboxError,
    SandboxSpec,
    python_paths,
    system_paths,
)

INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt install bubblewrap; `make` does it when run as root)"


def find_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        hint = INSTALL_HINT if name == "bwrap" else "install util-linux (it provides setpriv)"
        raise SandboxError(f"`{name}` is not installed: {hint}")
    return path


def _binds(paths: Iterable[Path], flag: str) -> list[str]:
    args: list[str] = []
    for path in paths:
        args += [flag, str(path), str(path)]
    return args


def _system(paths: Iterable[Path]) -> list[str]:
    """System folders as they are on the host: symlinks stay symlinks (merged /usr)."""
    args: list[str] = []
    for path in paths:
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        else:
            args += ["--ro-bind", str(path), str(path)]
    return args


def read_only_paths(spec: SandboxSpec) -> tuple[Path, ...]:
    return (*python_paths(), *spec.all_read_only())


def inner_argv(
    spec: SandboxSpec, command: Sequence[str], env: Mapping[str, str], seccomp_fd: int, bwrap: str = "bwrap"
) -> list[str]:
    limits = spec.limits
    argv = [
        bwrap,
        "--unshare-all",  # user, IPC, PID, network, UTS and (where possible) cgroup namespaces
        "--unshare-user",  # explicit: --disable-userns requires it even where it is implied
        "--disable-userns",  # and the sandbox cannot make user namespaces of its own
        "--die-with-parent",
        "--new-session",  # no controlling terminal: TIOCSTI has nothing to type into
        "--cap-drop",
        "ALL",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_GID),
        "--hostname",
        "sandbox",
        "--clearenv",
    ]
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    # The tmpfs first: a host folder under /tmp (the data, in tests) is then bound on top of
    # the scratch tmpfs instead of being hidden by it.
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(limits.scratch_mb << 20), "--tmpfs", SCRATCH]
    argv += ["--size", str(limits.shm_mb << 20), "--tmpfs", SHM]
    argv += _system(system_paths())
    bound = read_only_paths(spec)
    argv += _binds(bound, "--ro-bind")
    argv += _masks(spec.masks, bound)
    if spec.cache:
        argv += ["--size", str(limits.cache_mb << 20), "--tmpfs", CACHE]
    if spec.cache_seed is not None:
        argv += ["--ro-bind", str(spec.cache_seed), CACHE_SEED]
    argv += _binds(spec.writable, "--bind")
    # The root tmpfs and /dev's tmpfs would otherwise be writable without a size limit.
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SCRATCH]
    if spec.seccomp:
        argv += ["--seccomp", str(seccomp_fd)]
    return [*argv, "--", *command]


def _masks(masks: Iterable[Path], bound: Sequence[Path]) -> list[str]:
    """Hide each mask (say, the run folder with every hospital's ledger) behind an empty,
    read-only tmpfs when it lies under a bound path, then bind back what must stay visible
    beneath it (the data folder, an installed app)."""
    args: list[str] = []
    for mask in masks:
        mask = Path(os.path.realpath(mask))
        if not any(mask == b or b in mask.parents for b in bound):
            continue
        args += ["--tmpfs", str(mask), "--remount-ro", str(mask)]
        for path in bound:
            if mask in path.parents:
                args += ["--ro-bind", str(path), str(path)]
    return args


def _parents(paths: Iterable[Path]) -> list[str]:
    """`--dir` for every ancestor, world-traversable, so the unprivileged inner bwrap can
    reach paths whose host ancestors it could not (e.g. /root)."""
    made: set[str] = set()
    args: list[str] = []
    for path in sorted(paths, key=lambda p: len(p.parts)):
        for parent in reversed(path.parents):
            name = str(parent)
            if name != "/" and name not in made:
                made.add(name)
                args += ["--perms", "0755", "--dir", name]
    return args


def outer_argv(spec: SandboxSpec, inner: Sequence[str], bwrap: str = "bwrap", setpriv: str = "setpriv") -> list[str]:
    """Root only: stage the inner sandbox's paths, then drop to the sandbox uid."""
    staged = [*read_only_paths(spec), *(p for p in system_paths() if not p.is_symlink()), *spec.writable]
    if spec.cache_seed is not None:
        staged.append(spec.cache_seed)
    argv = [bwrap, "--die-with-parent", "--bind", "/proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(1 << 20), "--tmpfs", "/tmp"]  # the inner bwrap builds its root here
    argv += _parents(staged)
    argv += _system(system_paths())
    argv += _binds(read_only_paths(spec), "--ro-bind")
    if spec.cache_seed is not None:
        argv += ["--ro-bind", str(spec.cache_seed), str(spec.cache_seed)]
    argv += _binds(spec.writable, "--bind")
    argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    argv += [
        "--",
        setpriv,
        f"--reuid={spec.host_uid}",
        f"--regid={spec.host_uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        *inner,
    ]
    return argv


def sandbox_argv(
    spec: SandboxSpec, command: Sequence[str], env: Mapping[str, str], seccomp_fd: int, as_root: bool
) -> list[str]:
    bwrap = find_tool("bwrap")
    inner = inner_argv(spec, command, env, seccomp_fd, bwrap)
    return outer_argv(spec, inner, bwrap, find_tool("setpriv")) if as_root else inner
