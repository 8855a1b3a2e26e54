"""When a reply leaves. The gate, not the ClientApp, sets it: replies are released only at
slot boundaries counted from the instruction's arrival, so the ClientApp's compute time (or
a deliberate delay) moves the release by whole slots at most. A reply not ready by the last
slot is refused, and that refusal leaves at one more fixed time, twice the horizon after the
arrival — not when the late answer came. So `max_slots + 1` possible times:
log2(max_slots + 1) bits per reply, counted in the bound."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from fedgate.canonical import decimal_str
from fedgate.policy.model import ReleasePolicy


@dataclass(frozen=True)
class Release:
    arrived: float  # wall clock, when the gate received the instruction
    ready: float  # when the gate had its decision
    slot: int  # 1..max_slots
    at: float  # arrived + slot * slot_s: the only time the server learns
    late: bool  # ready after the last slot: refused, released at the last slot

    def to_json(self) -> dict[str, Any]:
        return {
            "arrived": decimal_str(self.arrived, 17),
            "ready": decimal_str(self.ready, 17),
            "slot": self.slot,
            "at": decimal_str(self.at, 17),
            "late": self.late,
        }


def schedule(policy: ReleasePolicy, arrived: float, ready: float) -> Release:
    slot = max(1, math.ceil((ready - arrived) / policy.slot_s))
    if slot > policy.max_slots:
        return Release(arrived, ready, policy.max_slots + 1, arrived + 2 * policy.horizon_s, True)
    return Release(arrived, ready, slot, arrived + slot * policy.slot_s, False)


def after_review(policy: ReleasePolicy, release: Release, decided: float) -> Release:
    """A reviewed reply leaves at the first slot boundary (counted from the arrival, as every
    release) after the reviewer's decision: the reviewer's pace, not the ClientApp's, sets it,
    and it still lands on the grid. The review may outlast the horizon; that is the human's
    call, so it is not refused as late."""
    slot = max(release.slot, math.ceil((decided - release.arrived) / policy.slot_s))
    return Release(release.arrived, release.ready, slot, release.arrived + slot * policy.slot_s, False)


def wait_until(moment: float) -> None:
    """Sleep until the wall-clock `moment` (no earlier; a few ms later is the OS's jitter)."""
    while (left := moment - time.time()) > 0:
        time.sleep(min(left, 1.0))
