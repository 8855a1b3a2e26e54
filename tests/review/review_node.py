"""A node that holds one reply for review and prints the outcome once decided; killed and
restarted by test_restart.py. The instruction is the same each time (as a re-delivered task
is); the gate's noise is fresh each time, so each attempt holds different bytes."""

import hashlib
import json
import sys
from pathlib import Path

from conftest import gate_for, instruction, through_gate
from fedgate.flower_adapter import recorddict_to_bytes, set_message_id
from malicious_apps import honest

ins = instruction(created_at=1_800_000_000.0)
set_message_id(ins, "restart-test-instruction")
gate = gate_for(Path(sys.argv[1]), review_mode="always", review_timeout_s=300.0)
print("ready", flush=True)
outcome = through_gate(gate, ins, honest)
message = outcome.message
sent = message is not None and outcome.decision.sent
digest = hashlib.sha256(recorddict_to_bytes(message.content)).hexdigest() if message is not None and sent else ""
print(json.dumps({"sent": outcome.decision.sent, "rule": outcome.decision.rule, "sha256": digest}), flush=True)
