"""The end of a finished run: its inference bundle, with the training length distributions, and its loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from omegaconf import DictConfig

from maskdiff.core import modalities
from maskdiff.config import RunConfig
from .run_dir import BUNDLE, METRICS, PLOTS
from maskdiff.data.shards import ShardSet, field_lengths
from maskdiff.data.split import training_records
from maskdiff.core.tokens import VocabSpec


def training_lengths(shards: ShardSet, rc: RunConfig) -> dict[str, dict[int, int]]:
    """Length distribution of the variable-length fields of these shards' training records (all ranks' shards)."""
    every = ShardSet(shards.dirs, rank=0, world_size=1, bad_shards=rc.data.bad_shards)
    return field_lengths(training_records(every, rc.data.heldout))


def export_run(run_dir: Path, module: torch.nn.Module, cfg: DictConfig, rc: RunConfig, spec: VocabSpec, sets: Mapping[str, ShardSet],
               step: int, heldout_bits: dict[str, float]) -> Path:
    """Write ``RUN/bundle`` (and ``RUN/plots`` unless ``train.plots=false``); the bundle's path."""
    from maskdiff.bundle import export_bundle
    from .plots import plot_metrics

    lengths = {m: training_lengths(s, rc) for m, s in sets.items() if modalities.get(m).keeps_lengths}  # their samplers draw a length
    bundle = export_bundle(run_dir / BUNDLE, module, cfg, spec, {key: a for s in sets.values() for key, a in s.adapters.items()},
                           step=step, metrics={"heldout_bits_per_token": heldout_bits}, lengths=lengths)
    if rc.train.plots:
        plot_metrics(run_dir / METRICS, run_dir / PLOTS)
    return bundle


__all__ = ["export_run", "training_lengths"]
