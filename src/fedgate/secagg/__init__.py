"""Secure aggregation run by the hospital's gate (Flower's SecAgg+, keys never in the sandbox).

Only the policy is imported here (`fedgate.policy` imports it); the rest from its module:

    fedgate.secagg.policy      parse_secagg_policy(table) -> SecAggPolicy      the [secagg] table
    fedgate.secagg.handler     handlers_for(policy, secagg) -> handlers        for HospitalConfig.handlers
    fedgate.secagg.workflow    GateSecAggPlusWorkflow, SecAggRoundFailed        the ServerApp's side
    fedgate.secagg.accounting  sum_bound(...) -> SumBound                       the bound for the sum
    fedgate.secagg.records     secagg_summary(hospital_dirs, run_id)            summary.json's `secagg`
    fedgate.secagg.protocol    ClientSession, check_stage_reply                 the keys and the allow-list
    fedgate.secagg.masks, .encoding, .legacy                                    ChaCha20 masks, integers, layout
"""

from fedgate.secagg.policy import SecAggPolicy, parse_secagg_policy

__all__ = ["SecAggPolicy", "parse_secagg_policy"]
