"""The multi-scale deformable attention module of Deformable DETR (Zhu et al., ICLR 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn

from avseg.ops.ms_deform_attn import BACKENDS, ms_deform_attn
from avseg.precision import autocast_disabled

__all__ = ["MSDeformAttn"]


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 -> fp32; fp32 and fp64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with Deformable DETR's projections and initialisation.

    Each query predicts, per head, level and point, a sampling offset (relative to its reference
    point) and an attention weight (softmax over levels x points); the values of all levels are
    projected, sampled bilinearly at those locations and summed with the weights.

    Args:
        dim: model width C (divisible by ``num_heads``).
        num_levels: L, feature levels in the value.
        num_heads: M.
        num_points: P, sampling points per head and level.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` (see ``avseg.ops.ms_deform_attn``).
    """

    def __init__(
        self,
        *,
        dim: int = 256,
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_levels <= 0 or num_points <= 0:
            raise ValueError(f"MSDeformAttn: num_levels ({num_levels}) and num_points ({num_points}) must be positive")
        if backend not in BACKENDS:
            raise ValueError(f"MSDeformAttn: backend must be one of {BACKENDS}, got {backend!r}")
        self.dim = dim
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.backend = backend

        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation.

        Offsets start at zero weight with a bias that points head h in direction 2*pi*h/M (scaled
        so the larger coordinate is 1) at distances 1..P pixels, the same for every level;
        attention weights start uniform (zero weight and bias); value and output projections are
        Xavier-uniform with zero bias.
        """
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [M, 2]
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        grid = grid * distances  # [M, L, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from queries to the multi-scale value.

        Args:
            query: [N, Lq, C] (position embedding already added).
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (top-left (0, 0)), or
                [N, Lq, L, 4] boxes (cx, cy, w, h): offsets are then scaled by half the box size.
            value_input: [N, S, C], the levels flattened and concatenated.
            spatial_shapes: [L, 2] long, (H, W) per level.
            level_start_index: [L] long.
            value_padding_mask: [N, S] bool, True where the value is padding (zeroed).

        Returns:
            [N, Lq, C].
        """
        num_batch, num_queries, _ = query.shape
        _, num_values, _ = value_input.shape
        if spatial_shapes.shape != (self.num_levels, 2):
            raise ValueError(
                f"MSDeformAttn: spatial_shapes must be [{self.num_levels}, 2], got {tuple(spatial_shapes.shape)}"
            )
        if not torch.compiler.is_compiling():  # a host sync; under torch.compile also a graph break
            level_total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
            if level_total != num_values:
                raise ValueError(
                    f"MSDeformAttn: value_input has S={num_values} positions but spatial_shapes sum to {level_total}"
                )
        head_dim = self.dim // self.num_heads

        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(num_batch, num_values, self.num_heads, head_dim)

        # The sampling geometry (offsets, attention weights, locations) is computed in float32
        # even under autocast: a bf16 location is off by up to W / 256 pixels at level width W
        # (0.65 px at W = 167), and the two projections are small. The value and output
        # projections (the large matrix products) keep the autocast dtype.
        with autocast_disabled():
            offsets = self.sampling_offsets(_upcast(query)).view(
                num_batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
            )
            weights = self.attention_weights(_upcast(query)).view(
                num_batch, num_queries, self.num_heads, self.num_levels * self.num_points
            )
            weights = weights.softmax(-1).view(num_batch, num_queries, self.num_heads, self.num_levels, self.num_points)

            if reference_points.shape[-1] == 2:
                # offsets are in pixels of each level: divide by (W, H)
                normaliser = torch.stack((spatial_shapes[:, 1], spatial_shapes[:, 0]), dim=-1).to(offsets.dtype)
                # one fused op: reference + offsets * (1 / (W, H)) (a division was a third slower)
                locations = torch.addcmul(
                    _upcast(reference_points)[:, :, None, :, None, :], offsets, normaliser.reciprocal()[:, None, :]
                )
            elif reference_points.shape[-1] == 4:
                locations = (
                    _upcast(reference_points)[:, :, None, :, None, :2]
                    + offsets / self.num_points * _upcast(reference_points)[:, :, None, :, None, 2:] * 0.5
                )
            else:
                raise ValueError(
                    "MSDeformAttn: reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape "
                    f"{tuple(reference_points.shape)}"
                )

        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=self.backend)
        return self.output_proj(output)
