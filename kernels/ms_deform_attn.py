"""Triton kernels for multi-scale deformable attention (Deformable DETR semantics).

Imports torch and triton only, so the kernels, their tests and the benchmark run on a machine where
nothing else is installed.

Layouts (all tensors contiguous; the launchers make them so):
    value               [N, S, M, D]      S = sum over levels of H_l * W_l
    spatial_shapes      [L, 2] int64      (H, W) per level
    level_start_index   [L] int64
    sampling_locations  [N, Lq, M, L, P, 2] normalised (x, y); may lie outside [0, 1]
    attention_weights   [N, Lq, M, L, P]
    output              [N, Lq, M, D]    (returned as the view [N, Lq, M * D])

One program handles one (n, m) pair and a block of BLOCK_Q queries with all D channels, so a corner
fetch is D contiguous elements. Arithmetic is fp32 (fp64 for fp64 inputs): fp16/bf16 values are
upcast after the load. ``grad_value`` is accumulated with ``tl.atomic_add`` into an fp32 (or fp64)
buffer and cast at the end; the order of atomic additions varies between runs on a GPU, so
``grad_value`` is not bitwise reproducible there.

``TRITON_INTERPRET=1`` must be set before this module is imported for the kernels to run on CPU
tensors (Triton's interpreter reads it when ``@triton.jit`` decorates a function).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "ms_deform_attn_backward",
    "ms_deform_attn_forward",
]

# Read once, as triton.jit does at decoration time: setting the variable later changes nothing.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _corner_offsets(loc_x, loc_y, height, width, start):
    """Bilinear set-up shared by the kernels: pixel coordinates, fractions, corner indices.

    ``x = loc_x * W - 0.5`` (align_corners=False). floor, never truncation: int casts round toward
    zero, which is wrong for negative coordinates. Coordinates are clamped to [-2, W] (resp. H)
    before the int cast: every corner beyond that range is outside the level anyway, and the clamp
    keeps far-away points from overflowing int32.
    """
    x = loc_x * width - 0.5
    y = loc_y * height - 0.5
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    frac_x = x - x_floor
    frac_y = y - y_floor
    x_low = tl.minimum(tl.maximum(x_floor, -2.0), width + 0.0).to(tl.int32)
    y_low = tl.minimum(tl.maximum(y_floor, -2.0), height + 0.0).to(tl.int32)
    return frac_x, frac_y, x_low, y_low


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr,
    shapes_ptr,
    start_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    pid_nm = tl.program_id(0)
    pid_q = tl.program_id(1)
    batch = pid_nm // num_heads
    head = pid_nm % num_heads

    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < num_queries
    channels = tl.arange(0, BLOCK_D)
    channel_mask = channels < head_dim

    # int64 base offsets: N * S * M * D exceeds 2**31 at realistic sizes.
    row = (batch.to(tl.int64) * num_queries + queries.to(tl.int64)) * num_heads + head  # [BLOCK_Q]
    value_base = batch.to(tl.int64) * num_values * num_heads * head_dim + head * head_dim
    value_row_stride = num_heads * head_dim

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=COMPUTE_DTYPE)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(start_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            sample = (row * NUM_LEVELS + level) * NUM_POINTS + point  # index into attn, [BLOCK_Q]
            loc_x = tl.load(loc_ptr + 2 * sample, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            weight = tl.load(attn_ptr + sample, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            frac_x, frac_y, x_low, y_low = _corner_offsets(loc_x, loc_y, height, width, start)
            for corner in tl.static_range(4):
                dy = corner // 2
                dx = corner % 2
                cx = x_low + dx
                cy = y_low + dy
                inside = query_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                # dx, dy are compile-time 0/1: wx = frac_x for the high corner, 1 - frac_x else.
                wx = dx * frac_x + (1 - dx) * (1.0 - frac_x)
                wy = dy * frac_y + (1 - dy) * (1.0 - frac_y)
                pixel = (start + cy * width + cx).to(tl.int64)
                pointers = value_ptr + value_base + pixel[:, None] * value_row_stride + channels[None, :]
                corner_value = tl.load(pointers, mask=inside[:, None] & channel_mask[None, :], other=0.0).to(
                    COMPUTE_DTYPE
                )
                acc += (weight * wx * wy)[:, None] * corner_value

    out_pointers = out_ptr + row[:, None] * head_dim + channels[None, :]
    tl.store(
        out_pointers,
        acc.to(out_ptr.dtype.element_ty),
        mask=query_mask[:, None] & channel_mask[None, :],
    )


@triton.jit
def _ms_deform_attn_bwd_kernel(
    value_ptr,
    shapes_ptr,
    start_ptr,
    loc_ptr,
    attn_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    pid_nm = tl.program_id(0)
    pid_q = tl.program_id(1)
    batch = pid_nm // num_heads
    head = pid_nm % num_heads

    queries = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    query_mask = queries < num_queries
    channels = tl.arange(0, BLOCK_D)
    channel_mask = channels < head_dim
    tile_mask = query_mask[:, None] & channel_mask[None, :]

    row = (batch.to(tl.int64) * num_queries + queries.to(tl.int64)) * num_heads + head
    value_base = batch.to(tl.int64) * num_values * num_heads * head_dim + head * head_dim
    value_row_stride = num_heads * head_dim

    grad_out = tl.load(grad_out_ptr + row[:, None] * head_dim + channels[None, :], mask=tile_mask, other=0.0).to(
        COMPUTE_DTYPE
    )

    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(start_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            sample = (row * NUM_LEVELS + level) * NUM_POINTS + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            weight = tl.load(attn_ptr + sample, mask=query_mask, other=0.0).to(COMPUTE_DTYPE)
            frac_x, frac_y, x_low, y_low = _corner_offsets(loc_x, loc_y, height, width, start)

            grad_weight = tl.zeros((BLOCK_Q,), dtype=COMPUTE_DTYPE)
            grad_x = tl.zeros((BLOCK_Q,), dtype=COMPUTE_DTYPE)
            grad_y = tl.zeros((BLOCK_Q,), dtype=COMPUTE_DTYPE)
            for corner in tl.static_range(4):
                dy = corner // 2
                dx = corner % 2
                cx = x_low + dx
                cy = y_low + dy
                inside = query_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                corner_mask = inside[:, None] & channel_mask[None, :]
                # dx, dy are compile-time 0/1: wx = frac_x for the high corner, 1 - frac_x else.
                wx = dx * frac_x + (1 - dx) * (1.0 - frac_x)
                wy = dy * frac_y + (1 - dy) * (1.0 - frac_y)
                # d wx / d x and d wy / d y: +1 for the high corner, -1 for the low one.
                dwx = 2.0 * dx - 1.0
                dwy = 2.0 * dy - 1.0
                pixel = (start + cy * width + cx).to(tl.int64)
                offsets = value_base + pixel[:, None] * value_row_stride + channels[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=corner_mask, other=0.0).to(COMPUTE_DTYPE)
                # Zero outside the level (masked load), so outside corners add nothing below.
                dot = tl.sum(grad_out * corner_value, axis=1)  # [BLOCK_Q]
                grad_weight += wx * wy * dot
                grad_x += weight * wy * dwx * dot
                grad_y += weight * wx * dwy * dot
                tl.atomic_add(
                    grad_value_ptr + offsets,
                    (weight * wx * wy)[:, None] * grad_out,
                    mask=corner_mask,
                )
            tl.store(grad_attn_ptr + sample, grad_weight, mask=query_mask)
            # d x / d loc_x = W, d y / d loc_y = H.
            tl.store(grad_loc_ptr + 2 * sample, grad_x * width, mask=query_mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, grad_y * height, mask=query_mask)


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"ms_deform_attn (triton): all inputs must be on one device, got {devices}")
    device = value.device
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "ms_deform_attn (triton): the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "set before avseg_kernels.ms_deform_attn is imported (CPU interpreter); got tensors on "
            f"{device}"
        )
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"ms_deform_attn (triton): {name} has unsupported dtype {tensor.dtype}")
    if INTERPRET and torch.bfloat16 in (value.dtype, sampling_locations.dtype, attention_weights.dtype):
        raise TypeError("ms_deform_attn (triton): bf16 gives NaN under TRITON_INTERPRET=1; test bf16 on a GPU")


def _compute_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _launch_config(num_queries: int, head_dim: int, block_q: int | None) -> tuple[int, int, int]:
    block_d = triton.next_power_of_2(max(head_dim, 1))
    if block_q is None:
        if INTERPRET:
            # The interpreter pays per program: few, large blocks.
            block_q = min(triton.next_power_of_2(max(num_queries, 1)), 256)
        else:
            # Keep the [BLOCK_Q, BLOCK_D] tile around 2K elements of registers.
            block_q = max(16, min(64, 2048 // block_d))
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"ms_deform_attn (triton): block_q must be a power of two, got {block_q}")
    num_warps = 4 if block_q * block_d >= 1024 else 2
    return block_q, block_d, num_warps


def ms_deform_attn_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    block_q: int | None = None,
) -> torch.Tensor:
    """Forward kernel launch. Returns [N, Lq, M * D] in ``value``'s dtype."""
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    num_batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value = value.contiguous()
    spatial_shapes = spatial_shapes.contiguous()
    level_start_index = level_start_index.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    _, tl_dtype = _compute_dtype(value, sampling_locations, attention_weights)

    output = value.new_empty((num_batch, num_queries, num_heads, head_dim))
    if output.numel() == 0:
        return output.view(num_batch, num_queries, num_heads * head_dim)
    block_q, block_d, num_warps = _launch_config(num_queries, head_dim, block_q)
    grid = (num_batch * num_heads, triton.cdiv(num_queries, block_q))
    _ms_deform_attn_fwd_kernel[grid](
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        output,
        num_values,
        num_queries,
        num_heads,
        head_dim,
        NUM_LEVELS=num_levels,
        NUM_POINTS=num_points,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        COMPUTE_DTYPE=tl_dtype,
        num_warps=num_warps,
    )
    return output.view(num_batch, num_queries, num_heads * head_dim)


