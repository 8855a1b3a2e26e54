"""A ServerApp that keeps every byte it receives, so tests can search it for the canary."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from model_fixtures import array_record, tiny_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # Beside the run's metrics file: the one folder the server side may write to in simulation.
    capture = Path(str(context.run_config["metrics-file"])).parent / Path(str(context.run_config["capture-file"])).name
    expected = int(context.run_config["num-hospitals"])
    deadline = time.monotonic() + 60
    while len(node_ids := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.1)  # nodes register with the in-memory link a moment after start
    received = bytearray()
    phases = str(context.run_config.get("phases", "train:1,evaluate:1,train:2")).split(",")
    for message_type, server_round in (phase.split(":") for phase in phases):
        messages = [
            Message(
                RecordDict(
                    {"arrays": array_record(tiny_model()), "config": ConfigRecord({"server-round": server_round})}
                ),
                dst_node_id=node,
                message_type=message_type,
            )
            for node in node_ids
        ]
        for reply in grid.send_and_receive(messages, timeout=120):
            received += message_to_proto(reply).SerializeToString()
            if reply.has_error():
                received += reply.error.reason.encode()
    capture.write_bytes(bytes(received))
