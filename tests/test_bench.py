"""The benchmark's FLOP count (the numerator of its MFU figure) against torch's own FLOP counter."""

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from maskdiff.core.batch import collate
from maskdiff.core.elbo import position_nats
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.schedules import ModalitySchedules, make_schedule
from maskdiff.core.tokens import Field, Record, Support, VocabSpec

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import bench  # noqa: E402


def test_training_flops_match_the_counted_matrix_products():
    spec = VocabSpec([Support("text/bpe", "text", 500)])
    torch.manual_seed(0)
    model = Denoiser(spec, DenoiserConfig(dim=64, depth=3, heads=4))
    batch = collate([Record([Field("text", "text/bpe", torch.randint(0, 500, (128,)).numpy())]) for _ in range(2)], spec)
    masked = torch.rand(batch.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    schedules = ModalitySchedules({0: make_schedule("linear")})
    with FlopCounterMode(display=False) as counter:
        position_nats(model, batch, schedules, torch.full((2,), 0.5), masked).sum().backward()
    attention = 12.0 * 3 * 128 * 64 * 256  # depth * seq * dim per token, forward + backward: not counted for the CPU kernel
    formula = bench.training_flops(model, 256, int(masked.sum()), 128)
    assert abs(formula - attention - counter.get_total_flops()) < 0.01 * counter.get_total_flops()
