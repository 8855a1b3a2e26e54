"""The report's leakage-audit rows: each audited reply's scores in plain words and, only when
asked (`fedgate report --with-images`), its picture, read from the hospital folder and checked
against the SHA-256 its ledger entry recorded."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedgate.audit.wording import AuditWords
from fedgate.gate.audit import AUDIT_DIR
from fedgate.report.facts import ReplyRow, RunFacts


@dataclass(frozen=True)
class AuditRow:
    reply: ReplyRow
    words: AuditWords
    image_uri: str = ""  # a data: URI, only with --with-images and a picture that checks out
    image_note: str = ""  # why there is no picture


def audit_rows(run: RunFacts, hospital_dir: Path | None) -> list[AuditRow]:
    """One row per audited reply of `run`; pictures only when `hospital_dir` is given."""
    rows = []
    for reply in run.replies:
        if reply.audit is None:
            continue
        uri, note = ("", "") if hospital_dir is None else _picture(hospital_dir, reply.audit)
        rows.append(AuditRow(reply, reply.audit, uri, note))
    return rows


def _picture(hospital_dir: Path, words: AuditWords) -> tuple[str, str]:
    if not words.image_file:
        return "", "no picture kept (the audit did not run, or [audit] keep_images = false)"
    if "/" in words.image_file or words.image_file.startswith("."):
        return "", f"the ledger names an unexpected file {words.image_file!r}: not shown"
    try:
        data = (hospital_dir / AUDIT_DIR / words.image_file).read_bytes()
    except OSError as err:
        return "", f"picture {words.image_file} missing: {err.strerror}"
    if hashlib.sha256(data).hexdigest() != words.image_sha256:
        return "", f"picture {words.image_file} is not the one the ledger recorded (altered): not shown"
    return "data:image/png;base64," + base64.b64encode(data).decode(), ""
