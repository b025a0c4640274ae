"""Triton kernels (under TRITON_INTERPRET=1, on CPU) against the PyTorch path.

Collected only when TRITON_INTERPRET=1 (see conftest.py). The interpreter runs programs one at a
time in numpy, so it checks indexing, masking and arithmetic, not races, bf16 or speed: those need
a GPU. Cost grows with N * M * L * P (programs x unrolled loop body), so the shape grid is covered
pairwise with cheap rows rather than as a product.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see conftest.py)"

import avseg_kernels.ms_deform_attn as kernels  # noqa: E402  (after the environment check)
from avseg.ops import ms_deform_attn, ms_deform_attn_torch  # noqa: E402

# The shape grid of DEFORM_ATTN.md, plus the dtype of the gradient tests.
AXES: dict[str, list] = {
    "batch": [1, 3],
    "heads": [1, 3, 8],
    "levels": [1, 2, 3, 4],
    "points": [1, 3, 4],
    "queries": [1, 7, 33],
    "head_dim": [1, 5, 24, 32],
    "dtype": ["float64", "float32"],
}
# Level shapes rotate through single-pixel, single-row, single-column and a generic level.
LEVEL_POOL = [(13, 21), (1, 1), (1, 6), (5, 1)]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def _cost(row: dict) -> int:
    return row["batch"] * row["heads"] * row["levels"] * row["points"]


def _pairs(row: dict) -> set[tuple]:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(AXES, 2)}


def pairwise_rows(seed: int = 0, candidates: int = 100) -> list[dict]:
    """Greedy pairwise covering array: every value pair of every two axes appears in some row.

    Each step tries ``candidates`` random rows (each seeded with one uncovered pair) and keeps the
    one covering the most uncovered pairs per unit of interpreter cost.
    """
    rng = random.Random(seed)
    uncovered = set().union(
        *({(a, va, b, vb) for va in AXES[a] for vb in AXES[b]} for a, b in itertools.combinations(AXES, 2))
    )
    rows = []
    while uncovered:
        pool = sorted(uncovered, key=repr)
        best_score, best_row = -1.0, None
        for _ in range(candidates):
            a, va, b, vb = rng.choice(pool)
            row = {name: rng.choice(values) for name, values in AXES.items()}
            row[a], row[b] = va, vb
            score = len(_pairs(row) & uncovered) / _cost(row) ** 0.7
            if score > best_score:
                best_score, best_row = score, row
        rows.append(best_row)
        uncovered -= _pairs(best_row)
    return rows


def seeded_rows(count: int = 3, seed: int = 1, max_cost: int = 48) -> list[dict]:
    """A few random full combinations on top of the pairwise rows."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < count:
        row = {name: rng.choice(values) for name, values in AXES.items()}
        if _cost(row) <= max_cost:
            rows.append(row)
    return rows


PAIRWISE = pairwise_rows()
SEEDED = seeded_rows()
GRID = PAIRWISE + SEEDED


def _row_id(row: dict) -> str:
    return "N{batch}-M{heads}-L{levels}-P{points}-Lq{queries}-D{head_dim}-{dtype}".format(**row)


