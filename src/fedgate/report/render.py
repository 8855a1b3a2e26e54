"""Render the report: facts, words and figures into one self-contained HTML file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from fedgate.ledger.store import DB_FILE, SignedTreeHead
from fedgate.report import wording
from fedgate.report.audit import audit_rows
from fedgate.report.facts import ReportFacts, ledger_folder_of, read_facts
from fedgate.report.plots import run_figures
from fedgate.report.privacy import claimed_paragraph, privacy_paragraphs


def _environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("fedgate.report", "templates"), autoescape=select_autoescape(["html"])
    )
    environment.filters["bits"] = wording.bits_text
    environment.filters["time"] = lambda text: str(text)[:19].replace("T", " ")
    return environment


def render_facts(facts: ReportFacts, *, with_images: bool = False) -> str:
    """`with_images`: show the leakage audit's pictures (true | reconstruction | null), kept at
    the hospital; the report then carries patient images, and its first line says so."""
    runs: list[dict[str, Any]] = [
        {
            "facts": run,
            "sentence": wording.run_sentence(run),
            "bound": wording.bound_sentence(run),
            "fits": wording.what_fits(run.total_bits),
            "isolation": wording.isolation_sentence(run),
            "warnings": wording.run_warnings(run),
            "categories": wording.categories_that_left(run),
            "secagg": wording.secagg_sentence(run),
            "figures": run_figures(run),
            "audits": audit_rows(run, Path(facts.ledger_path).parent if with_images else None),
            "policy_json": json.dumps(run.policies[-1].policy, indent=2, sort_keys=True) if run.policies else "",
        }
        for run in facts.runs
    ]
    return (
        _environment()
        .get_template("report.html")
        .render(
            facts=facts,
            runs=runs,
            with_images=with_images,
            warnings=[w for run in runs for w in run["warnings"]],
            sentence=wording.summary_sentence(facts),
            privacy_words=privacy_paragraphs(facts.privacy) if facts.privacy else [],
            privacy_claimed=claimed_paragraph(facts.privacy) if facts.privacy else "",
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        )
    )


def render_report(
    ledger_folder: Path,
    *,
    public_key: Path | bytes | None = None,
    fingerprint: str | None = None,
    trusted_head: SignedTreeHead | None = None,
) -> str:
    facts = read_facts(ledger_folder, public_key=public_key, fingerprint=fingerprint, trusted_head=trusted_head)
    return render_facts(facts)


def write_report(
    ledger_folder: Path,
    out: Path,
    *,
    public_key: Path | bytes | None = None,
    fingerprint: str | None = None,
    trusted_head: SignedTreeHead | None = None,
) -> Path:
    html = render_report(ledger_folder, public_key=public_key, fingerprint=fingerprint, trusted_head=trusted_head)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


def write_hospital_reports(hospital_dirs: list[str]) -> list[Path]:
    """One report for each hospital's data-protection officer, beside its ledger (a hospital
    that never received an instruction has no ledger, and no report). Written by the node that
    holds the key, so not pinned: the report says so, with the fingerprint to publish."""
    return [
        write_report(Path(d), Path(d) / "report.html")
        for d in hospital_dirs
        if (ledger_folder_of(Path(d)) / DB_FILE).is_file()
    ]
