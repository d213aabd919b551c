"""maskdiff: multimodal masked diffusion (MD4 / GenMD4) over one shared token space."""

from .batch import Batch, collate, split
from .elbo import ELBOResult, elbo
from .model import Denoiser, DenoiserConfig
from .sampler import sample, time_grid
from .schedules import ModalitySchedules, Schedule, make_schedule
from .tokens import MISSING, MODALITIES, Field, Record, Support, VocabMismatchError, VocabSpec

__version__ = "0.1.0"

__all__ = [
    "Batch", "collate", "split", "ELBOResult", "elbo", "Denoiser", "DenoiserConfig", "sample", "time_grid",
    "ModalitySchedules", "Schedule", "make_schedule", "MISSING", "MODALITIES", "Field", "Record", "Support",
    "VocabMismatchError", "VocabSpec",
]
