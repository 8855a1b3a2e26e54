"""What the FAB check found: a frozen report (the evidence the ledger records) and the refusal.

A report is built for every FAB, accepted or refused, so that a refusal is as inspectable as an
acceptance. Fields the check did not reach stay empty: a FAB refused for a bad member path has no
publisher in its report, because nothing after the refusal was read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from fedgate.canonical import canonical_json
from fedgate.errors import FedgateError

REPORT_SCHEMA = "fedgate.fab-report/1"

# Every rule a FAB can be refused by, in the order the check applies them.
RULES = (
    "fab-size",  # the archive itself is larger than fab.max_fab_bytes
    "zip-malformed",  # not a zip, a broken header, a CRC or size mismatch, gaps or overlaps between members
    "zip-unsupported",  # encryption, a compression method other than stored/deflate, zip64
    "too-many-files",  # more members than fab.max_files
    "member-path",  # not a plain relative POSIX path of safe characters (.., /abs, \\, //, NUL, ...)
    "member-type",  # a directory entry, symlink, device, FIFO or socket; an unknown host system
    "member-kind",  # a file kind `flwr build` never packs (.pyc, .so, __pycache__, extra .info files)
    "member-duplicate",  # the same path twice, twice up to case, or a path that is both file and folder
    "file-too-large",  # a member declared larger than fab.max_file_bytes
    "total-too-large",  # members declared larger than fab.max_total_bytes together
    "zip-ratio",  # a member inflating more than fab.max_ratio times its compressed size
    "zip-bomb",  # a member inflating past the size its headers declare
    "content-missing",  # no .info/CONTENT
    "content-format",  # a CONTENT line that is not `path,sha256,size_in_bits`, or a path listed twice
    "content-mismatch",  # a member whose SHA-256 or size differs from its CONTENT line
    "content-unlisted",  # a member that CONTENT does not list
    "content-absent",  # a CONTENT line naming no member
    "pyproject",  # no pyproject.toml, not TOML, or a configuration Flower itself rejects
    "metadata-publisher",  # [tool.flwr.app] publisher outside the strict pattern
    "metadata-name",  # [project] name outside Flower's name rule (ASCII only)
    "metadata-version",  # [project] version outside Flower's APP_VERSION_PATTERN
    "entry-point",  # clientapp/serverapp not `module:attr`, or naming a module the FAB does not contain
    "run-config",  # [tool.flwr.app.config] with a key or value Flower's run config cannot hold
    "fab-not-approved",  # the policy lists approved FABs and this hash is not one of them
    "installed-copy-differs",  # <fab_root>/<sha256>/ exists but its files are not this FAB's
)

Detail = tuple[tuple[str, str | int], ...]


class FabRefused(FedgateError):
    """The FAB was refused. `rule` names the rule (one of `RULES`); `detail` holds the offending
    member / key / value. `report` is the refused FabReport, set by the check before it raises, so
    the caller can record it. Like GateRefusal, the detail stays at the hospital."""

    def __init__(self, rule: str, message: str, **detail: str | int) -> None:
        super().__init__(f"[{rule}] {message}")
        self.rule = rule
        self.reason = message
        self.detail: dict[str, str | int] = dict(detail)
        self.report: FabReport | None = None


@dataclass(frozen=True)
class FabFile:
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ConfigDefault:
    """One run-config default, flattened (`a.b`) as Flower flattens it. `value` is text (floats as
    `decimal_str`, bools as true/false) so that the report hashes the same everywhere; the exact
    bytes are pinned by pyproject.toml's hash in `files`."""

    key: str
    kind: str  # "bool" | "int" | "float" | "str"
    value: str

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "value": self.value}


@dataclass(frozen=True)
class FabReport:
    sha256: str
    fab_bytes: int
    verdict: str  # "accepted" | "refused"
    rule: str | None = None
    reason: str | None = None
    detail: Detail = ()
    approval: str = "no-list"  # "no-list" | "approved" | "not-approved"
    publisher: str | None = None
    name: str | None = None
    version: str | None = None
    client_app: str | None = None
    server_app: str | None = None
    files: tuple[FabFile, ...] = field(default=())
    run_config: tuple[ConfigDefault, ...] = field(default=())

    @property
    def accepted(self) -> bool:
        return self.verdict == "accepted"

    @property
    def fab_ref(self) -> str:
        """The form `[fab] approved` takes: `sha256:<64 hex>`."""
        return f"sha256:{self.sha256}"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "sha256": self.sha256,
            "fab_bytes": self.fab_bytes,
            "verdict": self.verdict,
            "rule": self.rule,
            "reason": self.reason,
            "detail": {key: value for key, value in self.detail},
            "approval": self.approval,
            "publisher": self.publisher,
            "name": self.name,
            "version": self.version,
            "client_app": self.client_app,
            "server_app": self.server_app,
            "files": [f.to_json() for f in self.files],
            "run_config": [c.to_json() for c in self.run_config],
        }

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        """SHA-256 of the canonical report: what a ledger entry can carry in place of the report."""
        return hashlib.sha256(self.canonical()).hexdigest()
