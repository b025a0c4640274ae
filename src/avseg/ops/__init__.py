"""Multi-scale deformable attention (dispatch between the PyTorch path and the Triton kernels).

Imports torch (and, lazily, ``avseg_kernels`` for the Triton backend) only.
"""

from __future__ import annotations

from avseg.ops.modules import MSDeformAttn
from avseg.ops.ms_deform_attn import (
    BACKENDS,
    BackendUnavailableError,
    ms_deform_attn,
    ms_deform_attn_grid_sample,
    ms_deform_attn_torch,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_torch",
    "resolve_backend",
]
