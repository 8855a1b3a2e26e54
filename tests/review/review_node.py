"""A node that holds one reply for review and prints the outcome once decided; killed and
restarted by test_restart.py. The instruction id is fixed, as a re-delivered task's is."""

import dataclasses
import json
import sys
from pathlib import Path

from conftest import instruction
from fedgate.gate.pipeline import GatePipeline
from fedgate.policy import load_policy
from malicious_apps import honest

folder = Path(sys.argv[1])
policy = dataclasses.replace(load_policy(None), review_mode="always", review_timeout_s=300.0)
ins = instruction()
ins.metadata.__dict__["_message_id"] = "restart-test-instruction"
outcome = GatePipeline(policy, folder, folder.name, "test://server").process_with_evidence(ins, honest(ins))
print(json.dumps({"sent": outcome.decision.sent, "rule": outcome.decision.rule}), flush=True)
