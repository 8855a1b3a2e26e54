"""The report's privacy section: the ε this hospital's own code enforced, from the ledger, and
in plain words what it means for one patient. An ε the research team's app reports is a claim
and is shown as one, apart, never as a guarantee."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedgate.gate.entries import ReplyEntry, claimed_privacy

PRIOR = 0.01  # the worked example: an attacker who starts 1 % sure that a given patient was used
MEANINGLESS = 20.0  # above this ε, the guarantee says nothing a reader could use


@dataclass(frozen=True)
class PrivacyFacts:
    """Cumulative figures as the gate recorded them with the last reply that left (over every
    run this hospital took part in). None: that kind of DP did not apply."""

    seq: int
    delta: float
    record_level: float | None
    hospital_level: float | None
    record_accountant: str
    hospital_accountant: str
    library: str
    modes: tuple[str, ...]  # "trusted" (fedgate's DP-SGD ran here) and/or "gated" (only the gate's noise)
    claimed: dict[str, str] = field(default_factory=dict)  # a ClientApp's own privacy metrics: claims

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("per patient (record level)", epsilon_text(self.record_level, self.record_accountant)),
            ("whole hospital (hospital level)", epsilon_text(self.hospital_level, self.hospital_accountant)),
            ("δ", f"{self.delta:g}"),
            ("how each reply was trained", ", ".join(MODE_WORDS.get(m, m) for m in self.modes) or "not recorded"),
            ("accounting library", self.library or "not recorded"),
            ("as of ledger entry", str(self.seq)),
        ]


MODE_WORDS = {
    "trusted": "trusted: fedgate's own DP-SGD trainer on this hospital's images (no research-team code ran)",
    "gated": "gated: the research team's code trained; only the gate's noise on the whole update is counted",
}


def _figure(privacy: dict[str, object], level: str) -> tuple[float | None, str]:
    figures = privacy.get(level)
    if not isinstance(figures, dict) or not isinstance(figures.get("cumulative"), dict):
        return None, ""
    cumulative = figures["cumulative"]
    try:
        value = float(cumulative["epsilon"])
    except (KeyError, TypeError, ValueError):
        return None, ""
    return value, str(cumulative.get("accountant", ""))


def privacy_facts(replies: list[ReplyEntry]) -> PrivacyFacts | None:
    """From the replies that left: the latest accounted one's cumulative figures."""
    accounted = [r for r in replies if r.sent and r.privacy]
    if not accounted:
        return None
    last = accounted[-1]
    record, record_accountant = _figure(last.privacy, "record_level")
    hospital, hospital_accountant = _figure(last.privacy, "hospital_level")
    claimed: dict[str, str] = {}
    for reply in replies:
        if reply.sent:
            claimed.update(claimed_privacy(reply))
    modes = tuple(sorted({str(r.privacy.get("mode")) for r in accounted if r.privacy.get("mode")}))
    return PrivacyFacts(
        seq=last.seq, delta=float(str(last.privacy.get("delta", "nan"))), record_level=record,
        hospital_level=hospital, record_accountant=record_accountant, hospital_accountant=hospital_accountant,
        library=str(last.privacy.get("library", "")), modes=modes, claimed=claimed,
    )  # fmt: skip


def epsilon_text(epsilon: float | None, accountant: str) -> str:
    if epsilon is None:
        return "does not apply"
    if math.isinf(epsilon):
        return "ε = ∞: no noise, no guarantee"
    how = f" ({accountant})" if accountant else ""
    return f"ε = {epsilon:,.2f}{how}"


def posterior(epsilon: float, prior: float = PRIOR) -> float:
    """The most an attacker's belief can grow: odds multiplied by at most e^ε."""
    if epsilon > 700:
        return 1.0
    odds = prior / (1 - prior) * math.exp(epsilon)
    return odds / (1 + odds)


def privacy_paragraphs(facts: PrivacyFacts) -> list[str]:
    """The enforced figure first, then what it means for one patient, in plain words."""
    words: list[str] = []
    record = facts.record_level
    if record is None:
        words.append("No per-patient ε applies to what left: no differential-privacy mechanism covered it.")
    elif math.isinf(record) or record > MEANINGLESS:
        shown = "∞" if math.isinf(record) else f"{record:,.0f}"
        words.append(
            f"Per patient, ε = {shown}: this is no meaningful guarantee. What limits what left is the bound in bits "
            "stated for each run above, not differential privacy."
            + (
                ' For a per-patient guarantee, use trusted training ([training] mode = "trusted"), where this '
                "hospital's own code runs DP-SGD."
                if "trusted" not in facts.modes
                else ""
            )
        )
    else:
        after = posterior(record)
        words.append(
            f"Per patient, ε = {record:.2f} at δ = {facts.delta:g}, enforced by this hospital's own code: "
            + (
                "fedgate's DP-SGD trainer clipped each image's gradient and added noise at every step, on this "
                "hospital's machine. "
                if "trusted" in facts.modes
                else "the gate's noise on each whole update, counting one image as able to move it by up to 2C. "
            )
            + f"What it means: whatever the research team and the server do with everything that left, their "
            f"odds that any one patient's image was used can grow at most e^ε ≈ {math.exp(record):,.0f}-fold "
            f"(except with probability δ). Someone who started {PRIOR:.0%} sure that a given patient was in the "
            f"data can end at most {after:.1%} sure."
        )
    hospital = facts.hospital_level
    if hospital is not None:
        shown = "∞" if math.isinf(hospital) else f"{hospital:,.2f}"
        words.append(
            f"For the hospital as a whole (whether it took part at all, with everything it holds), ε = {shown}"
            + (": no meaningful guarantee at that level." if math.isinf(hospital) or hospital > MEANINGLESS else ".")
        )
    words.append(
        "These figures are cumulative over every run this hospital took part in, recomputed by the gate from what "
        "it ran, never from anything the research team reports. They cover the model updates that left. The "
        "quantised metrics beside them (the bucketed number of images; evaluation loss and accuracy on the local "
        "validation images) are not covered by ε, nor is whether and when a reply left (a refusal decided after "
        "training, by the leakage audit or a reviewer, depends on the data): they are limited by the bits stated "
        "for each run above."
    )
    return words


def claimed_paragraph(facts: PrivacyFacts) -> str:
    if not facts.claimed:
        return ""
    listed = ", ".join(f"{name} = {value}" for name, value in sorted(facts.claimed.items()))
    return (
        f"Claimed, not enforced: the research team's ClientApp reported {listed}. fedgate cannot check how that "
        "figure was computed or whether the code that computed it did what it says; it is not a guarantee and "
        "is not used in the figures above."
    )
