"""The parts the deformable encoder layer (`avseg.models.fusion`) and decoder layer
(`avseg.models.decoder`) share, built under the key names of Deformable DETR / ReferFormer
checkpoints, which each layer keeps as its own attributes (``init_from`` maps those names): a
multi-scale deformable attention with its dropout and post-LayerNorm, and the post-norm FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avseg.ops import MSDeformAttn

__all__ = ["deformable_attention_parts", "ffn_parts", "layer_stack", "post_norm_ffn"]


def deformable_attention_parts(
    *, dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int, backend: str
) -> tuple[MSDeformAttn, nn.Dropout, nn.LayerNorm]:
    """``(attention, dropout, norm)`` for ``norm(x + dropout(attention(...)))``, built in this order."""
    attention = MSDeformAttn(
        dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points, backend=backend
    )
    return attention, nn.Dropout(dropout), nn.LayerNorm(dim)


def ffn_parts(
    *, dim: int, ffn_dim: int, dropout: float
) -> tuple[nn.Linear, nn.Linear, nn.Dropout, nn.Dropout, nn.LayerNorm]:
    """``(linear1, linear2, dropout_hidden, dropout_out, norm)`` of `post_norm_ffn`, built in this order."""
    return nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim), nn.Dropout(dropout), nn.Dropout(dropout), nn.LayerNorm(dim)


def post_norm_ffn(
    x: torch.Tensor,
    linear1: nn.Linear,
    linear2: nn.Linear,
    dropout_hidden: nn.Dropout,
    dropout_out: nn.Dropout,
    norm: nn.LayerNorm,
) -> torch.Tensor:
    """``[..., C]`` -> ``norm(x + dropout_out(linear2(dropout_hidden(relu(linear1(x))))))`` ``[..., C]``.

    The relu runs in place: linear1's output is not kept for its backward, and a second
    ``[..., ffn_dim]`` buffer cost more than the relu itself on CPU (fresh pages).
    """
    ffn = linear2(dropout_hidden(F.relu(linear1(x), inplace=True)))
    return norm(x + dropout_out(ffn))


def layer_stack(layer: type[nn.Module], num_layers: int, **layer_args: object) -> nn.ModuleList:
    """``num_layers`` layers ``layer(**layer_args)``, built one after the other."""
    return nn.ModuleList(layer(**layer_args) for _ in range(num_layers))
