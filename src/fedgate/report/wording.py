"""The report's plain words: bits as a reader counts them, what fits in a bound, and the
warnings a run earns. One place, so that every page says the same thing the same way."""

from __future__ import annotations

import math

from fedgate.report.facts import NO_ISOLATION, UNRECORDED, ReportFacts, RunFacts

PATIENT_ID_BITS = 300  # a patient identifier, e.g. "patient-0042" with a name: ~36 bytes
NAME_AND_BIRTH_DATE_BITS = 400  # "J. Doe, 1961-04-07" and the like: a few hundred bits
IMAGE_BITS = 64 * 64 * 8  # a 64 x 64 image of 8-bit pixels: 32,768 bits


def bits_text(bits: float) -> str:
    """An upper bound in bits, rounded up, with its size in bytes: "7,235 bits ≈ 905 bytes"."""
    if math.isinf(bits) or math.isnan(bits):
        return "no bound (unbounded)"
    whole = math.ceil(bits - 1e-9)
    unit = "bit" if whole == 1 else "bits"
    if whole < 8:
        return f"{whole:,} {unit} (under 1 byte)"
    return f"{whole:,} {unit} ≈ {math.ceil(whole / 8):,} bytes"


def count_text(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def what_fits(bits: float) -> str:
    """What a bound of `bits` could hold, in things a data-protection officer recognises."""
    if math.isinf(bits) or math.isnan(bits):
        return (
            "There is no bound: a reply could carry anything the training code wants to send, images and "
            "identifiers included."
        )
    if bits < PATIENT_ID_BITS:
        return (
            f"That is less than one patient identifier (~{PATIENT_ID_BITS} bits), but still {math.floor(bits):,} "
            "yes/no facts about patients (one bit each)."
        )
    ids = math.floor(bits / PATIENT_ID_BITS)
    names = math.floor(bits / NAME_AND_BIRTH_DATE_BITS)
    images = bits / IMAGE_BITS
    image = (
        f"or {math.floor(images):,} complete 64×64 8-bit images ({IMAGE_BITS:,} bits each)"
        if images >= 1
        else f"or {images:.1%} of one 64×64 8-bit image ({IMAGE_BITS:,} bits)"
    )
    return (
        f"That is room for about {ids:,} patient identifiers (~{PATIENT_ID_BITS} bits each), about {names:,} names "
        f"with birth dates (a few hundred bits each), {image}."
    )


def bound_sentence(run: RunFacts) -> str:
    """The bound of one run in plain words (the report's central claim)."""
    if run.unbounded_sent:
        return (
            f"None: this run's policy adds no noise to updates (noise multiplier z = 0), and "
            f"{count_text(run.unbounded_sent, 'reply', 'replies')} left with an update that could carry any content, "
            "images and identifiers included."
        )
    return (
        f"At most {bits_text(run.max_bits_per_reply)} of any content per reply, "
        f"{bits_text(run.total_bits)} over the run ({count_text(len(run.replies), 'reply', 'replies')}, "
        "sent or refused: a refusal still tells the server that, and when)."
    )


def isolation_sentence(run: RunFacts) -> str:
    counts = run.isolation_counts
    if not counts:
        return "No reply in this run."
    parts = [f"{label}: {count_text(n, 'reply', 'replies')}" for label, n in sorted(counts.items())]
    if not run.not_isolated:
        return "Isolation — " + "; ".join(parts) + ". The bound holds only with isolation, and it held for every reply."
    return (
        "Isolation — " + "; ".join(parts) + ". The bound holds only with isolation: for the replies without it, "
        "a malicious ClientApp could get around the gate."
    )


def run_warnings(run: RunFacts) -> list[str]:
    """Why this run's bound does not hold as stated (the red banner)."""
    warnings: list[str] = []
    if run.unbounded:
        warnings.append(
            f"Run {run.run_id}: UNBOUNDED. The policy's noise multiplier is z = 0: updates were clipped but not "
            "noised, so the bound in bits is infinite — a reply could carry images or identifiers."
        )
    downgraded = run.downgraded
    if downgraded:
        warnings.append(
            f"Run {run.run_id}: SANDBOX DOWNGRADED for {count_text(len(downgraded), 'reply', 'replies')}. The "
            "ClientApp ran without every isolation layer (the policy allowed a downgrade): the bound was not enforced."
        )
    bare = [r for r in run.not_isolated if r.isolation in (NO_ISOLATION, UNRECORDED)]
    if bare:
        how = "without isolation" if all(r.isolation == NO_ISOLATION for r in bare) else "without recorded isolation"
        checked = "checked and clipped" if run.unbounded else "checked, clipped and noised"
        warnings.append(
            f"Run {run.run_id}: NOT ISOLATED — {count_text(len(bare), 'reply was', 'replies were')} produced {how}. "
            f"The gate {checked} them, but a malicious ClientApp could get around it: nothing about those replies "
            "is enforced."
        )
    return warnings


def summary_sentence(facts: ReportFacts) -> str:
    """The report's first sentence: what left, where to, and what was kept."""
    where = facts.hospital or "this hospital"
    if not facts.runs:
        return f"This ledger records no reply of {where}."
    sent, refused = facts.sent, facts.refused
    first = min(run.first_time for run in facts.runs)[:19].replace("T", " ")
    last = max(run.last_time for run in facts.runs)[:19].replace("T", " ")
    left = (
        f"{count_text(len(sent), 'reply', 'replies')} left {where} for {', '.join(facts.destinations)}"
        if sent
        else f"Nothing left {where}"
    )
    kept = (
        f"; {count_text(len(refused), 'reply was', 'replies were')} refused and kept at the hospital, never sent"
        if refused
        else "; no reply was refused"
    )
    if math.isfinite(facts.cumulative_bits):
        counted = f"the gate counted at most {bits_text(facts.cumulative_bits)} of any content"
        if any(run_warnings(run) for run in facts.runs):
            counted += ", a bound that does not hold for the runs named in red above"
    else:
        counted = "there is NO bound on what could have left (a run without noise: see the warnings)"
    return (
        f"{count_text(len(facts.runs), 'run', 'runs')} between {first} and {last} UTC: {left}{kept}. Over every "
        f"reply in this ledger, {counted}."
    )


def run_sentence(run: RunFacts) -> str:
    sent, refused = run.sent, run.refused
    updates = sum(1 for r in sent if r.category == "train")
    others = len(sent) - updates
    parts = [f"{count_text(updates, 'model update', 'model updates')}"]
    if others:
        parts.append(f"{count_text(others, 'metrics-only reply', 'metrics-only replies')}")
    left = " and ".join(parts) + f" left ({run.sent_bytes:,} bytes)" if sent else "Nothing left"
    kept = (
        f"; {count_text(len(refused), 'reply was', 'replies were')} refused, their {run.kept_bytes:,} bytes kept at "
        "the hospital"
        if refused
        else ""
    )
    return f"{left}{kept}."


def secagg_sentence(run: RunFacts) -> str:
    """Replies that left masked (SecAgg+): what the reviewer saw, what left, what the bound rests on."""
    masked = run.masked
    if not masked:
        return ""
    evidence = masked[-1].secagg or {}
    bound = evidence.get("bound", {})
    return (
        f"Secure aggregation: {count_text(len(masked), 'model update', 'model updates')} left masked (SecAgg+, run "
        "by this hospital's gate, with ChaCha20 masks under keys that never entered the research team's code). "
        "Masking happens after every rule and after human review: a reviewer saw the unmasked gated update, and what "
        "left was the masked vector, which the server can unmask only inside the sum of at least "
        f"{evidence.get('threshold', '?')} hospitals' updates. num-examples and the allowed metrics went in the clear, "
        "quantised and counted. The bound and ε of these updates are stated for that sum and rest on an assumption: "
        f"{bound.get('assumption', 'not recorded')}."
    )


def categories_that_left(run: RunFacts) -> str:
    """The GDPR record's "categories of data": what the ledger shows left, and what the bound means.
    Never "no images, no identifiers": the bound says how much of anything could be encoded."""
    if not run.sent:
        return (
            f"Nothing: every reply was refused. The server learnt only that each was refused and when "
            f"(at most {bits_text(run.total_bits)} over the run)."
        )
    parts: list[str] = []
    updates = [r for r in run.sent if r.category == "train"]
    if updates:
        more = len(run.tensor_names) - 12
        names = ", ".join(run.tensor_names[:12]) + (f" and {more} more" if more > 0 else "")
        tensors = f"{len(run.tensor_names)} tensors ({names})" if run.tensor_names else "tensors (names unreadable)"
        noised = "clipped, not noised (z = 0)" if run.unbounded else "clipped and noised"
        if run.masked:
            coordinates = (run.masked[-1].secagg or {}).get("masked_coordinates", "?")
            tensors = f"the float tensors ({coordinates:,} coordinates)" if isinstance(coordinates, int) else tensors
            noised += ", then masked (secure aggregation: the server sees only the sum of several hospitals' updates)"
        replies = count_text(len(updates), "reply", "replies")
        parts.append(f"model parameters of the declared model, {tensors}, {noised}, in {replies}")
    parts.append("metrics: " + (", ".join(run.metric_names) if run.metric_names else "none") + " (quantised)")
    parts.append("whether and when each reply was sent")
    meaning = (
        f"Whatever the training code encoded in them, these carry at most {bits_text(run.max_bits_per_reply)} of "
        f"any content per reply and {bits_text(run.total_bits)} over the run. {what_fits(run.total_bits)} "
        "This is a bound on what could have been encoded, not a finding that no personal data left."
    )
    if run.unbounded_sent:
        meaning = what_fits(math.inf) + " No statement about personal data can be made for this run."
    elif run.not_isolated:
        meaning += " It does not hold for the replies produced without isolation."
    return "; ".join(parts) + ". " + meaning