def make_inputs(*, batch, level_shapes, heads, head_dim, points, queries, dtype, low=-0.3, high=1.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    levels = len(level_shapes)
    value = torch.randn(batch, int(areas.sum()), heads, head_dim, generator=generator, dtype=dtype)
    locations = low + (high - low) * torch.rand(
        batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype
    )
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, shapes, start, locations, weights


def off_pixel_grid(locations, spatial_shapes, margin=0.02):
    """Keep gradient-test points off integer pixel coordinates, where bilinear has kinks."""
    sizes = torch.stack((spatial_shapes[:, 1], spatial_shapes[:, 0]), dim=-1).to(locations.dtype)
    sizes = sizes[None, None, None, :, None, :]
    pixel = locations * sizes - 0.5
    frac = (pixel - pixel.floor()).clamp(margin, 1 - margin)
    return (pixel.floor() + frac + 0.5) / sizes


def run_both(inputs, grad_seed=7, **kernel_kwargs):
    """Forward + backward through the Triton kernels and through the torch path."""
    value, shapes, start, locations, weights = inputs
    out_torch_shape = (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    grad_output = torch.randn(out_torch_shape, generator=torch.Generator().manual_seed(grad_seed), dtype=value.dtype)
    triton_out = kernels.ms_deform_attn_forward(value, shapes, start, locations, weights, **kernel_kwargs)
    triton_grads = kernels.ms_deform_attn_backward(
        value, shapes, start, locations, weights, grad_output, **kernel_kwargs
    )
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    torch_out = ms_deform_attn_torch(leaves[0], shapes, start, leaves[1], leaves[2])
    torch_out.backward(grad_output)
    return (triton_out, *triton_grads), (torch_out.detach(), *(t.grad for t in leaves))


def assert_close_scaled(actual, expected, tolerance, name):
    """|actual - expected| <= tolerance * max(1, max |expected|) (grad_loc scales with W and H)."""
    assert actual.shape == expected.shape, name
    assert actual.dtype == expected.dtype, name
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance:g} * {scale:.3g}"


def check_against_torch(inputs, tolerance, **kernel_kwargs):
    triton_results, torch_results = run_both(inputs, **kernel_kwargs)
    for name, actual, expected in zip(("output", "grad_value", "grad_loc", "grad_attn"), triton_results, torch_results):
        assert_close_scaled(actual, expected, tolerance, name)


def test_pairwise_rows_cover_every_pair():
    covered = set().union(*(_pairs(row) for row in PAIRWISE))
    for a, b in itertools.combinations(AXES, 2):
        for va in AXES[a]:
            for vb in AXES[b]:
                assert (a, va, b, vb) in covered
    # every level shape of the pool appears, given the rotation in test_grid_case
    shapes_used = {
        LEVEL_POOL[(i + level) % len(LEVEL_POOL)] for i, row in enumerate(GRID) for level in range(row["levels"])
    }
    assert shapes_used == set(LEVEL_POOL)


@pytest.mark.parametrize("index", range(len(GRID)), ids=[_row_id(row) for row in GRID])
def test_grid_case(index):
    row = GRID[index]
    dtype = getattr(torch, row["dtype"])
    level_shapes = [LEVEL_POOL[(index + level) % len(LEVEL_POOL)] for level in range(row["levels"])]
    inputs = make_inputs(
        batch=row["batch"],
        level_shapes=level_shapes,
        heads=row["heads"],
        head_dim=row["head_dim"],
        points=row["points"],
        queries=row["queries"],
        dtype=dtype,
        seed=index,
    )
    value, shapes, start, locations, weights = inputs
    inputs = (value, shapes, start, off_pixel_grid(locations, shapes), weights)
    check_against_torch(inputs, TOLERANCE[row["dtype"]])


@pytest.mark.parametrize("head_dim", [1, 5, 24])
def test_fp16_forward(head_dim):
    inputs = make_inputs(
        batch=1,
        level_shapes=[(13, 21), (1, 6)],
        heads=3,
        head_dim=head_dim,
        points=3,
        queries=33,
        dtype=torch.float32,
        seed=head_dim,
    )
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    output = kernels.ms_deform_attn_forward(*half)
    assert output.dtype == torch.float16
    # reference: the fp16-rounded inputs, computed in fp32
    expected = ms_deform_attn_torch(*[t.float() if t.is_floating_point() else t for t in half])
    assert_close_scaled(output.float(), expected, 1e-2, "fp16 output")


def test_fp16_backward_accumulates_in_fp32():
    inputs = make_inputs(
        batch=1,
        level_shapes=[(5, 1), (1, 6)],
        heads=2,
        head_dim=8,
        points=2,
        queries=7,
        dtype=torch.float32,
        seed=3,
    )
    value, shapes, start, locations, weights = inputs
    locations = off_pixel_grid(locations, shapes)
    half = [value.half(), shapes, start, locations.half(), weights.half()]
    grad_output = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(1)).half()
    grads = kernels.ms_deform_attn_backward(*half, grad_output)
    leaves = [t.float().requires_grad_(True) for t in (half[0], half[3], half[4])]
    ms_deform_attn_torch(leaves[0], shapes, start, leaves[1], leaves[2]).backward(grad_output.float())
    for name, actual, leaf in zip(("grad_value", "grad_loc", "grad_attn"), grads, leaves):
        assert actual.dtype == torch.float16, name
        assert_close_scaled(actual.float(), leaf.grad, 1e-2, name)


