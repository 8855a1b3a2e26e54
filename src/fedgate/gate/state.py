"""What the gate remembers, per hospital: cumulative bits, whether it is halted, the pinned
model manifest and its own round counter. The server picks run ids and round numbers, so
none of this is keyed by them: a new run, a claimed round 99 or a restarted node find the
state where the last reply left it.

The state lives in the hospital's ledger, replaced in the same transaction as each append,
and every signed tree head commits to its hash; reading it is O(1) and fails loudly if
anyone edited it outside the gate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedgate.canonical import decimal_str

SCHEMA = 1
RUNS_KEPT = 256  # per-run figures for the latest runs only: run ids are the server's to choose, state is ours


@dataclass(frozen=True)
class GateState:
    cumulative_bits: float = 0.0  # every reply's bound, sent or refused, since the first
    replies: int = 0
    refused: int = 0
    halted: bool = False
    halt_reason: str = ""
    pinned_manifest: str = ""
    rounds: dict[str, int] = field(default_factory=dict)  # train replies per model manifest
    run_bits: dict[str, float] = field(default_factory=dict)  # per run id, for a per-run budget
    recorded_policies: dict[str, str] = field(default_factory=dict)  # run id -> policy hash in the ledger
    # gate.accounting: merged privacy events of every sent reply ({"record": [...], "hospital": [...]}),
    # and the cumulative ε as the last sent reply recorded it (with δ, accountants and modes)
    privacy_history: dict[str, Any] = field(default_factory=dict)
    privacy_last: dict[str, Any] = field(default_factory=dict)

    def with_policy(self, run_id: int, policy_hash: str) -> GateState:
        recorded = {k: v for k, v in self.recorded_policies.items() if k != str(run_id)}
        recorded[str(run_id)] = policy_hash
        return dataclasses.replace(self, recorded_policies=dict(list(recorded.items())[-RUNS_KEPT:]))

    def gate_round(self, manifest: str) -> int:
        """The round this train reply is, for this model, by the gate's own count (1-based)."""
        return self.rounds.get(manifest, 0) + 1

    def bits_for(self, scope: str, run_id: int) -> float:
        return self.run_bits.get(str(run_id), 0.0) if scope == "run" else self.cumulative_bits

    def after(
        self,
        run_id: int,
        bits: float,
        sent: bool,
        manifest: str,
        counts_round: bool,
        halt: str = "",
        pin: str = "",
        privacy_history: dict[str, Any] | None = None,
        privacy_last: dict[str, Any] | None = None,
    ) -> GateState:
        rounds = dict(self.rounds)
        if counts_round and manifest:
            rounds[manifest] = rounds.get(manifest, 0) + 1
        run_bits = dict(self.run_bits)
        run_bits[str(run_id)] = run_bits.pop(str(run_id), 0.0) + bits  # re-inserted: the latest last
        run_bits = dict(list(run_bits.items())[-RUNS_KEPT:])
        return dataclasses.replace(
            self,
            cumulative_bits=self.cumulative_bits + bits,
            replies=self.replies + 1,
            refused=self.refused + (0 if sent else 1),
            halted=self.halted or bool(halt),
            halt_reason=self.halt_reason or halt,
            pinned_manifest=self.pinned_manifest or pin,
            rounds=rounds,
            run_bits=run_bits,
            privacy_history=self.privacy_history if privacy_history is None else privacy_history,
            privacy_last=self.privacy_last if privacy_last is None else privacy_last,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "cumulative_bits": decimal_str(self.cumulative_bits, 17),
            "replies": self.replies,
            "refused": self.refused,
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "pinned_manifest": self.pinned_manifest,
            "rounds": dict(self.rounds),
            # lists, not objects: canonical JSON sorts keys, and the order (latest last) matters
            "run_bits": [[k, decimal_str(v, 17)] for k, v in self.run_bits.items()],
            "recorded_policies": [[k, v] for k, v in self.recorded_policies.items()],
            "privacy_history": self.privacy_history,
            "privacy_last": self.privacy_last,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateState:
        if not data:
            return cls()
        if data.get("schema") != SCHEMA:
            raise ValueError(f"gate state schema {data.get('schema')!r} is not {SCHEMA}")
        return cls(
            cumulative_bits=float(data["cumulative_bits"]),
            replies=int(data["replies"]),
            refused=int(data["refused"]),
            halted=bool(data["halted"]),
            halt_reason=str(data["halt_reason"]),
            pinned_manifest=str(data["pinned_manifest"]),
            rounds={str(k): int(v) for k, v in dict(data["rounds"]).items()},
            run_bits={str(k): float(v) for k, v in data["run_bits"]},
            recorded_policies={str(k): str(v) for k, v in data["recorded_policies"]},
            privacy_history=dict(data.get("privacy_history") or {}),
            privacy_last=dict(data.get("privacy_last") or {}),
        )
