"""Multi-scale deformable attention: the PyTorch path, the module, backend dispatch.

The Triton kernels are tested under the CPU interpreter in their own process (TRITON_INTERPRET is
read when the kernel module is imported): ``test_triton_interpreter_suite`` runs tests/interpret.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avseg.ops import (
    BackendUnavailableError,
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_grid_sample,
    ms_deform_attn_torch,
    resolve_backend,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_inputs(
    *,
    batch: int,
    level_shapes: list[tuple[int, int]],
    heads: int,
    head_dim: int,
    points: int,
    queries: int,
    dtype: torch.dtype = torch.float64,
    low: float = -0.3,
    high: float = 1.3,
    seed: int = 0,
):
    """value [N,S,M,D], spatial_shapes [L,2], level_start_index [L], locations, weights."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    levels = len(level_shapes)
    value = torch.randn(batch, int(areas.sum()), heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=dtype)
    locations = low + (high - low) * locations
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, shapes, start, locations, weights


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights):
    """Loop over every (n, q, m, l, p) and corner: the definition in DEFORM_ATTN.md, nothing else."""
    num_batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    output = torch.zeros(num_batch, num_queries, num_heads, head_dim, dtype=value.dtype)
    for n in range(num_batch):
        for q in range(num_queries):
            for m in range(num_heads):
                for level in range(num_levels):
                    height, width = (int(v) for v in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for p in range(num_points):
                        x = float(locations[n, q, m, level, p, 0]) * width - 0.5
                        y = float(locations[n, q, m, level, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for cy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for cx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= cx < width and 0 <= cy < height:
                                    sample = value[n, start + cy * width + cx, m]
                                    output[n, q, m] += weights[n, q, m, level, p] * wy * wx * sample
    return output.view(num_batch, num_queries, num_heads * head_dim)


def off_pixel_grid(locations, spatial_shapes, margin: float = 0.05):
    """Move locations at least ``margin`` pixels away from integer pixel coordinates (bilinear kinks)."""
    sizes = torch.stack((spatial_shapes[:, 1], spatial_shapes[:, 0]), dim=-1).to(locations.dtype)
    pixel = locations * sizes[None, None, None, :, None, :] - 0.5
    frac = pixel - pixel.floor()
    frac = frac.clamp(margin, 1 - margin)
    return (pixel.floor() + frac + 0.5) / sizes[None, None, None, :, None, :]


@pytest.mark.parametrize(
    "level_shapes",
    [[(3, 4), (1, 1)], [(1, 5), (4, 1), (2, 3)], [(2, 2)]],
    ids=["3x4+1x1", "1x5+4x1+2x3", "2x2"],
)
def test_torch_path_matches_naive_loop_fp64(level_shapes):
    inputs = make_inputs(batch=2, level_shapes=level_shapes, heads=2, head_dim=3, points=2, queries=4)
    expected = naive_ms_deform_attn(*inputs)
    actual = ms_deform_attn_torch(*inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_torch_path_exact_locations_and_fully_outside():
    value, shapes, start, _, weights = make_inputs(
        batch=1, level_shapes=[(3, 5), (1, 1)], heads=2, head_dim=4, points=3, queries=3
    )
    exact = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    grid_x, grid_y = torch.meshgrid(exact, exact, indexing="ij")
    corners = torch.stack((grid_x.flatten(), grid_y.flatten()), dim=-1)  # 9 (x, y) pairs
    locations = corners[torch.arange(1 * 3 * 2 * 2 * 3) % 9].view(1, 3, 2, 2, 3, 2)
    torch.testing.assert_close(
        ms_deform_attn_torch(value, shapes, start, locations, weights),
        naive_ms_deform_attn(value, shapes, start, locations, weights),
        rtol=0,
        atol=1e-12,
    )
    far = torch.full_like(locations, -0.9)
    far[..., 1] = 2.5
    output = ms_deform_attn_torch(value, shapes, start, far, weights)
    assert torch.count_nonzero(output) == 0


def test_torch_path_matches_grid_sample_reference_with_grads():
    inputs = make_inputs(
        batch=2,
        level_shapes=[(6, 7), (3, 4), (1, 2)],
        heads=3,
        head_dim=5,
        points=2,
        queries=9,
        dtype=torch.float32,
    )
    grad_output = torch.randn(2, 9, 15, generator=torch.Generator().manual_seed(3))
    results = []
    for function in (ms_deform_attn_grid_sample, ms_deform_attn_torch):
        value, shapes, start, locations, weights = (t.clone() for t in inputs)
        for tensor in (value, locations, weights):
            tensor.requires_grad_(True)
        output = function(value, shapes, start, locations, weights)
        output.backward(grad_output)
        results.append((output.detach(), value.grad, locations.grad, weights.grad))
    for reference, fast in zip(*results):
        scale = max(reference.abs().max().item(), 1.0)
        torch.testing.assert_close(fast, reference, rtol=0, atol=2e-5 * scale)


def test_torch_path_gradcheck():
    value, shapes, start, locations, weights = make_inputs(
        batch=1, level_shapes=[(3, 4), (1, 2)], heads=2, head_dim=3, points=2, queries=3
    )
    locations = off_pixel_grid(locations, shapes)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_torch(v, shapes, start, loc, w),
        (value, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


def test_torch_path_is_bitwise_reproducible_and_handles_partial_grads():
    inputs = make_inputs(
        batch=2,
        level_shapes=[(5, 6), (2, 3)],
        heads=2,
        head_dim=4,
        points=3,
        queries=6,
        dtype=torch.float32,
    )
    grads = []
    for _ in range(2):
        value, shapes, start, locations, weights = (t.clone() for t in inputs)
        for tensor in (value, locations, weights):
            tensor.requires_grad_(True)
        ms_deform_attn_torch(value, shapes, start, locations, weights).square().sum().backward()
        grads.append((value.grad, locations.grad, weights.grad))
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    # only the value needs a gradient
    value, shapes, start, locations, weights = (t.clone() for t in inputs)
    value.requires_grad_(True)
    ms_deform_attn_torch(value, shapes, start, locations, weights).square().sum().backward()
    assert torch.equal(value.grad, grads[0][0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_low_precision_inputs(dtype):
    inputs = make_inputs(
        batch=1,
        level_shapes=[(4, 4), (2, 2)],
        heads=2,
        head_dim=8,
        points=2,
        queries=5,
        dtype=torch.float32,
    )
    reference = ms_deform_attn_torch(*inputs)
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    output = ms_deform_attn_torch(*low)
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), reference, rtol=0, atol=5e-2)


def test_non_contiguous_inputs_torch_path():
    value, shapes, start, locations, weights = make_inputs(
        batch=2, level_shapes=[(3, 3), (2, 1)], heads=2, head_dim=3, points=2, queries=4
    )
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    locations_nc = locations.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    weights_nc = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    torch.testing.assert_close(
        ms_deform_attn_torch(value_nc, shapes, start, locations_nc, weights_nc),
        naive_ms_deform_attn(value, shapes, start, locations, weights),
        rtol=0,
        atol=1e-12,
    )


def test_shape_errors_are_clear():
    value, shapes, start, locations, weights = make_inputs(
        batch=1, level_shapes=[(2, 2)], heads=2, head_dim=3, points=1, queries=2
    )
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, start, locations, weights[..., :0])
    with pytest.raises(ValueError, match="value must be"):
        ms_deform_attn(value[0], shapes, start, locations, weights)
    with pytest.raises(TypeError, match="spatial_shapes"):
        ms_deform_attn(value, shapes.float(), start, locations, weights)
    with pytest.raises(ValueError, match="backend"):
        ms_deform_attn(value, shapes, start, locations, weights, backend="cuda")


def test_triton_backend_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(batch=1, level_shapes=[(2, 2)], heads=1, head_dim=2, points=1, queries=1)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ms_deform_attn(*inputs, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        MSDeformAttn(dim=8, num_levels=1, num_heads=2, num_points=1, backend="triton")(
            torch.randn(1, 3, 8),
            torch.rand(1, 3, 1, 2),
            torch.randn(1, 4, 8),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )


def test_backend_resolution_and_determinism_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", cuda) == "triton"
    assert resolve_backend("torch", cuda) == "torch"
    assert resolve_backend("triton", cuda) == "triton"
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert resolve_backend("auto", cuda) == "torch"
        with pytest.raises(RuntimeError, match="not bitwise reproducible"):
            resolve_backend("triton", cuda)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="not bitwise reproducible"):
            assert resolve_backend("triton", cuda) == "triton"
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)


def test_auto_backend_on_cpu_is_the_torch_path():
    inputs = make_inputs(batch=1, level_shapes=[(3, 2)], heads=2, head_dim=2, points=2, queries=3)
    assert torch.equal(ms_deform_attn(*inputs, backend="auto"), ms_deform_attn_torch(*inputs))


def test_module_shapes_init_and_padding_mask():
    torch.manual_seed(0)
    module = MSDeformAttn(dim=32, num_levels=3, num_heads=4, num_points=2, backend="torch")
    # Deformable DETR init: uniform attention, head h points in direction 2*pi*h/M at 1..P pixels.
    assert torch.count_nonzero(module.attention_weights.weight) == 0
    bias = module.sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(bias[0, :, 0], torch.tensor([[1.0, 0.0]] * 3))
    torch.testing.assert_close(bias[1, :, 1], torch.tensor([[0.0, 2.0]] * 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[2, 0, 1], torch.tensor([-2.0, 0.0]), atol=1e-6, rtol=0)

    shapes = torch.tensor([[4, 6], [2, 3], [1, 1]])
    start = torch.tensor([0, 24, 30])
    query = torch.randn(2, 5, 32)
    value_input = torch.randn(2, 31, 32)
    reference = torch.rand(2, 5, 3, 2)
    output = module(query, reference, value_input, shapes, start)
    assert output.shape == (2, 5, 32)

    padding = torch.zeros(2, 31, dtype=torch.bool)
    padding[:, 24:] = True  # the coarse levels are padding
    changed = value_input.clone()
    changed[:, 24:] = 100.0
    torch.testing.assert_close(
        module(query, reference, value_input, shapes, start, padding),
        module(query, reference, changed, shapes, start, padding),
    )
    boxes = torch.cat((reference, torch.full_like(reference, 0.2)), dim=-1)
    assert module(query, boxes, value_input, shapes, start).shape == (2, 5, 32)
    output.sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MSDeformAttn(dim=30, num_levels=1, num_heads=4, num_points=1)
    with pytest.raises(ValueError, match="backend"):
        MSDeformAttn(dim=32, num_levels=1, num_heads=4, num_points=1, backend="cuda")
    module = MSDeformAttn(dim=8, num_levels=1, num_heads=2, num_points=1)
    with pytest.raises(ValueError, match="spatial_shapes sum"):
        module(
            torch.randn(1, 2, 8),
            torch.rand(1, 2, 1, 2),
            torch.randn(1, 5, 8),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )


def test_ops_import_only_torch():
    code = (
        "import sys, avseg.ops\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('einops', 'hydra', 'lightning', 'omegaconf', 'triton'))\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_triton_interpreter_suite():
    """The Triton kernels against the torch path under TRITON_INTERPRET=1, in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/interpret", "-q", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, (
        f"interpreter suite failed (exit {result.returncode}):\n{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    )
    assert " passed" in result.stdout
