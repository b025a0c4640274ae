"""Multi-scale deformable attention: dispatch, the fast PyTorch path and the grid_sample reference.

Semantics are Deformable DETR's op (``docs/DEFORM_ATTN.md``):

    value               [N, S, M, D]            S = sum over levels of H_l * W_l
    spatial_shapes      [L, 2] int64            (H, W) per level
    level_start_index   [L] int64               offset of each level in S
    sampling_locations  [N, Lq, M, L, P, 2]     normalised (x, y), may lie outside [0, 1]
    attention_weights   [N, Lq, M, L, P]        (softmax over L * P is the caller's job)
    returns             [N, Lq, M * D]

Each sample is a bilinear interpolation at pixel coordinates ``(x, y) = (loc_x * W - 0.5,
loc_y * H - 0.5)`` over the four integer corners (floor), corners outside the level count as zero;
the output is the attention-weighted sum over levels and points. This module imports torch (and,
for the Triton backend, ``avseg_kernels``) only.

Backends: ``"torch"`` (this file, any device), ``"triton"`` (``avseg_kernels``; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) and ``"auto"`` (Triton for CUDA tensors, torch otherwise; the
torch path also on CUDA when ``torch.are_deterministic_algorithms_enabled()``, because the Triton
backward accumulates ``grad_value`` with atomics, whose order and so rounding vary between runs).
Nothing falls back silently: a backend that cannot run raises.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ms_deform_attn",
    "ms_deform_attn_grid_sample",
    "ms_deform_attn_torch",
    "resolve_backend",
]

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested deformable-attention backend cannot run for these inputs on this machine."""


# ----------------------------------------------------------------------------------------------
# Input checks and backend choice
# ----------------------------------------------------------------------------------------------


