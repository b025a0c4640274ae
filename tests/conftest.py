"""Shared test settings: nothing a test does may touch the user's caches, wandb account or data."""

from __future__ import annotations

import os
import tempfile

# Set before any avseg / wandb import so subprocesses started by tests inherit them too.
_session_cache = tempfile.mkdtemp(prefix="avseg-test-cache-")
os.environ.setdefault("AVSEG_CACHE", _session_cache)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
