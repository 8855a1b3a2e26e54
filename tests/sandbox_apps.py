"""ClientApps that abuse the sandbox's protocol and lifetime, for tests/sandbox. Each is picked
by the run config's `behaviour` (`train` messages only)."""

from __future__ import annotations

import os
import struct
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _answer_fd() -> int:
    from fedgate.sandbox import worker

    return worker.ANSWER_FD


@app.train()
def train(msg: Message, context: Context) -> Message:
    behaviour = str(context.run_config.get("behaviour", "honest"))
    if behaviour == "sleep":  # past the deadline, then write an answer for whoever reads next
        time.sleep(float(str(context.run_config.get("sleep-s", 30))))
    elif behaviour == "garbage":  # not a frame at all
        os.write(_answer_fd(), b"\xff\xff\xff\xffnot a frame")
        os._exit(0)
    elif behaviour == "huge-frame":  # a length prefix far over the limit
        os.write(_answer_fd(), struct.pack(">I", 0xFFFFFFF0))
        os._exit(0)
    elif behaviour == "wrong-keys":
        os.write(_answer_fd(), b'\x00\x00\x00\x0b{"ok":true}')
        os._exit(0)
    elif behaviour == "crash":
        raise ValueError("a bug in the research team's code")
    elif behaviour == "exit":
        os._exit(3)
    elif behaviour == "daemon":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
    elif behaviour == "leave-scratch":  # a file in /tmp and /dev/shm for the next task to find
        for root in ("/tmp", "/dev/shm"):
            with open(f"{root}/left-behind", "w") as handle:
                handle.write("from an earlier task")
    elif behaviour == "find-scratch":
        found = sum(os.path.exists(f"{root}/left-behind") for root in ("/tmp", "/dev/shm"))
        return Message(RecordDict({"metrics": MetricRecord({"found": found})}), reply_to=msg)
    elif behaviour == "fill-cache":
        with open("/cache/decoded.bin", "wb") as handle:
            handle.write(b"x" * 1000)
        with open("/cache/tool", "wb") as handle:
            handle.write(b"#!/bin/sh\n")
        os.chmod("/cache/tool", 0o4755)
        os.symlink("/etc/passwd", "/cache/link")
    elif behaviour == "read-cache":
        size = os.path.getsize("/cache/decoded.bin") if os.path.exists("/cache/decoded.bin") else -1
        return Message(RecordDict({"metrics": MetricRecord({"size": size})}), reply_to=msg)
    elif behaviour == "count":  # how many tasks this process has seen: each task is a fresh process
        state = context.state.metric_records.get("seen", MetricRecord({"n": 0}))
        context.state["seen"] = MetricRecord({"n": int(state["n"]) + 1})
        return Message(RecordDict({"metrics": MetricRecord({"n": int(state["n"]) + 1,
                                                            "pid": os.getpid()})}), reply_to=msg)  # fmt: skip
    return Message(RecordDict({"metrics": MetricRecord({"pid": os.getpid()})}), reply_to=msg)
