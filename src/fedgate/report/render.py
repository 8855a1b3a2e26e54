"""Render the report: facts and figures into one HTML file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from fedgate.report.facts import ReportFacts, read_facts
from fedgate.report.plots import figures


def summary_sentence(facts: ReportFacts) -> str:
    sent = facts.sent
    if not sent:
        return f"No update has left {facts.hospital or 'this hospital'} according to this ledger."
    first, last = sent[0].time[:19].replace("T", " "), sent[-1].time[:19].replace("T", " ")
    tensors = f"the model's {len(facts.tensor_names)} tensors" if facts.tensor_names else "no model tensors"
    metrics = ", ".join(facts.metric_names) or "no metrics"
    n_refused = len(facts.refused)
    refused = f" {n_refused} {'reply was' if n_refused == 1 else 'replies were'} refused and never sent."
    refused = refused if n_refused else " No reply was refused."
    updates = sum(1 for r in sent if r.message_type.startswith("train"))
    others = len(sent) - updates
    extra = f" and {others} evaluation replies (metrics only)" if others else ""
    return (
        f"{updates} model updates{extra} left {facts.hospital or 'this hospital'} for {', '.join(facts.destinations)} "
        f"between {first} and {last} UTC; each update contained only {tensors} (clipped and noised by the gate), "
        f"and every reply only the allow-listed, quantised metrics ({metrics}). At most "
        f"{facts.max_bits_per_reply:,.0f} bits could be carried by any one reply, {facts.total_bits:,.0f} bits "
        f"in total.{refused}"
    )


def render_report(ledger_folder: Path) -> str:
    facts = read_facts(ledger_folder)
    environment = Environment(
        loader=PackageLoader("fedgate.report", "templates"), autoescape=select_autoescape(["html"])
    )
    policy = facts.policies[-1]["policy"] if facts.policies else None
    return environment.get_template("report.html").render(
        facts=facts,
        sentence=summary_sentence(facts),
        figures=figures(facts),
        policy_json=json.dumps(policy, indent=2, sort_keys=True) if policy else "",
        policy_hash=facts.policies[-1]["policy_hash"] if facts.policies else "",
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_hospital_reports(hospital_dirs: list[str]) -> list[Path]:
    """One report for each hospital's data-protection officer, beside its ledger."""
    return [write_report(Path(d), Path(d) / "report.html") for d in hospital_dirs]


def write_report(ledger_folder: Path, out: Path) -> Path:
    html = render_report(ledger_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
