"""Fixed sinusoidal position codes: 1-D over audio time, 2-D over feature-map pixels."""

from __future__ import annotations

import math

import torch


def sine_position_1d(
    length: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Transformer sinusoid code over positions 0..length-1: [length, dim].

    Channel 2i is sin(t / temperature^(2i/dim)) and channel 2i+1 the matching cosine.
    """
    if length < 0:
        raise ValueError(f"sine_position_1d: length must be >= 0, got {length}")
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(f"sine_position_1d: dim must be a positive even number, got {dim}")
    position = torch.arange(length, device=device, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64) * (-math.log(temperature) / dim))
    angles = position * inv_freq[None, :]  # [length, dim/2]
    code = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # interleave sin, cos
    return code.to(dtype)


def sine_position_2d(
    h: int,
    w: int,
    dim: int,
    *,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Deformable-DETR sine code of a full (unpadded) h x w map: [dim, h, w].

    The first dim/2 channels encode y and the last dim/2 encode x; in each half, channel pairs
    (2i, 2i+1) are (sin, cos) of coord / temperature^(2i/(dim/2)). With `normalize` the
    coordinates are pixel centres scaled to (0, scale): (k + 0.5) / (n + 1e-6) * scale.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"sine_position_2d: h and w must be positive, got {h}x{w}")
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"sine_position_2d: dim must be a positive multiple of 4, got {dim}")
    feats = dim // 2
    y = torch.arange(1, h + 1, device=device, dtype=torch.float64)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float64)
    if normalize:
        eps = 1e-6
        y = (y - 0.5) / (h + eps) * scale
        x = (x - 0.5) / (w + eps) * scale
    exponent = 2 * torch.div(torch.arange(feats, device=device), 2, rounding_mode="floor") / feats
    dim_t = temperature ** exponent.to(torch.float64)  # [feats]

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord[:, None] / dim_t[None, :]  # [n, feats]
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)

    code_y = encode(y)  # [h, feats]
    code_x = encode(x)  # [w, feats]
    code = torch.cat(
        (code_y[:, None, :].expand(h, w, feats), code_x[None, :, :].expand(h, w, feats)), dim=-1
    )  # [h, w, dim]
    return code.permute(2, 0, 1).contiguous().to(dtype)
