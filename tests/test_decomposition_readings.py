"""The decomposition readings of issue 13 (docs/MODEL.md "Decomposition readings"): prototypes as
query positions, slot-attention competition, one value / output projection per sub-space."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from helpers_models import tiny_decomposition

from avseg.errors import ConfigError
from avseg.models.layers.subspace_attention import SubspaceCrossAttention

DIM, K = 16, 4
SWITCHES = [
    {"prototype_role": "position"},
    {"competition": "slots"},
    {"subspace_values": True},
    {"prototype_role": "position", "competition": "slots", "subspace_values": True},
]


_module = partial(tiny_decomposition, dim=DIM, num_subspaces=K, num_layers=2)


def test_defaults_keep_the_torch_attention_and_its_state_keys():
    module = _module()
    assert module.prototype_role == "content"
    assert all(not layer.custom_cross for layer in module.decoder.layers)
    assert "decoder.layers.0.cross_attn.in_proj_weight" in module.state_dict()


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("bands", [1, 3])
def test_switches_train_with_padding_and_band_tokens(switches, bands):
    module = _module(**switches).train()
    shape = (2, 5, bands, DIM) if bands > 1 else (2, 5, DIM)
    tokens = torch.randn(*shape, requires_grad=True)
    frame_valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = module(tokens, frame_valid)
    assert out["local_codes"].shape == (2, 5, K, DIM) and out["global_codes"].shape == (2, K, DIM)
    loss = out["vq_loss"] + out["distill_loss"] + out["local_codes"].square().mean()
    loss.backward()
    assert torch.isfinite(loss) and tokens.grad is not None and torch.isfinite(tokens.grad).all()
    assert module.prototypes.grad is not None and module.prototypes.grad.abs().sum() > 0
    maps = module.attention_maps(tokens.detach(), frame_valid)
    assert maps.shape == (2, K, 5) and torch.all(maps[0, :, 3:] == 0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, K))


def test_position_prototypes_do_not_leak_into_the_features():
    """Content starts at zero: over audio with one repeated token every sub-space reads the same
    thing, so the K features are equal; as content the prototypes make them differ."""
    tokens = torch.randn(1, 1, DIM).expand(2, 6, DIM).contiguous()
    position = _module(prototype_role="position", prototype_init_std=1.0).eval()
    content = _module(prototype_role="content", prototype_init_std=1.0).eval()
    valid = torch.ones(2, 6, dtype=torch.bool)
    g_pos = position._global_features(tokens, valid)
    g_con = content._global_features(tokens, valid)
    torch.testing.assert_close(g_pos, g_pos[:, :1].expand_as(g_pos))
    assert (g_con - g_con[:, :1]).abs().max() > 1e-2


def test_slot_competition_matches_a_hand_computation():
    torch.manual_seed(3)
    layer = SubspaceCrossAttention(dim=8, num_heads=1, num_queries=3, competition="slots")
    queries, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 4 + [True], [False] * 5])
    out, weights = layer(queries, memory, padding)
    logits = layer.q_proj(queries) @ layer.k_proj(memory).transpose(1, 2) / math.sqrt(8)  # [2, 3, 5]
    share = logits.softmax(dim=1) * (~padding)[:, None, :]  # each token shared out among the queries
    expected_w = share / (share.sum(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(weights, expected_w)
    torch.testing.assert_close(out, layer.out_proj(expected_w @ layer.v_proj(memory)))
    # competition: the shares of one token over the queries sum to one
    torch.testing.assert_close(share.sum(1)[0, :4], torch.ones(4))


def test_one_token_claimed_by_one_query_is_lost_to_the_other():
    layer = SubspaceCrossAttention(dim=2, num_heads=1, num_queries=2, competition="slots")
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
            proj.weight.copy_(torch.eye(2))
            proj.bias.zero_()
    queries = torch.tensor([[[20.0, 0.0], [0.0, 20.0]]])
    memory = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out, weights = layer(queries, memory)
    assert weights[0, 0, 0] > 0.99 and weights[0, 1, 1] > 0.99
    torch.testing.assert_close(out[0], torch.eye(2), atol=1e-2, rtol=0)


def test_subspace_values_read_different_features_with_equal_attention():
    torch.manual_seed(0)
    layer = SubspaceCrossAttention(dim=8, num_heads=2, num_queries=3, subspace_values=True)
    queries = torch.randn(1, 1, 8).expand(2, 3, 8)
    out, weights = layer(queries, torch.randn(2, 4, 8))
    torch.testing.assert_close(weights, weights[:, :1].expand_as(weights))
    assert (out - out[:, :1]).abs().max() > 1e-3
    with torch.no_grad():  # equal per-sub-space projections: the shared-projection result
        layer.v_weight.copy_(layer.v_weight[:1].expand_as(layer.v_weight))
        layer.out_weight.copy_(layer.out_weight[:1].expand_as(layer.out_weight))
    out, _ = layer(queries, torch.randn(2, 4, 8))
    torch.testing.assert_close(out, out[:, :1].expand_as(out))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"prototype_role": "query"}, "prototype_role"),
        ({"competition": "softmax"}, "competition"),
        ({"subspace_values": "yes"}, "subspace_values"),
    ],
)
def test_reading_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"model\.decomposition\.{key}: got .*; allowed: "):
        _module(**overrides)
