"""Training metrics as TensorBoard event files, beside ``metrics.jsonl``.

Each metrics record (``{"kind": "train", "step": 40, "bits_per_token": {"text": 3.1}, ...}``)
becomes one scalar per number it holds, tagged by its kind and key path
(``train/bits_per_token/text``) at the record's step, so TensorBoard shows
exactly the figures of ``metrics.jsonl``: ``tensorboard --logdir RUN/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

TENSORBOARD = "tensorboard"  # the event files' folder in a run directory


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a metrics record (nested keys joined by ``/``), tagged ``<kind>/...``; ``step`` is the x axis."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    kind = str(record.get("kind", "metrics"))
    for key, value in record.items():
        if key not in ("kind", "step"):
            walk(f"{kind}/{key}", value)
    return out


class TensorBoardLog:
    """One event-file writer for a run directory; a resumed run drops the events after its checkpoint's step."""

    def __init__(self, log_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # records come once per log interval: each is on disk when the JSON line is

    def close(self) -> None:
        self.writer.close()


__all__ = ["TENSORBOARD", "TensorBoardLog", "scalars"]
