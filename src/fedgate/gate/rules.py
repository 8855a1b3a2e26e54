"""The gate's rules, one small function each, over decoded plain values. Each returns what it
passes on and its evidence, or raises `GateRefusal` naming itself. No I/O, no clock: the
pipeline around them keeps state, records and releases."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.canonical import decimal_str
from fedgate.errors import GateRefusal
from fedgate.gate.decode import Instruction, Reply
from fedgate.gate.evidence import StageEvidence
from fedgate.gate.manifest import Manifest
from fedgate.gate.noise import NoiseSource
from fedgate.gate.state import GateState
from fedgate.gate.update import NoisedUpdate, PredrawnNoise, capacity_bits, effective_norm, grid_step, noised_update
from fedgate.policy import Policy

NUM_EXAMPLES = "num-examples"


def check_model_approved(instruction: Instruction, policy: Policy, state: GateState) -> StageEvidence:
    """The server's model must be the approved one, or the one this hospital pinned on its
    first train reply (kept across runs: a new run id does not unpin it)."""
    assert instruction.manifest is not None
    declared = instruction.manifest.hash
    expected = policy.approved_manifest or state.pinned_manifest
    if expected and declared != expected:
        raise GateRefusal(
            "manifest-not-approved",
            "the server's model is not the approved / pinned model",
            declared=declared,
            expected=expected,
        )
    how = "approved in the policy" if policy.approved_manifest else "pinned" if expected else "pinned now (first)"
    return StageEvidence(
        "model", True, {"manifest": declared, "tensors": len(instruction.manifest.tensors), "how": how}
    )


def check_manifest(instruction: Instruction, reply: Reply) -> StageEvidence:
    assert instruction.manifest is not None
    got = Manifest.of_arrays(reply.arrays)
    if got != instruction.manifest:
        raise GateRefusal(
            "manifest", "the reply's tensors differ from the declared model", diff=instruction.manifest.diff(got)
        )
    return StageEvidence("manifest", True, {"hash": got.hash})


def check_values(instruction: Instruction, reply: Reply) -> StageEvidence:
    """Integer tensors (step counters) unchanged: only floats may be trained. (NaN and Inf in
    float tensors are refused by the update stage, which reads every value anyway.)"""
    for name, value in reply.arrays.items():
        if value.dtype.kind != "f" and not np.array_equal(value, instruction.model[name]):
            raise GateRefusal("integer-tensor", f"non-float tensor {name!r} changed", key=name)
    return StageEvidence("values", True, {"tensors": len(reply.arrays)})


def update_bits_for(clip_norm: float, sigma: float, coordinates: int, honest_in_sum: int = 1) -> float:
    """The bound of a noised update of `coordinates` float parameters: the Gaussian channel's
    capacity at the released update's largest norm (clip norm plus the grid's rounding).

    `honest_in_sum` = t > 1: the server sees the update only inside a sum (SecAgg+) that holds at
    least t replies with this much honest noise, so the channel's noise is sigma·sqrt(t) (the grid
    is still this gate's own). The caller records that assumption beside the figure."""
    if sigma == 0.0:
        return math.inf
    if honest_in_sum < 1:
        raise ValueError(f"honest_in_sum must be >= 1, got {honest_in_sum}")
    norm = effective_norm(clip_norm, grid_step(sigma, clip_norm, coordinates), coordinates)
    return capacity_bits(norm, sigma * math.sqrt(honest_in_sum))


