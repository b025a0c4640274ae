"""Shared test settings: nothing a test does may touch the user's caches, wandb account or data."""

from __future__ import annotations

import os
import tempfile

import torch

# Set before any avseg / wandb import so subprocesses started by tests inherit them too.
_session_cache = tempfile.mkdtemp(prefix="avseg-test-cache-")
os.environ.setdefault("AVSEG_CACHE", _session_cache)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

# One intra-op thread in this process too: every `python -m avseg.train` a test starts runs with
# OMP_NUM_THREADS=1 (helpers_train.train_env), and a test that evaluates its checkpoint in this
# process compares against that run's logged test metrics to 1e-6. On a CPU the rounding of a
# convolution depends on the thread count (avseg.inference); with the same count the two
# evaluations are the same computation.
torch.set_num_threads(1)
