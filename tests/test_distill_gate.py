"""Gated distillation (issue 13; docs/MODEL.md "Decomposition readings": ``distill_gate``)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from einops import repeat
from helpers_models import tiny_decomposition

from avseg.errors import ConfigError
from avseg.models.decomposition import AudioDecomposition
from avseg.models.layers.distill_gate import attention_gate

DIM, K = 16, 3


_module = partial(tiny_decomposition, dim=DIM, num_subspaces=K, num_layers=1)


def test_attention_gate_by_hand():
    # clip 0: 4 valid seconds (uniform share 0.25); clip 1: 2 valid of 4 (uniform share 0.5)
    attention = torch.tensor(
        [
            [[0.40, 0.30, 0.20, 0.10], [0.25, 0.25, 0.25, 0.25]],
            [[0.70, 0.30, 0.00, 0.00], [0.50, 0.50, 0.00, 0.00]],
        ]
    )
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    gate = attention_gate(attention, valid)
    expected = torch.tensor(
        [
            [[True, True], [True, True], [False, True], [False, True]],
            [[True, True], [False, True], [False, False], [False, False]],
        ]
    )
    assert gate.shape == (2, 4, 2)
    assert torch.equal(gate, expected)
    with pytest.raises(ValueError, match="frame_attention"):
        attention_gate(attention, valid[:, :3])


def _distill_by_hand(module: AudioDecomposition, tokens: torch.Tensor, valid: torch.Tensor, gate: torch.Tensor):
    """MSE distillation over the positions of ``gate`` [B, T, K], from the module's own parts."""
    global_q = module.quantizer(module._global_features(tokens, valid), update_stats=False)["quantized"]
    local = module._local_features(tokens, valid)
    per_token = (local - repeat(global_q, "b k d -> b t k d", t=tokens.shape[1])).pow(2).mean(-1)
    mask = (gate & valid[:, :, None]).float()
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("bands", [1, 2])
def test_gated_distillation_pulls_only_the_attended_seconds(bands):
    module = _module(distill_gate="attention").eval()
    shape = (2, 5, bands, DIM) if bands > 1 else (2, 5, DIM)
    tokens = torch.randn(*shape)
    valid = torch.tensor([[True, True, True, True, False], [True] * 5])
    out = module(tokens, valid)
    maps = module.attention_maps(tokens, valid)  # [B, K, T]
    gate = attention_gate(maps, valid)
    assert gate.any() and not gate[valid].all()  # the gate drops some valid (second, sub-space) pairs
    assert gate.any(dim=1).all()  # every (clip, sub-space) keeps at least one second
    torch.testing.assert_close(out["distill_loss"], _distill_by_hand(module, tokens, valid, gate))
    ungated = _module(distill_gate="none").eval()
    ungated.load_state_dict(module.state_dict())
    everywhere = torch.ones_like(gate)
    torch.testing.assert_close(
        ungated(tokens, valid)["distill_loss"], _distill_by_hand(module, tokens, valid, everywhere)
    )


def test_gated_distillation_trains_with_competition():
    module = _module(distill_gate="attention", competition="slots", prototype_role="position").train()
    tokens = torch.randn(2, 4, DIM, requires_grad=True)
    out = module(tokens, torch.tensor([[True, True, True, False], [True] * 4]))
    (out["distill_loss"] + out["vq_loss"]).backward()
    assert torch.isfinite(out["distill_loss"]) and out["distill_loss"] > 0
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()


def test_distill_gate_options_are_checked():
    with pytest.raises(ConfigError, match="distill_gate"):
        _module(distill_gate="energy")
    with pytest.raises(ConfigError, match="pq_split"):
        _module(variant="pq_split", num_subspaces=4, distill_gate="attention")
    assert _module(variant="pq_split", num_subspaces=4, distill_gate="none").distill_gate == "none"
