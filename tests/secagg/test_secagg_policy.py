"""The [secagg] table: defaults, what it refuses, and errors that name the key."""

from __future__ import annotations

import pytest

from fedgate.canonical import canonical_json
from fedgate.errors import PolicyError
from fedgate.secagg import SecAggPolicy, parse_secagg_policy


def test_defaults_and_to_json() -> None:
    policy = parse_secagg_policy({})
    assert policy == SecAggPolicy() and not policy.enabled and policy.honest == 3
    assert parse_secagg_policy({"enabled": True, "threshold": 4}).assumed_honest == 4  # t defaults to the threshold
    canonical_json(policy.to_json())  # hashable with the rest of the policy
    assert policy.to_json() == {"enabled": False, "threshold": 3, "assumed_honest": 3, "require": True}


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"enabled": "yes"}, "secagg.enabled"),
        ({"threshold": 1}, "secagg.threshold"),
        ({"threshold": True}, "secagg.threshold"),
        ({"threshold": 3, "assumed_honest": 4}, "secagg.assumed_honest"),
        ({"assumed_honest": 0}, "secagg.assumed_honest"),
        ({"require": 1}, "secagg.require"),
        ({"treshold": 3}, "treshold"),
    ],
)
def test_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
        parse_secagg_policy(table)