def _check_shapes(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Shape/dtype checks that need no device synchronisation."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    num_batch, _, num_heads, _ = value.shape
    n_loc, num_queries, m_loc, num_levels, num_points, _ = sampling_locations.shape
    if (n_loc, m_loc) != (num_batch, num_heads):
        raise ValueError(
            f"ms_deform_attn: value is [N={num_batch}, S, M={num_heads}, D] but sampling_locations "
            f"has N={n_loc}, M={m_loc}"
        )
    expected_attn = (num_batch, num_queries, num_heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected_attn:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = {expected_attn}, got "
            f"{tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (num_levels, 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be [L={num_levels}, 2], got {tuple(spatial_shapes.shape)}"
        )
    if tuple(level_start_index.shape) != (num_levels,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must be [L={num_levels}], got {tuple(level_start_index.shape)}"
        )
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor, got {tensor.dtype}")
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"ms_deform_attn: {name} must be floating point, got {tensor.dtype}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for tensors on ``device``: ``"torch"`` or ``"triton"``.

    Raises ``ValueError`` for an unknown name and ``BackendUnavailableError`` when ``"triton"`` is
    asked for where it cannot run (no CUDA tensors and ``TRITON_INTERPRET`` is not ``"1"``).
    Under ``torch.use_deterministic_algorithms(True)``: ``"auto"`` picks the torch path (no
    atomics); an explicit ``"triton"`` raises, or warns when ``warn_only=True`` was set, as
    PyTorch does for its own non-deterministic kernels.
    """
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: backend must be one of {BACKENDS}, got {backend!r}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and not deterministic else "torch"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise BackendUnavailableError(
            "ms_deform_attn: backend='triton' needs CUDA tensors (got tensors on "
            f"{device}) or TRITON_INTERPRET=1 (the CPU interpreter, for tests). Use backend='torch' "
            "or 'auto' on this machine."
        )
    if deterministic and device.type == "cuda":
        message = (
            "ms_deform_attn: the Triton backward accumulates grad_value with atomic adds, so it is "
            "not bitwise reproducible; use backend='auto' or 'torch' under "
            "torch.use_deterministic_algorithms(True)"
        )
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, UserWarning, stacklevel=3)
        else:
            raise RuntimeError(message)
    return "triton"


# ----------------------------------------------------------------------------------------------
# The fast PyTorch path. Every sample's four bilinear corners become rows of a zero-padded copy of
# the value with weights; the forward is one embedding_bag (a fused gather-weight-sum, without the
# [N*M, D, Lq, L*P] intermediate of the grid_sample formulation). The backward is hand-written:
# sampled_addmm (an SDDMM on the sampling pattern) gives dot(grad_out, corner value) for the
# location and weight gradients; grad_value is a scatter-add done as a gather (stable sort of the
# samples by position, then embedding_bag), which is deterministic.
#
# Padding: each level is copied into a zero border of PAD_LOW pixels before and PAD_HIGH after,
# and pixel coordinates are clamped to [-2, size + 1]. Every corner then lies inside the padded
# level, so no bounds masks or index clamps are needed, and a clamped (far outside) sample has
# both corners in the zero border along that axis: value and all gradients exactly zero, as
# without padding.
#
# Layout: bag-major. Per-sample tensors are [R, L*P] (R = N*Lq*M bags), corner tensors [R, 4, L*P]
# (corner y0x0, y0x1, y1x0, y1x1; each corner a contiguous run of L*P samples). The inputs are
# already bag-major ([N, Lq, M, L, P(, 2)] is a view of [R, L*P(, 2)]) and embedding_bag wants one
# row of 4*L*P entries per bag, so nothing is transposed; per-level constants broadcast as [L*P] or
# [L*P, 2]. An earlier sample-major layout ([L*P, R]) gave longer inner loops to the elementwise ops
# but paid two transposes of [4*L*P, R] per call: about twice the forward time (docs/DEFORM_ATTN.md).
# ----------------------------------------------------------------------------------------------

PAD_LOW = 2
PAD_HIGH = 3


class _Levels(NamedTuple):
    """Python-side level layout: (H, W), start in the value, padded (Hp, Wp) and padded start."""

    sizes: list[tuple[int, int]]
    starts: list[int]
    padded_sizes: list[tuple[int, int]]
    padded_starts: list[int]
    padded_total: int


def _levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> _Levels:
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    padded_sizes = [(h + PAD_LOW + PAD_HIGH, w + PAD_LOW + PAD_HIGH) for h, w in sizes]
    padded_starts, total = [], 0
    for hp, wp in padded_sizes:
        padded_starts.append(total)
        total += hp * wp
    return _Levels(sizes, starts, padded_sizes, padded_starts, total)


def _pad_value(value: torch.Tensor, levels: _Levels) -> torch.Tensor:
    """[N, S, M, D] -> [N, S_padded, M, D] with each level inside a zero border."""
    num_batch, _, num_heads, head_dim = value.shape
    padded = value.new_zeros((num_batch, levels.padded_total, num_heads, head_dim))
    for (h, w), start, (hp, wp), padded_start in zip(
        levels.sizes, levels.starts, levels.padded_sizes, levels.padded_starts
    ):
        target = padded[:, padded_start : padded_start + hp * wp].view(num_batch, hp, wp, num_heads, head_dim)
        target[:, PAD_LOW : PAD_LOW + h, PAD_LOW : PAD_LOW + w] = value[:, start : start + h * w].view(
            num_batch, h, w, num_heads, head_dim
        )
    return padded


class _Geometry(NamedTuple):
    """Bilinear set-up of every sample (R bags of L*P samples).

    frac: [R, L*P, 2] fractional part of the pixel coordinate (x, y): the weight of the high corner.
    low_row: [R, L*P] row of the low (y0x0) corner; the samples' sort key for grad_value.
    rows: [R, 4, L*P] row in value_padded.view(N*S_padded*M, D) of the corners y0x0, y0x1, y1x0,
    y1x1 of every sample.
    size: [L*P, 2] (W, H) of each sample's level, compute dtype.
    """

    frac: torch.Tensor
    low_row: torch.Tensor
    rows: torch.Tensor
    size: torch.Tensor


def _geometry(sampling_locations: torch.Tensor, levels: _Levels, index_dtype: torch.dtype) -> _Geometry:
    num_batch, num_queries, num_heads, num_levels, num_points, _ = sampling_locations.shape
    num_bags = num_batch * num_queries * num_heads
    device = sampling_locations.device
    dtype = sampling_locations.dtype

    def per_sample(values: list, kind: torch.dtype) -> torch.Tensor:  # [L] or [L, 2] -> [L*P(, 2)]
        return torch.tensor(values, dtype=kind, device=device).repeat_interleave(num_points, dim=0)

    size = per_sample([[w, h] for h, w in levels.sizes], dtype)  # [L*P, 2]
    # x = loc_x * W - 0.5 (align_corners=False), clamped to [-2, W + 1] (see the padding note)
    pixel = torch.addcmul(
        torch.tensor(-0.5, dtype=dtype, device=device), sampling_locations.reshape(num_bags, -1, 2), size
    )  # [R, L*P, 2]
    pixel.clamp_(min=torch.full_like(size, -2.0), max=size + 1.0)
    floor = pixel.floor()  # floor, never truncation toward zero
    frac = pixel.sub_(floor)

    # row of padded pixel s of batch n, head m = (n * S_padded + s) * M + m, and padded pixel
    # s = padded_start + (y + PAD_LOW) * Wp + (x + PAD_LOW): a dot product of floor (x, y) with
    # (M, Wp * M) plus a per-level and a per-bag constant.
    padded_width = per_sample([wp for _, wp in levels.padded_sizes], index_dtype)  # [L*P]
    padded_start = per_sample(levels.padded_starts, index_dtype)
    stride_xy = torch.stack((torch.ones_like(padded_width), padded_width), dim=-1) * num_heads  # [L*P, 2]
    level_base = (padded_start + PAD_LOW * padded_width + PAD_LOW) * num_heads  # [L*P]
    bag = torch.arange(num_bags, device=device, dtype=index_dtype)
    bag_base = torch.div(bag, num_queries * num_heads, rounding_mode="floor") * (levels.padded_total * num_heads)
    bag_base = bag_base + bag % num_heads  # [R]
    low_row = (floor.to(index_dtype) * stride_xy).sum(-1, dtype=index_dtype)  # [R, L*P]
    low_row += level_base
    low_row += bag_base[:, None]
    corner_offsets = (
        torch.stack((torch.zeros_like(padded_width), torch.ones_like(padded_width), padded_width, padded_width + 1))
        * num_heads
    )  # [4, L*P]
    rows = low_row[:, None, :] + corner_offsets  # [R, 4, L*P]
    return _Geometry(frac=frac, low_row=low_row, rows=rows, size=size)


def _corner_weights(geometry: _Geometry, attention: torch.Tensor) -> torch.Tensor:
    """[R, 4, L*P]: attention times the bilinear weight of corners y0x0, y0x1, y1x0, y1x1."""
    frac_x, frac_y = geometry.frac[..., 0], geometry.frac[..., 1]
    weights = attention.new_empty((attention.shape[0], 2, 2, attention.shape[1]))  # [R, y, x, L*P]
    # written in place (no stack): high y = a * fy, low y = a - high y; then the same split along x
    torch.mul(attention, frac_y, out=weights[:, 1, 0])
    torch.sub(attention, weights[:, 1, 0], out=weights[:, 0, 0])
    torch.mul(weights[:, :, 0], frac_x[:, None], out=weights[:, :, 1])
    weights[:, :, 0] -= weights[:, :, 1]
    return weights.view(attention.shape[0], 4, -1)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # fp16/bf16 are upcast: embedding_bag and sampled_addmm would accumulate in the input dtype.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.long


def _grad_value(
    geometry: _Geometry,
    corner_weights: torch.Tensor,
    grad_rows: torch.Tensor,
    levels: _Levels,
    value_shape: torch.Size,
) -> torch.Tensor:
    """Scatter-add of weight * grad_output into the corners, as sort + gather (deterministic).

    Samples are keyed by their low corner in the padded grid, so one stable sort of R*L*P keys
    serves all four corners (4x fewer keys than sorting corners). Per corner (dy, dx), one
    embedding_bag sums weight * grad_output over the samples of each key; corner (dy, dx) of padded
    key (yp, xp) is pixel (yp - PAD_LOW + dy, xp - PAD_LOW + dx), so each result is added to
    grad_value shifted accordingly. Corners in the zero border are dropped.
    """
    num_batch, _, num_heads, head_dim = value_shape
    num_bags, _, samples_per_bag = corner_weights.shape
    index_dtype = geometry.rows.dtype
    device = grad_rows.device
    # the low corner's row (n * S_padded + padded pixel) * M + m, grouped by sorting
    sorted_keys, order = torch.sort(geometry.low_row.view(-1), stable=True)
    counts = torch.bincount(sorted_keys, minlength=num_batch * levels.padded_total * num_heads)
    offsets = (torch.cumsum(counts, 0) - counts).to(index_dtype)
    bag_of_sample = torch.div(order, samples_per_bag, rounding_mode="floor").to(index_dtype)
    # [4, R*L*P] in sorted order (index_select is 4x faster than advanced indexing here)
    sorted_weights = corner_weights.transpose(0, 1).reshape(4, -1).index_select(1, order)

    grad_value = torch.zeros(value_shape, dtype=grad_rows.dtype, device=device)
    for corner in range(4):
        dy, dx = divmod(corner, 2)
        per_key = F.embedding_bag(
            bag_of_sample, grad_rows, offsets, mode="sum", per_sample_weights=sorted_weights[corner]
        ).view(num_batch, levels.padded_total, num_heads, head_dim)
        for (h, w), start, (hp, wp), padded_start_l in zip(
            levels.sizes, levels.starts, levels.padded_sizes, levels.padded_starts
        ):
            padded = per_key[:, padded_start_l : padded_start_l + hp * wp].view(num_batch, hp, wp, num_heads, head_dim)
            target = grad_value[:, start : start + h * w].view(num_batch, h, w, num_heads, head_dim)
            y0, x0 = PAD_LOW - dy, PAD_LOW - dx
            target += padded[:, y0 : y0 + h, x0 : x0 + w]
    return grad_value


class _TorchMSDeformAttn(torch.autograd.Function):
    """The PyTorch path with a hand-written backward (autograd through gathers is slow on CPU).

    The padded value and the corner geometry of the forward (rows and weights, about 50 bytes per
    sample) are saved for the backward: recomputing them cost about a third of the backward on CPU.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        compute_dtype = _compute_dtype(value, sampling_locations, attention_weights)
        ctx.input_dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        ctx.shapes = (value.shape, sampling_locations.shape)
        num_batch, num_values, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_bags = num_batch * num_queries * num_heads
        ctx.empty = min(num_bags, num_levels * num_points, num_values, head_dim) == 0
        if ctx.empty:
            return value.new_zeros((num_batch, num_queries, num_heads * head_dim))

        levels = _levels(spatial_shapes, level_start_index)
        value_padded = _pad_value(value.to(compute_dtype), levels)
        bag_size = num_levels * num_points * 4
        index_dtype = _index_dtype(num_batch * levels.padded_total * num_heads, num_bags * bag_size)
        geometry = _geometry(sampling_locations.to(compute_dtype), levels, index_dtype)
        attention = attention_weights.to(compute_dtype).reshape(num_bags, -1)  # [R, L*P]
        corner_weights = _corner_weights(geometry, attention)  # [R, 4, L*P]
        output = F.embedding_bag(
            geometry.rows.view(num_bags, -1),
            value_padded.view(-1, head_dim),
            mode="sum",
            per_sample_weights=corner_weights.view(num_bags, -1),
        )
        if any(ctx.needs_input_grad):
            ctx.levels = levels
            ctx.save_for_backward(value_padded, attention, corner_weights, *geometry)
        return output.view(num_batch, num_queries, num_heads * head_dim).to(value.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value_dtype, loc_dtype, attn_dtype = ctx.input_dtypes
        value_shape, loc_shape = ctx.shapes
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        if ctx.empty:
            device = grad_output.device
            return (
                torch.zeros(value_shape, dtype=value_dtype, device=device) if need_value else None,
                None,
                None,
                torch.zeros(loc_shape, dtype=loc_dtype, device=device) if need_loc else None,
                torch.zeros(loc_shape[:-1], dtype=attn_dtype, device=device) if need_attn else None,
            )
        value_padded, attention, corner_weights, *saved_geometry = ctx.saved_tensors
        geometry = _Geometry(*saved_geometry)
        levels = ctx.levels
        num_batch, _, num_heads, head_dim = value_shape
        num_bags = attention.shape[0]
        num_rows = num_batch * levels.padded_total * num_heads
        bag_size = geometry.rows.shape[1] * geometry.rows.shape[2]
        index_dtype = geometry.rows.dtype
        grad_rows = grad_output.reshape(num_bags, head_dim).to(value_padded.dtype).contiguous()
        grad_value = grad_loc = grad_attn = None

        if need_loc or need_attn:
            # dot(grad_out[bag], value[corner]) for every (bag, corner) entry: an SDDMM on the
            # sampling pattern, without gathering [R * 4 * L * P, D].
            rows_flat = geometry.rows.view(-1)
            value_rows = value_padded.view(num_rows, head_dim)
            columns = num_rows
            if columns < bag_size:
                # sampled_addmm rejects a pattern with more entries than the dense matrix has
                # (possible: the corners of one bag can repeat). Zero rows that no entry points at
                # lift that limit without changing any dot product.
                columns = bag_size
                value_rows = torch.cat((value_rows, value_rows.new_zeros(bag_size - num_rows, head_dim)))
            with warnings.catch_warnings():
                # PyTorch flags sparse CSR as beta once per process; the op is documented and tested.
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                pattern = torch.sparse_csr_tensor(
                    torch.arange(0, num_bags * bag_size + 1, bag_size, device=grad_rows.device, dtype=index_dtype),
                    rows_flat,
                    torch.zeros(rows_flat.shape, dtype=grad_rows.dtype, device=grad_rows.device),
                    size=(num_bags, columns),
                    check_invariants=False,
                )
            dots = torch.sparse.sampled_addmm(pattern, grad_rows, value_rows.t(), beta=0.0).values()
            dots = dots.view(num_bags, 2, 2, -1)  # [R, 2(y0, y1), 2(x0, x1), L*P]
            frac_x, frac_y = geometry.frac[..., 0], geometry.frac[..., 1]  # [R, L*P]
            slope_along_x = dots[:, :, 1] - dots[:, :, 0]  # [R, 2(y0, y1), L*P]
            along_x = torch.addcmul(dots[:, :, 0], slope_along_x, frac_x[:, None])  # interpolated along x
            slope_y = along_x[:, 1] - along_x[:, 0]
            if need_attn:
                grad_attn = torch.addcmul(along_x[:, 0], slope_y, frac_y).reshape(loc_shape[:-1]).to(attn_dtype)
            if need_loc:
                # d(weight_high)/dx = +1, d(weight_low)/dx = -1; dx/dloc_x = W (likewise y, H).
                slope_x = torch.addcmul(slope_along_x[:, 0], slope_along_x[:, 1] - slope_along_x[:, 0], frac_y)
                grad_loc = torch.stack((slope_x, slope_y), dim=-1) * (attention[..., None] * geometry.size)
                grad_loc = grad_loc.reshape(loc_shape).to(loc_dtype)

        if need_value:
            grad_value = _grad_value(geometry, corner_weights, grad_rows, levels, value_shape).to(value_dtype)

        return grad_value, None, None, grad_loc, grad_attn


# ----------------------------------------------------------------------------------------------
# Triton backend (autograd wrapper around avseg_kernels)
# ----------------------------------------------------------------------------------------------


def _kernels():
    try:
        from avseg_kernels import ms_deform_attn as kernels
    except ImportError as error:
        raise BackendUnavailableError(
            f"ms_deform_attn: backend='triton' needs the triton package ({error}); install triton or "
            "use backend='torch'"
        ) from error
    return kernels


class _TritonMSDeformAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        kernels = _kernels()
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return kernels.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        kernels = _kernels()
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = kernels.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
        )
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        return (
            grad_value if need_value else None,
            None,
            None,
            grad_loc if need_loc else None,
            grad_attn if need_attn else None,
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention, differentiable in value, locations and weights.

    value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L],
    sampling_locations [N, Lq, M, L, P, 2] (normalised x, y), attention_weights [N, Lq, M, L, P]
    -> [N, Lq, M * D]. ``backend``: ``"auto"`` | ``"torch"`` | ``"triton"`` (see ``resolve_backend``).
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    resolved = resolve_backend(backend, value.device)
    if resolved == "triton":
        return _TritonMSDeformAttn.apply(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return _TorchMSDeformAttn.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


# The PyTorch path (any device, differentiable): `ms_deform_attn` with backend="torch".
ms_deform_attn_torch = functools.partial(ms_deform_attn, backend="torch")


# ----------------------------------------------------------------------------------------------
# Reference: Deformable DETR's per-level grid_sample formulation (plain autograd)
# ----------------------------------------------------------------------------------------------


def ms_deform_attn_grid_sample(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The per-level ``grid_sample`` formulation (Deformable DETR's PyTorch fallback).

    Kept as the reference the fast path is benchmarked and tested against; it materialises
    [N * M, D, Lq, L * P]. ``level_start_index`` is implied by ``spatial_shapes`` here.
    """
    _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    num_batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    level_sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.split([h * w for h, w in level_sizes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    samples = []
    for level, (height, width) in enumerate(level_sizes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        level_value = (
            value_levels[level].flatten(2).transpose(1, 2).reshape(num_batch * num_heads, head_dim, height, width)
        )
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [N*M, D, Lq, P]
    weights = attention_weights.transpose(1, 2).reshape(num_batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(num_batch, num_heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()
