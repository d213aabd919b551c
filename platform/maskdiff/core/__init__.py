"""The science: the token space, masking schedules, batches, the MD4 / GenMD4 ELBO, the denoiser and the samplers.

Nothing here imports the data path, training or the tasks (a test checks).
"""
