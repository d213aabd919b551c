"""Training under DeepSpeed: the trainer and its rooms (process group, optimiser, time budget, metrics, run directory, checkpoints, held-out evaluation, export).

It builds on :mod:`maskdiff.core` and :mod:`maskdiff.data` (a test checks).
"""