@pytest.mark.parametrize(
    "level_shapes",
    [[(1, 1)], [(1, 9)], [(9, 1)], [(1, 1), (1, 9), (9, 1), (13, 21)]],
    ids=["1x1", "1xW", "Hx1", "all"],
)
def test_degenerate_levels(level_shapes):
    inputs = make_inputs(
        batch=1,
        level_shapes=level_shapes,
        heads=2,
        head_dim=5,
        points=3,
        queries=7,
        dtype=torch.float64,
        seed=len(level_shapes),
    )
    value, shapes, start, locations, weights = inputs
    check_against_torch((value, shapes, start, off_pixel_grid(locations, shapes), weights), 1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_odd_head_dim_and_several_query_blocks(dtype):
    # D = 5 (BLOCK_D = 8, masked channels) and Lq = 33 in blocks of 16 (a partial last block).
    inputs = make_inputs(
        batch=2,
        level_shapes=[(13, 21), (5, 1)],
        heads=3,
        head_dim=5,
        points=2,
        queries=33,
        dtype=getattr(torch, dtype),
        seed=11,
    )
    value, shapes, start, locations, weights = inputs
    inputs = (value, shapes, start, off_pixel_grid(locations, shapes), weights)
    check_against_torch(inputs, TOLERANCE[dtype], block_q=16)


def test_non_contiguous_inputs():
    value, shapes, start, locations, weights = make_inputs(
        batch=2,
        level_shapes=[(13, 21), (1, 6)],
        heads=3,
        head_dim=5,
        points=2,
        queries=7,
        dtype=torch.float64,
        seed=5,
    )
    locations = off_pixel_grid(locations, shapes)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    locations_nc = locations.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = shapes.t().contiguous().t()  # strides (1, L)
    assert not any(t.is_contiguous() for t in (value_nc, locations_nc, weights_nc, shapes_nc))
    triton_results, _ = run_both((value_nc, shapes_nc, start, locations_nc, weights_nc))
    _, torch_results = run_both((value, shapes, start, locations, weights))
    for name, actual, expected in zip(("output", "grad_value", "grad_loc", "grad_attn"), triton_results, torch_results):
        assert_close_scaled(actual, expected, 1e-10, name)


@pytest.mark.parametrize(
    "low,high",
    [(-0.3, 1.3), (-1.0, -0.2), (1.2, 2.0), (-5e6, 5e6)],
    ids=["partly-outside", "fully-outside-low", "fully-outside-high", "huge"],
)
def test_location_sets(low, high):
    inputs = make_inputs(
        batch=1,
        level_shapes=[(13, 21), (1, 6)],
        heads=2,
        head_dim=5,
        points=3,
        queries=7,
        dtype=torch.float64,
        low=low,
        high=high,
        seed=2,
    )
    value, shapes, start, locations, weights = inputs
    check_against_torch((value, shapes, start, off_pixel_grid(locations, shapes), weights), 1e-10)
    if low >= 1.2 or high <= -0.2:
        output = kernels.ms_deform_attn_forward(value, shapes, start, locations, weights)
        assert torch.count_nonzero(output) == 0


def test_exact_locations_forward():
    value, shapes, start, _, weights = make_inputs(
        batch=1,
        level_shapes=[(13, 21), (1, 1), (5, 1)],
        heads=2,
        head_dim=5,
        points=3,
        queries=7,
        dtype=torch.float64,
    )
    exact = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    pairs = torch.cartesian_prod(exact, exact)  # 9 (x, y)
    count = 1 * 7 * 2 * 3 * 3
    locations = pairs[torch.arange(count) % 9].view(1, 7, 2, 3, 3, 2)
    output = kernels.ms_deform_attn_forward(value, shapes, start, locations, weights)
    expected = ms_deform_attn_torch(value, shapes, start, locations, weights)
    assert_close_scaled(output, expected, 1e-12, "output")


def test_dispatch_uses_triton_under_interpreter():
    inputs = make_inputs(
        batch=1,
        level_shapes=[(5, 1), (1, 6)],
        heads=2,
        head_dim=4,
        points=2,
        queries=7,
        dtype=torch.float64,
    )
    value, shapes, start, locations, weights = inputs
    leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    output = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2], backend="triton")
    assert output.grad_fn is not None and "Triton" in type(output.grad_fn).__name__
    output.square().sum().backward()
    expected = ms_deform_attn_torch(value, shapes, start, locations, weights)
    assert_close_scaled(output.detach(), expected, 1e-10, "output")
    assert all(leaf.grad is not None for leaf in leaves)


