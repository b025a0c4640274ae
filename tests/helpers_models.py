"""Tiny model parts the module tests build the same way."""

from __future__ import annotations

import torch

from avseg.models.decomposition import AudioDecomposition


def tiny_decomposition(*, seed: int = 0, **options) -> AudioDecomposition:
    """An `AudioDecomposition` of CPU size (8 codes, 2 heads, FFN 32) built after
    ``torch.manual_seed(seed)``; ``options`` (``dim``, ``num_subspaces``, ``num_layers``, ...) are
    its keywords and override these sizes."""
    torch.manual_seed(seed)
    return AudioDecomposition(**{"codebook_size": 8, "num_heads": 2, "ffn_dim": 32, **options})
