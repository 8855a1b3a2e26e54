"""Live progress of a run: follows the metrics file the ServerApp appends to (JSON lines
`{round, loss, accuracy, auc}`) and prints one line per round."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

METRICS_FILE = "rounds.jsonl"  # in the run folder; the ServerApp appends one line per round
ROUND_KEYS = ("round", "loss", "accuracy", "auc")


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """The per-round lines the ServerApp appended, each cut to the summary's keys."""
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line being written right now; the next read gets it whole
            rounds.append({k: entry[k] for k in ROUND_KEYS if k in entry})
    return rounds


class RoundPrinter:
    """Polls the metrics file on a thread; stop() prints any round not yet shown."""

    def __init__(self, path: Path, rounds: int, console: Console, started: float) -> None:
        self.path, self.rounds, self.console, self.started = path, rounds, console, started
        self.shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RoundPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._show_new()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._show_new()

    def _show_new(self) -> None:
        for entry in read_rounds(self.path)[self.shown :]:
            self.shown += 1
            label = "initial model" if entry["round"] == 0 else f"round {entry['round']:>3}/{self.rounds}"
            self.console.print(
                f"[bold]{label}[/]  loss {entry['loss']:.4f}  accuracy {entry['accuracy']:.3f}  "
                f"AUC {entry['auc']:.3f}  [dim]{time.monotonic() - self.started:6.1f} s[/]"
            )
