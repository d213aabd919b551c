"""The metrics of a run: ``metrics.jsonl`` (one JSON object per log / evaluation), the same scalars as
TensorBoard events, and the one-line console report of each record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maskdiff.config import ConfigError
from .tensorboard_log import TensorBoardLog


class MetricsLog:
    """``metrics.jsonl`` writer (rank 0), and the same scalars as TensorBoard events under ``tensorboard``
    when given; on resume, both drop what lies past the resumed step."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and _metric_step(path, line) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.events = TensorBoardLog(tensorboard, resume_step) if enabled and tensorboard is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.events is not None:
                self.events.write(record)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None


def _metric_step(path: Path, line: str) -> int:
    try:
        step = json.loads(line).get("step", 0)
        if isinstance(step, int):
            return step
    except (ValueError, AttributeError):
        pass
    raise ConfigError(f"{path}: a line is not a metrics record ({line[:60]!r}); repair or remove it to resume")


def report_line(record: dict[str, Any], stop: int) -> str:
    """A ``train`` or ``eval`` metrics record as one console line."""
    step = record["step"]
    bits = " ".join(f"{m} {b:.3f}" for m, b in record["bits_per_token"].items()) or "n/a"
    if record["kind"] != "train":
        return f"step {step}/{stop} held-out bits/token {bits}"
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    line = f"step {step}/{stop} loss {loss} nats/token | bits/token {bits} | {record['tokens_per_s']:,.0f} tok/s"
    if record["skipped_steps"]:
        line += f" | {record['skipped_steps']} step(s) skipped: not finite"
    if record["skipped_records"]:
        line += f" | {record['skipped_records']} record(s) of bad shards skipped"
    if record["w"]:
        line += " | w " + " ".join(f"{m} {s['mean']:.3f}" for m, s in record["w"].items())
    return line


__all__ = ["MetricsLog", "report_line"]
