"""The DeepSpeed engine: its configuration from the run's, and its start around the model and optimiser."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from .checkpoints import use_safe_loader
from maskdiff.config import RunConfig
from maskdiff.core.joint import JointModel


def deepspeed_config(rc: RunConfig) -> dict[str, Any]:
    ds = rc.deepspeed
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": rc.data.batch_size or 1,  # bookkeeping only: batches are cut by the loader
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg.update(OmegaConf.to_container(OmegaConf.create(dict(ds.extra)), resolve=True))  # type: ignore[arg-type]
    return cfg


def start_engine(model: JointModel, optimizer: torch.optim.Optimizer, scheduler: Any, rc: RunConfig) -> tuple[Any, Any]:
    """(engine, learning-rate scheduler) as DeepSpeed wraps them; its checkpoints load through the safe loader."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(rc))
    use_safe_loader(engine)
    return engine, scheduler


__all__ = ["deepspeed_config", "start_engine"]
