"""Sine position codes (1-D over audio time, 2-D over feature maps)."""

from __future__ import annotations

import math

import pytest
import torch

from avseg.models.layers.position import sine_position_1d, sine_position_2d


def test_sine_position_1d_values():
    code = sine_position_1d(7, 8)
    assert tuple(code.shape) == (7, 8) and code.dtype == torch.float32
    for t in range(7):
        for i in range(4):
            frequency = 1.0 / 10000 ** (2 * i / 8)
            assert code[t, 2 * i].item() == pytest.approx(math.sin(t * frequency), abs=1e-6)
            assert code[t, 2 * i + 1].item() == pytest.approx(math.cos(t * frequency), abs=1e-6)


def test_sine_position_1d_distinct_positions_and_options():
    code = sine_position_1d(10, 64)
    distances = torch.cdist(code, code)
    assert (distances + torch.eye(10) * 1e3).min() > 0.1  # every time step gets its own code
    assert code.abs().max() <= 1.0
    assert sine_position_1d(3, 4, dtype=torch.float64).dtype == torch.float64
    assert tuple(sine_position_1d(0, 4).shape) == (0, 4)


def test_sine_position_2d_values_against_loop():
    h, w, dim = 3, 5, 8
    code = sine_position_2d(h, w, dim)
    assert tuple(code.shape) == (dim, h, w)
    feats = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    for y in range(h):
        for x in range(w):
            coord_y = (y + 0.5) / (h + eps) * scale
            coord_x = (x + 0.5) / (w + eps) * scale
            for c in range(feats):
                period = 10000 ** (2 * (c // 2) / feats)
                trig = math.sin if c % 2 == 0 else math.cos
                assert code[c, y, x].item() == pytest.approx(trig(coord_y / period), abs=1e-6)
                assert code[feats + c, y, x].item() == pytest.approx(trig(coord_x / period), abs=1e-6)


def test_sine_position_2d_unnormalised_and_structure():
    code = sine_position_2d(4, 6, 16, normalize=False)
    # y channels constant along x, x channels constant along y
    assert torch.equal(code[:8], code[:8, :, :1].expand(8, 4, 6))
    assert torch.equal(code[8:], code[8:, :1, :].expand(8, 4, 6))
    assert code[0, 2, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)  # row 2 -> coordinate 3


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="even"):
        sine_position_1d(5, 7)
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_2d(4, 4, 6)
    with pytest.raises(ValueError, match="positive"):
        sine_position_2d(0, 4, 8)
