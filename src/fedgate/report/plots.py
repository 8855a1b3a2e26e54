"""The report's figures, one set per run, as inline PNG data URIs (the report is one
self-contained file). Integer ticks where the axis counts things, every series in a legend,
every axis labelled and starting at zero; a figure with nothing to show is not drawn — the
report says why instead."""

from __future__ import annotations

import base64
import io
from collections import Counter
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fedgate.report.facts import RunFacts

SENT_COLOUR, REFUSED_COLOUR, TOTAL_COLOUR = "#3b6ea8", "#a11", "#a15c00"


@dataclass(frozen=True)
class Plot:
    """One figure of the report: the image, or why there is none."""

    key: str
    title: str
    uri: str = ""
    skipped: str = ""  # why no figure is drawn


def _figure(height: float, rows: int = 1) -> tuple[Figure, list[Axes]]:
    """Fixed margins (a "tight" bounding box draws every figure twice: 3-4x the time)."""
    figure, axes = plt.subplots(rows, 1, figsize=(8.5, height), sharex=True, squeeze=False)
    figure.subplots_adjust(left=0.11, right=0.62, bottom=0.8 / height, top=1 - 0.45 / height, hspace=0.12)
    return figure, [a for row in axes for a in row]


def _legend(axis: Axes) -> None:
    axis.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)


def _data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thousands(axis: Axes) -> None:
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _integer_x(axis: Axes, values: list[int], zero: str = "") -> None:
    if len(values) <= 20:
        axis.set_xticks(values)
    else:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if zero:  # the gate counts train replies; metrics-only replies have no round of their own
        axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: zero if v == 0 else f"{v:.0f}"))


def replies_per_round(run: RunFacts) -> Plot:
    title = "Replies per round: sent, or refused and kept at the hospital"
    if not run.replies:
        return Plot("replies", title, skipped="No reply in this run: nothing to plot.")
    rounds = sorted({r.gate_round for r in run.replies})
    sent = Counter(r.gate_round for r in run.sent)
    refused = Counter(r.gate_round for r in run.refused)
    figure, [axis] = _figure(2.9)
    if sent:
        axis.bar(rounds, [sent[r] for r in rounds], color=SENT_COLOUR, label="sent (left the hospital)")
    if refused:
        axis.bar(rounds, [refused[r] for r in rounds], bottom=[sent[r] for r in rounds], color=REFUSED_COLOUR,
                 label="refused (kept at the hospital)")  # fmt: skip
    axis.set(xlabel="round (the gate's own count of model updates)", ylabel="replies", title=title)
    axis.set_ylim(0, max(sent[r] + refused[r] for r in rounds) + 0.5)
    _integer_x(axis, rounds, zero="metrics only")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(axis)
    return Plot("replies", title, _data_uri(figure))


def bytes_per_round(run: RunFacts) -> Plot:
    title = "Bytes that left, per round"
    if not run.sent:
        return Plot("bytes", title, skipped="No reply left in this run: no bytes to plot.")
    rounds = sorted({r.gate_round for r in run.replies})
    sent = Counter[int]()
    for r in run.sent:
        sent[r.gate_round] += r.payload_size
    figure, [axis] = _figure(2.7)
    axis.bar(rounds, [sent[r] for r in rounds], color=SENT_COLOUR, label="bytes sent")
    axis.set(xlabel="round (the gate's own count of model updates)", ylabel="bytes sent", title=title)
    axis.set_ylim(0, max(sent.values()) * 1.15)
    _integer_x(axis, rounds, zero="metrics only")
    _thousands(axis)
    _legend(axis)
    return Plot("bytes", title, _data_uri(figure))


def bound_per_reply(run: RunFacts) -> Plot:
    title = "Bound on what could leave, per reply and over the run"
    if not run.replies:
        return Plot("bound", title, skipped="No reply in this run: no bound to plot.")
    if run.unbounded_sent:
        return Plot("bound", title, skipped="Unbounded (z = 0): a reply could carry anything, so there is no "
                       "finite bound to plot.")  # fmt: skip
    numbers = list(range(1, len(run.replies) + 1))
    running, total = [], 0.0
    for r in run.replies:
        total += r.bits
        running.append(total)
    figure, (each, cumulative) = _figure(4.6, rows=2)
    sent = [(n, r.bits) for n, r in zip(numbers, run.replies, strict=True) if r.sent]
    refused = [(n, r.bits) for n, r in zip(numbers, run.replies, strict=True) if not r.sent]
    if sent:
        each.plot(*zip(*sent, strict=True), "o", color=SENT_COLOUR, ms=4, label="sent: its bound")
    if refused:
        each.plot(*zip(*refused, strict=True), "x", color=REFUSED_COLOUR, ms=5,
                  label="refused: whether and when (bits)")  # fmt: skip
    each.set(ylabel="bits", title=title)
    each.set_ylim(0, max(r.bits for r in run.replies) * 1.15 + 1)
    _thousands(each)
    _legend(each)
    cumulative.plot(numbers, running, "o-", color=TOTAL_COLOUR, ms=3, label="total over the run")
    cumulative.set(xlabel="reply, in order (this run)", ylabel="bits")
    cumulative.set_ylim(0, running[-1] * 1.15 + 1)
    _thousands(cumulative)
    _integer_x(cumulative, numbers)
    _legend(cumulative)
    return Plot("bound", title, _data_uri(figure))


def review_decisions(run: RunFacts) -> Plot:
    title = "Human review decisions"
    counts = run.review_counts
    if not counts:
        return Plot("reviews", title, skipped="No reply of this run was held for human review: no plot.")
    labels = [s for s in ("approved", "rejected", "expired") if s in counts] + sorted(
        s for s in counts if s not in ("approved", "rejected", "expired")
    )
    colours = {"approved": "#176b2c", "rejected": "#a11", "expired": "#777"}
    figure, [axis] = _figure(1.5 + 0.4 * len(labels))
    for label in labels:
        axis.barh([label], [counts[label]], color=colours.get(label, "#555"), label=f"{label}: {counts[label]}")
    axis.set(xlabel="decisions", title=title)
    axis.set_xlim(0, max(counts.values()) + 0.5)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(axis)
    return Plot("reviews", title, _data_uri(figure))


def run_figures(run: RunFacts) -> list[Plot]:
    return [replies_per_round(run), bytes_per_round(run), bound_per_reply(run), review_decisions(run)]