def noise_update(
    instruction: Instruction,
    reply: Reply,
    policy: Policy,
    source: NoiseSource | PredrawnNoise,
    into: OrderedDict[str, np.ndarray] | None = None,
) -> tuple[OrderedDict[str, np.ndarray], NoisedUpdate]:
    """Clip (reply - global) to L2 norm C over every float tensor, add Gaussian noise from the
    OS-entropy source, and return the outgoing model: non-float tensors as the server sent
    them, float tensors = global + noised update. `into`: a writable array per tensor of the
    model, in order, to hold the outgoing model (the wire's own buffer: `codec.LaidOutReply`)."""
    floats = [name for name, value in instruction.model.items() if value.dtype.kind == "f"]
    if into is not None and list(into) != list(instruction.model):
        raise ValueError("`into` must name the model's tensors in order")
    update = noised_update(
        [instruction.model[n] for n in floats],
        [reply.arrays[n] for n in floats],
        policy.clip_norm,
        policy.sigma,
        source,
        out=[into[n] for n in floats] if into is not None else None,
    )
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    noised = dict(zip(floats, update.arrays, strict=True))
    for name, value in instruction.model.items():
        if name in noised:
            out[name] = noised[name]
        elif into is not None:
            into[name][...] = value  # as the server sent it
            into[name].flags.writeable = False
            out[name] = into[name]
        else:
            out[name] = value
    return out, update


@dataclass(frozen=True)
class CanonicalMetrics:
    values: dict[str, float | int]  # sorted, every allow-listed key of this reply type
    bits: float
    warnings: tuple[str, ...]
    evidence: StageEvidence


def canonical_metrics(reply: Reply | None, category: str, policy: Policy) -> CanonicalMetrics:
    """The metrics that leave: exactly the allow-listed keys for this reply type, sorted, each
    quantised (its minimum when the app did not report it), plus num-examples, bucketed.
    Anything else the app reported is a refusal: it asked to send something not allowed."""
    reported = dict(reply.metrics) if reply else {}
    rules = policy.metrics_for(category)
    allowed = {name for name, _ in rules} | {NUM_EXAMPLES}
    for key, value in reported.items():
        if key not in allowed:
            raise GateRefusal("metric-not-allowed", f"metric {key!r} is not on the allow-list for {category}", key=key)
        if not math.isfinite(value):
            raise GateRefusal("non-finite", f"metric {key!r} is {value}", key=key)
    values: dict[str, float | int] = {}
    detail: dict[str, Any] = {}
    warnings: list[str] = []
    bits = 0.0
    for name, rule in rules:
        raw = reported.get(name)
        values[name] = rule.quantise(float(raw)) if raw is not None else rule.min
        bits += math.log2(rule.levels)
        if raw is not None and not rule.min <= raw <= rule.max:
            warnings.append(f"metric-clipped:{name}")
        detail[name] = {"sent": decimal_str(float(values[name])), "reported": raw is not None}
    examples = reported.get(NUM_EXAMPLES)
    counted = policy.num_examples
    values[NUM_EXAMPLES] = counted.quantise(int(examples)) if examples is not None else counted.quantise(counted.step)
    bits += math.log2(counted.levels)
    if examples is not None and counted.mode == "bucket" and examples > counted.max:
        warnings.append(f"metric-clipped:{NUM_EXAMPLES}")
    detail[NUM_EXAMPLES] = {"sent": str(values[NUM_EXAMPLES]), "reported": examples is not None}
    ordered = dict(sorted(values.items()))
    evidence = StageEvidence("metrics", True, {"metrics": detail, "bits": decimal_str(bits)})
    return CanonicalMetrics(ordered, bits, tuple(warnings), evidence)


def check_budget(state: GateState, policy: Policy, run_id: int, bits: float) -> StageEvidence:
    spent = state.bits_for(policy.budget_scope, run_id)
    if policy.max_total_bits and spent + bits > policy.max_total_bits:
        raise GateRefusal(
            "budget",
            f"sending would bring the bound to {spent + bits:,.0f} bits ({policy.budget_scope}), over the policy's "
            f"{policy.max_total_bits:,.0f}",
            spent=decimal_str(spent),
            this_reply=decimal_str(bits),
        )
    return StageEvidence(
        "budget",
        True,
        {"scope": policy.budget_scope, "spent": decimal_str(spent), "limit": decimal_str(policy.max_total_bits)},
    )


def jsonable(value: Any) -> Any:
    """Refusal details as canonical-JSON-safe values (floats as decimal strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return decimal_str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return repr(value)[:200]
