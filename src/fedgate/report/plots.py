"""The report's figures, as inline PNG data URIs (the report must be one self-contained file)."""

from __future__ import annotations

import base64
import io
from collections import Counter, defaultdict

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedgate.report.facts import ReportFacts


def _data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figures(facts: ReportFacts) -> dict[str, str]:
    rounds = sorted({r.round for r in facts.replies})
    sent_bytes: dict[int, int] = defaultdict(int)
    refusals: Counter[int] = Counter()
    for row in facts.replies:
        if row.sent:
            sent_bytes[row.round] += row.bytes
        else:
            refusals[row.round] += 1
    out: dict[str, str] = {}

    figure, axis = plt.subplots(figsize=(6, 2.6))
    axis.bar(rounds, [sent_bytes[r] / 1e3 for r in rounds], color="#3b6ea8")
    axis.set(xlabel="round", ylabel="kB sent", title="Bytes that left, per round")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    out["bytes"] = _data_uri(figure)

    figure, axis = plt.subplots(figsize=(6, 2.6))
    sent = facts.sent
    axis.plot([r.seq for r in sent], [r.bits for r in sent], "o", ms=3, label="bound per reply")
    axis.set(xlabel="ledger entry", ylabel="bits per reply", title="Bound on information per reply, and in total")
    twin = axis.twinx()
    twin.plot([r.seq for r in sent], [r.cumulative_bits for r in sent], color="#a15c00", label="cumulative")
    twin.set_ylabel("cumulative bits", color="#a15c00")
    out["bits"] = _data_uri(figure)

    figure, axis = plt.subplots(figsize=(6, 2.6))
    axis.bar(rounds, [refusals[r] for r in rounds], color="#a11")
    axis.set(xlabel="round", ylabel="replies refused", title="Refusals per round")
    axis.set_ylim(0, max([*refusals.values(), 1]) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    out["refusals"] = _data_uri(figure)

    counts = facts.review_counts
    figure, axis = plt.subplots(figsize=(6, 2.2))
    labels = ["approved", "rejected", "expired"]
    axis.barh(labels, [counts.get(label, 0) for label in labels], color=["#176b2c", "#a11", "#777"])
    axis.set(xlabel="decisions", title="Human review decisions")
    axis.set_xlim(0, max([*counts.values(), 1]) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    out["reviews"] = _data_uri(figure)
    return out
