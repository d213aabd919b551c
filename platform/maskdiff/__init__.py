"""maskdiff: multimodal masked diffusion (MD4 / GenMD4) over one shared token space."""

from maskdiff.core.batch import Batch, collate, split
from maskdiff.core.elbo import ELBOResult, elbo
from maskdiff.core.model import Denoiser, DenoiserConfig
from maskdiff.core.sampler import sample, time_grid
from maskdiff.core.schedules import ModalitySchedules, Schedule, make_schedule
from maskdiff.core.tokens import MISSING, Field, Record, Support, VocabMismatchError, VocabSpec

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A trained model bundle (``runs/<name>/bundle``, or the run directory): :func:`maskdiff.bundle.load_bundle`."""
    from .bundle import load_bundle

    return load_bundle(path, device=device)


__all__ = [
    "Batch", "collate", "split", "ELBOResult", "elbo", "Denoiser", "DenoiserConfig", "sample", "time_grid",
    "ModalitySchedules", "Schedule", "make_schedule", "MISSING", "Field", "Record", "Support",
    "VocabMismatchError", "VocabSpec", "load",
]
