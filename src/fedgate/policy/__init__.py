"""The hospital's policy file: what may leave, and how it is clipped, noised and bounded."""

from fedgate.policy.model import (
    MetricRule,
    NumExamplesRule,
    Policy,
    default_policy_text,
    load_policy,
    parse_policy,
)

__all__ = ["MetricRule", "NumExamplesRule", "Policy", "default_policy_text", "load_policy", "parse_policy"]
