"""Policy as frozen dataclasses, parsed from TOML with errors that name the bad key."""

from __future__ import annotations

import difflib
import hashlib
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedgate.audit.policy import AuditPolicy
from fedgate.canonical import canonical_json, decimal_str
from fedgate.errors import PolicyError
from fedgate.fab.policy import FabPolicy, parse_fab_policy
from fedgate.secagg.policy import SecAggPolicy, parse_secagg_policy
from fedgate.training.policy import TrainingPolicy

MESSAGE_TYPES = ("train", "evaluate", "query")


@dataclass(frozen=True)
class MetricRule:
    """One allow-listed metric: quantised to `step` within [min, max], in replies of `types`.
    In those replies it is always present (its `min` when the app did not report it), so
    which metrics a reply carries says nothing."""

    step: float
    min: float
    max: float
    types: tuple[str, ...] = MESSAGE_TYPES

    @property
    def levels(self) -> int:
        """How many values the quantised metric can take."""
        return round((self.max - self.min) / self.step) + 1

    def quantise(self, value: float) -> float:
        clipped = min(max(value, self.min), self.max)
        index = round((clipped - self.min) / self.step)
        return min(self.min + index * self.step, self.max)


@dataclass(frozen=True)
class NumExamplesRule:
    mode: str  # "bucket" | "constant"
    step: int
    max: int

    @property
    def levels(self) -> int:
        return 1 if self.mode == "constant" else self.max // self.step

    def quantise(self, value: int) -> int:
        if self.mode == "constant":
            return 1
        bucket = max(1, round(value / self.step)) * self.step
        return min(bucket, (self.max // self.step) * self.step)


@dataclass(frozen=True)
class SandboxPolicy:
    """[sandbox]: where and how the research team's ClientApp runs (see fedgate.sandbox)."""

    allow_downgrade: bool = False
    memory_mb: int = 16384
    processes: int = 256
    cpu_seconds: int = 3600
    timeout_s: float = 3600.0
    scratch_mb: int = 4096
    shm_mb: int = 256
    cache: bool = True
    cache_mb: int = 4096
    file_size_mb: int = 4096
    max_frame_mb: int = 2048

    def to_json(self) -> dict[str, Any]:
        return {
            "allow_downgrade": self.allow_downgrade,
            "memory_mb": self.memory_mb,
            "processes": self.processes,
            "cpu_seconds": self.cpu_seconds,
            "timeout_s": decimal_str(self.timeout_s),
            "scratch_mb": self.scratch_mb,
            "shm_mb": self.shm_mb,
            "cache": self.cache,
            "cache_mb": self.cache_mb,
            "file_size_mb": self.file_size_mb,
            "max_frame_mb": self.max_frame_mb,
        }


@dataclass(frozen=True)
class PrivacyPolicy:
    """[privacy]: the (ε, δ) the hospital enforces. Every sent reply's ε (the round's and the
    cumulative, across runs) is recorded at `delta`; with `max_epsilon`, a round that would
    take the cumulative ε at `level` past it is refused before any code runs."""

    delta: float = 1e-5
    max_epsilon: float | None = None
    level: str = "record"  # "record": per patient; "hospital": the hospital's whole update

    def to_json(self) -> dict[str, Any]:
        limit = None if self.max_epsilon is None else decimal_str(self.max_epsilon)
        return {"delta": decimal_str(self.delta), "max_epsilon": limit, "level": self.level}


@dataclass(frozen=True)
class ReleasePolicy:
    """[release]: when a reply may leave. Its release time is the only thing about timing the
    server sees, so the gate sets it: the first of `max_slots` slots of `slot_s` seconds after
    the instruction arrived by which the reply is ready; a reply not ready by the last slot is
    refused, released at one more fixed time. The bound counts log2(max_slots + 1) bits per
    reply for timing."""

    slot_s: float = 0.5
    max_slots: int = 1024

    @property
    def bits(self) -> float:
        return math.log2(self.max_slots + 1)

    @property
    def horizon_s(self) -> float:
        return self.slot_s * self.max_slots

    def to_json(self) -> dict[str, Any]:
        return {"slot_s": decimal_str(self.slot_s), "max_slots": self.max_slots}


@dataclass(frozen=True)
class Policy:
    approved_manifest: str
    clip_norm: float
    noise_multiplier: float
    noise_mode: str
    hospitals: int
    metrics: tuple[tuple[str, MetricRule], ...]
    num_examples: NumExamplesRule
    allowed_types: tuple[str, ...]
    on_refusal: str
    max_total_bits: float
    review_mode: str = "never"
    review_timeout_s: float = 3600.0
    sandbox: SandboxPolicy = SandboxPolicy()
    release: ReleasePolicy = ReleasePolicy()
    budget_scope: str = "hospital"
    fab: FabPolicy = field(default_factory=FabPolicy)
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    training: TrainingPolicy = field(default_factory=TrainingPolicy)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    audit: AuditPolicy = field(default_factory=AuditPolicy)

    def review_required(self, gate_round: int, warnings: tuple[str, ...]) -> bool:
        """`gate_round` is the gate's own count of train replies for the model in force,
        never the round number the server claims."""
        if self.review_mode == "always":
            return True
        if self.review_mode == "on-warning":
            return bool(warnings)
        if self.review_mode.startswith("first-rounds:"):  # train replies (gate round >= 1) only
            return 1 <= gate_round <= int(self.review_mode.split(":", 1)[1])
        return False

    @property
    def metric_rules(self) -> dict[str, MetricRule]:
        return dict(self.metrics)

    def metrics_for(self, category: str) -> list[tuple[str, MetricRule]]:
        """The metrics a reply of this type always carries, in canonical (sorted) order."""
        return sorted((name, rule) for name, rule in self.metrics if category in rule.types)

    @property
    def sigma(self) -> float:
        """The standard deviation this hospital adds to each coordinate of the update."""
        sigma = self.noise_multiplier * self.clip_norm
        # distributed: a share of sigma that only the sum of t honest replies brings back to sigma
        # (under SecAgg+, t is [secagg] assumed_honest, and the gate states the bound for the sum)
        shares = self.secagg.assumed_honest if self.secagg.enabled else self.hospitals
        return sigma / math.sqrt(shares) if self.noise_mode == "distributed" else sigma

    def to_json(self) -> dict[str, Any]:
        """The effective policy, floats as decimal strings: this is what gets hashed."""
        out: dict[str, Any] = {
            "manifest": {"approved": self.approved_manifest},
            "update": {
                "clip_norm": decimal_str(self.clip_norm),
                "noise_multiplier": decimal_str(self.noise_multiplier),
                "noise_mode": self.noise_mode,
                "hospitals": self.hospitals,
            },
            "metrics": {
                name: {
                    "step": decimal_str(r.step),
                    "min": decimal_str(r.min),
                    "max": decimal_str(r.max),
                    "types": list(r.types),
                }
                for name, r in self.metrics
            },
            "num_examples": {
                "mode": self.num_examples.mode,
                "step": self.num_examples.step,
                "max": self.num_examples.max,
            },
            "messages": {"allowed_types": list(self.allowed_types)},
            "refusal": {"on_refusal": self.on_refusal},
            "review": {"mode": self.review_mode, "timeout_s": decimal_str(self.review_timeout_s)},
            "sandbox": self.sandbox.to_json(),
            "release": self.release.to_json(),
            "budget": {"max_total_bits": decimal_str(self.max_total_bits), "scope": self.budget_scope},
            "fab": self.fab.to_json(),
            "training": {
                key: decimal_str(value) if isinstance(value, float) else value
                for key, value in self.training.to_dict().items()
            },
            "privacy": self.privacy.to_json(),
        }
        if self.secagg.enabled:  # only then: a policy without SecAgg+ keeps the hash it had
            out["secagg"] = self.secagg.to_json()
        if self.audit != AuditPolicy():  # likewise: a policy without [audit] keeps its hash
            out["audit"] = self.audit.to_json()
        return out

    @property
    def hash(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()


def default_policy_text() -> str:
    return resources.files("fedgate.policy").joinpath("default.toml").read_text()


class _Section:
    """Reads one TOML table, remembering which keys were used so that unknown ones are errors."""

    def __init__(self, data: dict[str, Any], name: str) -> None:
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise PolicyError(f"[{name}] must be a table")
        self.raw, self.name = raw, name
        self.used: set[str] = set()

    def get(self, key: str, kind: type, default: Any) -> Any:
        self.used.add(key)
        value = self.raw.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PolicyError(f"{self.name}.{key} must be {kind.__name__}, got {value!r}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            hints = [
                f"{key} (did you mean {match[0]}?)" if (match := difflib.get_close_matches(key, self.used, 1)) else key
                for key in unknown
            ]
            raise PolicyError(f"unknown key(s) in [{self.name}]: {', '.join(hints)}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise PolicyError(f"{key}: {message}")


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{source} is not valid TOML: {err}") from err
    known = {
        "manifest", "update", "metrics", "num_examples", "messages", "refusal", "review", "sandbox", "release",
        "budget", "fab", "secagg", "training", "privacy", "audit",
    }  # fmt: skip
    unknown = sorted(set(data) - known)
    _require(not unknown, "policy", f"unknown table(s) {unknown}; expected {sorted(known)}")

    manifest = _Section(data, "manifest")
    approved = manifest.get("approved", str, "").lower()
    manifest.finish()
    _require(
        approved == "" or (len(approved) == 64 and all(c in "0123456789abcdef" for c in approved)),
        "manifest.approved",
        "must be empty or a 64-hex-digit SHA-256",
    )

    update = _Section(data, "update")
    clip_norm = update.get("clip_norm", float, 1.0)
    noise_multiplier = update.get("noise_multiplier", float, 0.01)
    noise_mode = update.get("noise_mode", str, "local")
    hospitals = update.get("hospitals", int, 1)
    update.finish()
    _require(math.isfinite(clip_norm) and clip_norm > 0, "update.clip_norm", f"must be > 0, got {clip_norm}")
    _require(
        math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        "update.noise_multiplier",
        f"must be >= 0, got {noise_multiplier}",
    )
    _require(
        noise_mode in ("local", "distributed"),
        "update.noise_mode",
        f"must be 'local' or 'distributed', got {noise_mode!r}",
    )
    _require(hospitals >= 1, "update.hospitals", f"must be >= 1, got {hospitals}")

    raw_metrics = data.get("metrics", {})
    _require(isinstance(raw_metrics, dict), "metrics", "must be a table of name = {step, min, max}")
    metrics: list[tuple[str, MetricRule]] = []
    for name, rule in sorted(raw_metrics.items()):
        _require(name != "num-examples", f"metrics.{name}", "num-examples is set in [num_examples]")
        _require(isinstance(rule, dict), f"metrics.{name}", "must be {step = ..., min = ..., max = ...}")
        section = _Section({name: rule}, name)
        section.name = f"metrics.{name}"
        step = section.get("step", float, None)
        lo = section.get("min", float, None)
        hi = section.get("max", float, None)
        types = section.get("types", list, list(MESSAGE_TYPES))
        section.finish()
        _require(step > 0 and math.isfinite(step), f"metrics.{name}.step", "must be > 0")
        _require(math.isfinite(lo) and math.isfinite(hi) and lo < hi, f"metrics.{name}", "needs finite min < max")
        _require(
            bool(types) and all(t in MESSAGE_TYPES for t in types),
            f"metrics.{name}.types",
            f"must be a non-empty subset of {list(MESSAGE_TYPES)}, got {types}",
        )
        metrics.append((name, MetricRule(step, lo, hi, tuple(sorted(set(types))))))

    num = _Section(data, "num_examples")
    num_rule = NumExamplesRule(num.get("mode", str, "bucket"), num.get("step", int, 100), num.get("max", int, 100000))
    num.finish()
    _require(
        num_rule.mode in ("bucket", "constant"),
        "num_examples.mode",
        f"must be 'bucket' or 'constant', got {num_rule.mode!r}",
    )
    _require(num_rule.step >= 1, "num_examples.step", "must be >= 1")
    _require(num_rule.max >= num_rule.step, "num_examples.max", "must be >= step")

    messages = _Section(data, "messages")
    allowed = messages.get("allowed_types", list, ["train", "evaluate"])
    messages.finish()
    bad = [t for t in allowed if t not in MESSAGE_TYPES]
    _require(
        not bad and bool(allowed),
        "messages.allowed_types",
        f"must be a non-empty subset of {list(MESSAGE_TYPES)}; bad: {bad}",
    )

    refusal = _Section(data, "refusal")
    on_refusal = refusal.get("on_refusal", str, "continue")
    refusal.finish()
    _require(
        on_refusal in ("continue", "halt"), "refusal.on_refusal", f"must be 'continue' or 'halt', got {on_refusal!r}"
    )

    review = _Section(data, "review")
    review_mode = review.get("mode", str, "never")
    review_timeout_s = review.get("timeout_s", float, 3600.0)
    review.finish()
    rounds = review_mode.removeprefix("first-rounds:")
    _require(
        review_mode in ("never", "always", "on-warning")
        or (review_mode.startswith("first-rounds:") and rounds.isdigit() and int(rounds) >= 1),
        "review.mode",
        f"must be 'never', 'always', 'on-warning' or 'first-rounds:N' (N >= 1), got {review_mode!r}",
    )
    _require(0 < review_timeout_s < math.inf, "review.timeout_s", f"must be > 0 seconds, got {review_timeout_s}")

    sandbox_policy = _parse_sandbox(_Section(data, "sandbox"))
    release = _Section(data, "release")
    release_policy = ReleasePolicy(release.get("slot_s", float, 0.5), release.get("max_slots", int, 1024))
    release.finish()
    _require(
        0 < release_policy.slot_s <= 3600, "release.slot_s", f"must be in (0, 3600] s, got {release_policy.slot_s}"
    )
    _require(
        1 <= release_policy.max_slots <= 1 << 20,
        "release.max_slots",
        f"must be in [1, 1048576], got {release_policy.max_slots}",
    )

    budget = _Section(data, "budget")
    max_total_bits = budget.get("max_total_bits", float, 0.0)
    budget_scope = budget.get("scope", str, "hospital")
    budget.finish()
    _require(
        max_total_bits >= 0 and math.isfinite(max_total_bits), "budget.max_total_bits", "must be >= 0 (0: no limit)"
    )
    _require(
        budget_scope in ("hospital", "run"),
        "budget.scope",
        f"must be 'hospital' (across every run) or 'run', got {budget_scope!r}",
    )

    audit = AuditPolicy.from_dict(data.get("audit", {}))
    # The audit runs after the app and before the last release slot: it must fit well inside the horizon.
    _require(
        audit.reserve_s() <= release_policy.horizon_s / 2,
        "audit.budget_s",
        f"{audit.budget_s:g} s leaves too little of the release horizon ({release_policy.horizon_s:g} s = "
        "release.slot_s x release.max_slots) for the ClientApp: keep it at most half of it",
    )
    secagg = _parse_secagg(data.get("secagg", {}), noise_mode)
    training = _parse_training(data.get("training", {}))
    # SecAgg+'s collect stage runs the research team's ClientApp; trusted mode promises none runs.
    _require(
        not (secagg.enabled and training.allows_trusted),
        "training.mode",
        f"{training.mode!r} cannot be combined with [secagg] enabled yet: SecAgg+ runs the research team's "
        "ClientApp at its collect stage, which trusted mode promises never happens; turn one of them off",
    )
    return Policy(
        approved_manifest=approved,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        noise_mode=noise_mode,
        hospitals=hospitals,
        metrics=tuple(metrics),
        num_examples=num_rule,
        allowed_types=tuple(allowed),
        on_refusal=on_refusal,
        max_total_bits=max_total_bits,
        review_mode=review_mode,
        review_timeout_s=review_timeout_s,
        sandbox=sandbox_policy,
        release=release_policy,
        budget_scope=budget_scope,
        fab=_parse_fab(data.get("fab", {})),
        secagg=secagg,
        training=training,
        privacy=_parse_privacy(_Section(data, "privacy")),
        audit=audit,
    )


def _parse_training(table: Any) -> TrainingPolicy:
    _require(isinstance(table, dict), "training", "must be a table")
    return TrainingPolicy.from_dict(table)


def _parse_privacy(section: _Section) -> PrivacyPolicy:
    delta = section.get("delta", float, 1e-5)
    max_epsilon = section.get("max_epsilon", float, 0.0)
    level = section.get("level", str, "record")
    section.finish()
    _require(0 < delta < 1, "privacy.delta", f"must be in (0, 1), got {delta}")
    _require(math.isfinite(max_epsilon) and max_epsilon >= 0, "privacy.max_epsilon", "must be >= 0 (0: no limit)")
    _require(level in ("record", "hospital"), "privacy.level", f"must be 'record' or 'hospital', got {level!r}")
    return PrivacyPolicy(delta, max_epsilon or None, level)


def _parse_secagg(table: Any, noise_mode: str) -> SecAggPolicy:
    secagg = parse_secagg_policy(table)
    _require(
        not (secagg.enabled and noise_mode == "distributed" and not secagg.require),
        "secagg.require",
        "must be true with noise_mode = 'distributed': a reply outside SecAgg+ would carry only sigma/sqrt(t)",
    )
    return secagg


def _parse_fab(table: Any) -> FabPolicy:
    _require(isinstance(table, dict), "fab", "must be a table")
    return parse_fab_policy(table)


def _parse_sandbox(section: _Section) -> SandboxPolicy:
    default = SandboxPolicy()
    values: dict[str, Any] = {}
    for name, kind in (
        ("allow_downgrade", bool), ("memory_mb", int), ("processes", int), ("cpu_seconds", int),
        ("timeout_s", float), ("scratch_mb", int), ("shm_mb", int), ("cache", bool), ("cache_mb", int),
        ("file_size_mb", int), ("max_frame_mb", int),
    ):  # fmt: skip
        values[name] = section.get(name, kind, getattr(default, name))
    section.finish()
    minimum = {"memory_mb": 256, "processes": 8, "cpu_seconds": 1, "scratch_mb": 16, "shm_mb": 1, "cache_mb": 1,
               "file_size_mb": 1, "max_frame_mb": 1}  # fmt: skip
    for name, low in minimum.items():
        _require(values[name] >= low, f"sandbox.{name}", f"must be >= {low}, got {values[name]}")
    _require(0 < values["timeout_s"] < math.inf, "sandbox.timeout_s", f"must be > 0 seconds, got {values['timeout_s']}")
    return SandboxPolicy(**values)


def load_policy(path: Path | None) -> Policy:
    """The policy at `path`, or the shipped default when `path` is None."""
    if path is None:
        return parse_policy(default_policy_text(), "default policy")
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {path} does not exist (create one with `fedgate policy init {path}`)")
    return parse_policy(path.read_text(), str(path))
