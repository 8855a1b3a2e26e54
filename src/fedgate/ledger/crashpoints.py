"""Named points of `Ledger.append` at which the crash test kills the process.

Test-only: `hook` is None in production, so each point costs one global lookup and no
environment read (tests/ledger/crash_appender.py reads FEDGATE_LEDGER_CRASH_AT once and sets
`hook`). The points are ordered as an append passes them."""

from __future__ import annotations

from collections.abc import Callable

POINTS = (
    "before-blob-write",  # the payload is not yet on disk
    "in-blob-write",  # the first chunk written, the rest not (a partial .incoming- file)
    "after-blob-fsync",  # the whole payload fsynced under its temporary name
    "after-blob-rename",  # the blob in place, the database not yet touched
    "before-commit",  # entry, head, compact range and state written inside the open transaction
    "after-commit",  # durable: the append happened
)

hook: Callable[[str], None] | None = None


def reached(point: str) -> None:
    if hook is not None:
        hook(point)
