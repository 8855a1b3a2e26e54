"""The `[secagg]` table in the hospital's policy and what `fedgate demo --secagg` wires from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgate.errors import FedgateError, PolicyError
from fedgate.executor.simulation import RunSpec, run_federation
from fedgate.policy import parse_policy
from fedgate.policy.model import default_policy_text
from fedgate.secagg.handler import SecAggHandler, handlers_for
from fedgate.secagg.policy import with_secagg_table
from fedgate.secagg.records import secagg_summary


def test_the_policy_reads_secagg_and_a_policy_without_it_keeps_its_hash() -> None:
    text = default_policy_text()
    plain = parse_policy(text)
    secure = parse_policy(with_secagg_table(text, 5))
    assert not plain.secagg.enabled and "secagg" not in plain.to_json()
    assert secure.secagg.enabled and secure.secagg.threshold == 3 and secure.to_json()["secagg"]["threshold"] == 3
    assert secure.hash != plain.hash
    assert parse_policy(text + "\n[secagg]\nenabled = false\n").hash == plain.hash
    assert handlers_for(plain, plain.secagg) == ()
    [handler] = handlers_for(secure, secure.secagg)
    assert isinstance(handler, SecAggHandler) and handler.require


def test_distributed_noise_outside_secagg_is_refused_by_the_policy() -> None:
    """Each hospital adds sigma / sqrt(t): a reply sent outside a sum would carry too little noise."""
    text = default_policy_text().replace('noise_mode = "local"', 'noise_mode = "distributed"')
    with pytest.raises(PolicyError, match=r"secagg\.require"):
        parse_policy(text + "\n[secagg]\nenabled = true\nrequire = false\n")
    policy = parse_policy(text + "\n[secagg]\nenabled = true\nthreshold = 3\nassumed_honest = 2\n")
    assert policy.sigma == pytest.approx(policy.noise_multiplier * policy.clip_norm / 2**0.5)


def test_secagg_without_the_sandbox_is_refused_before_anything_starts(tmp_path: Path) -> None:
    policy = parse_policy(with_secagg_table(default_policy_text(), 3))
    spec = RunSpec("fedgate_medical.client_app_legacy:app", "fedgate_medical.server_app_secagg:app", 3, 1,
                   tmp_path / "out", policy, isolation="none")  # fmt: skip
    with pytest.raises(FedgateError, match="SecAgg\\+ needs the sandbox"):
        run_federation(spec)
    assert not (tmp_path / "out").exists()


def test_summary_of_a_run_without_secagg(tmp_path: Path) -> None:
    assert secagg_summary([tmp_path / "hospital-0"], 1) == {
        "enabled": False, "num_shares": 0, "threshold": 0, "dropped": []
    }  # fmt: skip