def test_bf16_is_refused_by_the_interpreter():
    inputs = make_inputs(batch=1, level_shapes=[(2, 2)], heads=1, head_dim=2, points=1, queries=1, dtype=torch.float32)
    bf16 = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    with pytest.raises(TypeError, match="bf16"):
        kernels.ms_deform_attn_forward(*bf16)


def test_mixed_dtypes_as_autocast_gives_them():
    """Under autocast MSDeformAttn hands the op an fp16/bf16 value (from the value projection) and
    fp32 locations and weights (its geometry runs in fp32): the kernels accept the mix, return the
    output in the value's dtype and each gradient in its input's dtype. (fp16 here: the interpreter
    cannot do bf16 arithmetic.)"""
    value, shapes, start, locations, weights = make_inputs(
        batch=2,
        level_shapes=[(6, 7), (3, 4)],
        heads=2,
        head_dim=8,
        points=3,
        queries=9,
        dtype=torch.float32,
        seed=5,
    )
    locations = off_pixel_grid(locations, shapes)
    leaves = [
        value.half().requires_grad_(True),
        locations.clone().requires_grad_(True),
        weights.clone().requires_grad_(True),
    ]
    output = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2], backend="triton")
    assert output.dtype == torch.float16
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    output.float().backward(grad_output)
    assert [leaf.grad.dtype for leaf in leaves] == [torch.float16, torch.float32, torch.float32]
    reference = [
        value.half().float().requires_grad_(True),
        locations.clone().requires_grad_(True),
        weights.clone().requires_grad_(True),
    ]
    expected = ms_deform_attn_torch(reference[0], shapes, start, reference[1], reference[2])
    expected.backward(grad_output)
    assert_close_scaled(output.float(), expected.detach(), 1e-3, "output")
    for name, leaf, ref in zip(("grad_value", "grad_loc", "grad_attn"), leaves, reference):
        assert_close_scaled(leaf.grad.float(), ref.grad, 1e-3, name)


def test_module_under_fp16_autocast_runs_the_kernels():
    from avseg.ops import MSDeformAttn

    torch.manual_seed(0)
    module = MSDeformAttn(dim=16, num_levels=2, num_heads=2, num_points=2, backend="triton")
    shapes, start = torch.tensor([[6, 7], [3, 4]]), torch.tensor([0, 42])
    query, reference, value = torch.randn(1, 5, 16), torch.rand(1, 5, 2, 2), torch.randn(1, 54, 16)
    with torch.no_grad():
        expected = module(query, reference, value, shapes, start)
    with torch.autocast("cpu", dtype=torch.float16):
        output = module(query, reference, value, shapes, start)
    assert output.dtype == torch.float16
    assert float((output.float() - expected).abs().max() / expected.abs().max()) < 1e-2
    output.float().sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in module.parameters() if p.grad is not None)
