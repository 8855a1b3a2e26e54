from __future__ import annotations

import math

import pytest

from fedgate.errors import PolicyError
from fedgate.policy import default_policy_text, load_policy, parse_policy


def test_default_policy_parses_and_hash_is_stable() -> None:
    a = parse_policy(default_policy_text())
    b = load_policy(None)
    assert a == b and a.hash == b.hash and len(a.hash) == 64
    assert a.metric_rules["eval-acc"].levels == 101


def test_hash_changes_with_any_setting() -> None:
    base = parse_policy("")
    assert parse_policy("[update]\nclip_norm = 2.0\n").hash != base.hash
    assert parse_policy('[refusal]\non_refusal = "halt"\n').hash != base.hash


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[update]\nclip_norm = -1\n", "update.clip_norm"),
        ("[update]\nclip_norm = 'big'\n", "update.clip_norm"),
        ("[update]\nnoise_mode = 'global'\n", "update.noise_mode"),
        ("[update]\nclipnorm = 1\n", "clipnorm"),
        ("[metrics]\nacc = { step = 0, min = 0, max = 1 }\n", "metrics.acc.step"),
        ("[metrics]\nacc = { step = 0.1, min = 1, max = 0 }\n", "metrics.acc"),
        ("[metrics]\nacc = { step = 0.1, min = 0, max = 1, unit = 'x' }\n", "unit"),
        ("[num_examples]\nmode = 'exact'\n", "num_examples.mode"),
        ("[messages]\nallowed_types = ['train', 'upload']\n", "messages.allowed_types"),
        ("[manifest]\napproved = 'abc'\n", "manifest.approved"),
        ("[reviews]\nmode = 'always'\n", "reviews"),
        ("[update\n", "not valid TOML"),
    ],
)
def test_bad_policy_names_the_key(text: str, names: str) -> None:
    with pytest.raises(PolicyError, match=names.replace(".", r"\.")):
        parse_policy(text)


def test_distributed_noise_share() -> None:
    policy = parse_policy(
        "[update]\nclip_norm = 2.0\nnoise_multiplier = 1.0\nnoise_mode = 'distributed'\nhospitals = 4\n"
    )
    assert policy.sigma == pytest.approx(1.0)
    assert math.isclose(parse_policy("[update]\nclip_norm = 2.0\nnoise_multiplier = 1.0\n").sigma, 2.0)


def test_missing_file_says_how_to_create_one(tmp_path) -> None:
    with pytest.raises(PolicyError, match="fedgate policy init"):
        load_policy(tmp_path / "policy.toml")


def test_an_audit_budget_that_would_eat_the_release_horizon_is_refused() -> None:
    on = default_policy_text().replace("every_rounds = 0 ", "every_rounds = 1 ", 1)
    text = on.replace("budget_s = 60 ", "budget_s = 400 ", 1)  # the horizon: 0.5 s x 1024 slots = 512 s
    with pytest.raises(PolicyError, match=r"audit\.budget_s"):
        parse_policy(text, "p")
    assert parse_policy(on, "p").audit.budget_s == 60
