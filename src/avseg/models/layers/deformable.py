"""The parts the deformable encoder layer (`avseg.models.fusion`) and decoder layer
(`avseg.models.decoder`) share, built under the key names of Deformable DETR / ReferFormer
checkpoints, which each layer keeps as its own attributes (``init_from`` maps those names): a
multi-scale deformable attention with its dropout and post-LayerNorm, and the post-norm FFN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avseg.ops import MSDeformAttn

__all__ = ["DeformableLayerSpec", "post_norm_ffn"]


@dataclass(frozen=True)
class DeformableLayerSpec:
    """The sizes of a deformable encoder / decoder layer, and the parts those layers share."""

    dim: int
    ffn_dim: int
    dropout: float
    num_levels: int
    num_heads: int
    num_points: int
    backend: str

    def attention_parts(self) -> tuple[MSDeformAttn, nn.Dropout, nn.LayerNorm]:
        """``(attention, dropout, norm)`` for ``norm(x + dropout(attention(...)))``, built in this order."""
        attention = MSDeformAttn(
            dim=self.dim,
            num_levels=self.num_levels,
            num_heads=self.num_heads,
            num_points=self.num_points,
            backend=self.backend,
        )
        return attention, nn.Dropout(self.dropout), nn.LayerNorm(self.dim)

    def ffn_parts(self) -> tuple[nn.Linear, nn.Linear, nn.Dropout, nn.Dropout, nn.LayerNorm]:
        """``(linear1, linear2, dropout_hidden, dropout_out, norm)`` of `post_norm_ffn`, built in this order."""
        dim, ffn_dim, dropout = self.dim, self.ffn_dim, self.dropout
        return (
            nn.Linear(dim, ffn_dim),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(dropout),
            nn.Dropout(dropout),
            nn.LayerNorm(dim),
        )

    def stack(self, layer: Callable[..., nn.Module], num_layers: int) -> nn.ModuleList:
        """``num_layers`` layers ``layer(spec=self)``, built one after the other."""
        return nn.ModuleList(layer(spec=self) for _ in range(num_layers))


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
