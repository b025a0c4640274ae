"""Multi-level projection of backbone features to the model width (Deformable DETR's input_proj)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiLevelProjection(nn.Module):
    """Strides 8/16/32 -> 1x1 conv + GroupNorm(32) to ``dim``; a stride-2 3x3 conv + GN on the
    backbone's stride-32 map adds the stride-64 level.

    ``proj.{0..3}`` is laid out as ReferFormer's ``input_proj.{0..3}`` (``.0`` conv, ``.1`` GN) so
    its weights map by prefix. ``forward([c3, c4, c5]) -> [p3, p4, p5, p6]``, each ``[N, dim, h, w]``.
    """

    def __init__(self, *, in_channels: Sequence[int], dim: int, num_groups: int = 32) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"MultiLevelProjection expects 3 input levels (strides 8/16/32), got {in_channels}")
        layers = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(num_groups, dim)) for c in in_channels]
        layers.append(
            nn.Sequential(
                nn.Conv2d(in_channels[-1], dim, kernel_size=3, stride=2, padding=1), nn.GroupNorm(num_groups, dim)
            )
        )
        self.proj = nn.ModuleList(layers)
        for seq in self.proj:
            nn.init.xavier_uniform_(seq[0].weight, gain=1)
            nn.init.zeros_(seq[0].bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[c3 [N,C3,H/8,W/8], c4, c5]`` -> ``[p3, p4, p5, p6]`` at strides 8/16/32/64, ``dim`` channels."""
        levels = [proj(x) for proj, x in zip(self.proj[:3], features)]
        levels.append(self.proj[3](features[-1]))
        return levels