def ms_deform_attn_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
    *,
    block_q: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernel launch.

    ``grad_output`` is [N, Lq, M * D] (or [N, Lq, M, D]). Returns (grad_value [N, S, M, D],
    grad_sampling_locations [N, Lq, M, L, P, 2], grad_attention_weights [N, Lq, M, L, P]), each in
    its input's dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    num_batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value = value.contiguous()
    spatial_shapes = spatial_shapes.contiguous()
    level_start_index = level_start_index.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    grad_output = grad_output.reshape(num_batch, num_queries, num_heads, head_dim).contiguous()
    torch_dtype, tl_dtype = _compute_dtype(value, sampling_locations, attention_weights)

    # Accumulators in the compute dtype; atomics in fp16 would lose most of the gradient.
    grad_value = torch.zeros(value.shape, dtype=torch_dtype, device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=torch_dtype, device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=torch_dtype, device=value.device)
    if grad_output.numel() > 0 and grad_attn.numel() > 0:
        block_q, block_d, num_warps = _launch_config(num_queries, head_dim, block_q)
        grid = (num_batch * num_heads, triton.cdiv(num_queries, block_q))
        _ms_deform_attn_bwd_kernel[grid](
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output,
            grad_value,
            grad_loc,
            grad_attn,
            num_values,
            num_queries,
            num_heads,
            head_dim,
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            COMPUTE_DTYPE=tl_dtype,
            num_warps=num_warps,
        )
    else:
        grad_loc.zero_()
        grad_attn.zero_()
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )
