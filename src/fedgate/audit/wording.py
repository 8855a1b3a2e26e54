"""The gate's audit scores in plain words, for the review page and the DPO report (torch-free).

A reply's ledger entry carries the audit as a stage of its decision: `audit` (it passed, or
was only recorded), or the refusal stage `audit-reidentifiable` / `audit-error` whose detail
holds the same scores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

AUDIT_STAGES = ("audit", "audit-reidentifiable", "audit-error")
REIDENTIFIABLE = "re-identifiable"
BLIND_GUESS = "not distinguishable from a blind guess"


@dataclass(frozen=True)
class AuditWords:
    """One audited reply: `headline` in plain words, `numbers` beside it, `refused` whether the
    gate refused the reply on the audit's word, and the kept picture's file and hash, if any."""

    headline: str
    numbers: str
    auditable: bool
    reidentifiable: bool
    refused: bool
    image_file: str = ""
    image_sha256: str = ""


def audit_detail(decision: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(stage name, detail) of the audit in a recorded decision, or None when not audited."""
    for stage in decision.get("stages", []):
        if isinstance(stage, Mapping) and stage.get("stage") in AUDIT_STAGES:
            detail = stage.get("detail", {})
            return str(stage["stage"]), dict(detail) if isinstance(detail, Mapping) else {}
    return None


def audit_words(decision: Mapping[str, Any]) -> AuditWords | None:
    found = audit_detail(decision)
    if found is None:
        return None
    stage, detail = found
    refused = stage != "audit"
    if stage == "audit-error" or not detail.get("auditable", "verdict" in detail):
        reason = str(detail.get("reason") or "audit failed")
        error = str(detail.get("error", ""))
        numbers = error if error else "the model is not one fedgate's zoo can rebuild, so nothing was attacked"
        if stage == "audit-error":
            reason = "audit failed: the reply was refused (the policy refuses when the audit cannot run)"
        return AuditWords(reason, numbers, False, False, refused)
    identified = detail.get("verdict") == REIDENTIFIABLE
    headline = REIDENTIFIABLE if identified else BLIND_GUESS
    if identified:
        headline += ": the attack rebuilt a patient from this reply" + (
            " (refused: it did not leave)" if refused else " (recorded only: the policy does not refuse)"
        )
    numbers = (
        f"the patient ranked {detail.get('rank')} of {detail.get('candidates')} of the hospital's images against "
        f"the reconstruction; a blind guess (null run) reached {detail.get('null_rank')} at best; "
        f"PSNR {detail.get('psnr')} dB, SSIM {detail.get('ssim')}; {_seconds(detail.get('seconds'))} s, "
        f"{detail.get('steps')} attack steps"
    )
    if not detail.get("complete", True):
        numbers += f" (cut from {detail.get('planned_steps')} by the time budget: a weaker attack)"
    kept = detail.get("images")
    images: Mapping[str, Any] = kept if isinstance(kept, Mapping) else {}
    return AuditWords(
        headline, numbers, True, identified, refused, str(images.get("file", "")), str(images.get("sha256", ""))
    )


def _seconds(value: Any) -> str:
    try:
        return f"{float(value):.0f}"
    except (TypeError, ValueError):
        return "?"
