"""AudioDecomposition: variants, shapes, padding, local calibration, distillation, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from avseg.errors import ConfigError
from avseg.models.build import build_decomposition
from avseg.models.decomposition import VARIANTS, AudioDecomposition, frame_windows

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model" / "decomposition"
DIM, K, N = 32, 4, 16
TARGET = "avseg.models.decomposition.AudioDecomposition"
OUTPUT_KEYS = {
    "global_codes",
    "local_codes",
    "vq_loss",
    "distill_loss",
    "perplexity",
    "usage",
    "dead_codes",
    "global_indices",
    "local_indices",
}


def _module(variant: str, seed: int = 0, **kwargs) -> AudioDecomposition:
    torch.manual_seed(seed)
    options = dict(_target_=TARGET, variant=variant, num_subspaces=K, codebook_size=N, num_heads=4)
    options.update(kwargs)
    return build_decomposition(options, dim=DIM)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 5, DIM, generator=generator)
    frame_valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    return tokens, frame_valid


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("local_calibration", [True, False])
def test_output_keys_shapes_and_dtypes(variant, local_calibration):
    module = _module(variant, local_calibration=local_calibration)
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    k = 1 if variant == "vq" else K
    assert module.num_tokens == k
    assert set(out) == OUTPUT_KEYS
    assert out["global_codes"].shape == (2, k, DIM)
    assert out["local_codes"].shape == (2, 5, k, DIM)
    assert out["global_indices"].shape == (2, k) and out["global_indices"].dtype == torch.long
    assert out["local_indices"].shape == (2, 5, k) and out["local_indices"].dtype == torch.long
    for key in ("vq_loss", "distill_loss", "perplexity"):
        assert out[key].shape == () and torch.isfinite(out[key])
    assert out["usage"].shape == (N,) and out["usage"].dtype == torch.float32
    assert out["dead_codes"].shape == () and out["dead_codes"].dtype == torch.long
    if variant == "none":
        assert out["vq_loss"].item() == 0.0 and out["distill_loss"].item() == 0.0
        assert bool((out["global_indices"] == -1).all()) and bool((out["local_indices"] == -1).all())
        assert out["usage"].sum().item() == 0.0
    else:
        assert out["vq_loss"].item() > 0.0
        assert out["usage"].sum().item() == 2 * k  # one global assignment per clip and sub-space
        assert 1.0 <= out["perplexity"].item() <= 2 * k
        assert bool((out["global_indices"] >= 0).all()) and bool((out["global_indices"] < N).all())


@pytest.mark.parametrize("variant", ["pq", "vq", "pq_split"])
def test_codes_are_codewords(variant):
    module = _module(variant)
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    codebook = module.quantizer.codebook.detach()
    global_words = codebook[out["global_indices"]]
    local_words = codebook[out["local_indices"]]
    if variant == "pq_split":  # each chunk's codeword projected back to the model width
        global_words, local_words = module.split_out(global_words), module.split_out(local_words)
    torch.testing.assert_close(out["global_codes"], global_words)
    torch.testing.assert_close(out["local_codes"], local_words)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_frames_do_not_affect_global_codes(variant):
    module = _module(variant).eval()
    tokens, frame_valid = _inputs()
    changed = tokens.clone()
    changed[0, 3:] = 100.0 * torch.randn(2, DIM)  # clip 0's padded frames
    first, second = module(tokens, frame_valid), module(changed, frame_valid)
    torch.testing.assert_close(first["global_codes"], second["global_codes"], rtol=0, atol=1e-6)
    assert torch.equal(first["global_indices"], second["global_indices"])
    # Valid frames' local codes do not see padded frames either (frame 2's window includes frame 3).
    torch.testing.assert_close(first["local_codes"][0, :3], second["local_codes"][0, :3], rtol=0, atol=1e-6)
    # Losses are computed over valid positions only.
    torch.testing.assert_close(first["vq_loss"], second["vq_loss"])
    torch.testing.assert_close(first["distill_loss"], second["distill_loss"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_frames_get_the_global_codes(variant):
    module = _module(variant)
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    for t in (3, 4):
        torch.testing.assert_close(out["local_codes"][0, t], out["global_codes"][0])
        assert torch.equal(out["local_indices"][0, t], out["global_indices"][0])


def test_changing_valid_audio_changes_global_features():
    module = _module("none").eval()
    tokens, frame_valid = _inputs()
    changed = tokens.clone()
    changed[0, 1] += 3.0
    assert not torch.allclose(
        module(tokens, frame_valid)["global_codes"][0], module(changed, frame_valid)["global_codes"][0]
    )


@pytest.mark.parametrize("variant", ["pq", "pq_split", "none"])
def test_local_codes_see_only_their_window(variant):
    module = _module(variant, local_window=1).eval()
    tokens = torch.randn(1, 6, DIM)
    changed = tokens.clone()
    changed[0, 5] += 5.0
    first, second = module(tokens), module(changed)
    # Frames 0..3 have windows t-1..t+1 that exclude frame 5: their local features are unchanged
    # unless the clip code changed (it may: frame 5 is valid), so compare the pre-quantisation features.
    local_first = module._local_features(tokens, torch.ones(1, 6, dtype=torch.bool))
    local_second = module._local_features(changed, torch.ones(1, 6, dtype=torch.bool))
    torch.testing.assert_close(local_first[0, :4], local_second[0, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(local_first[0, 4:], local_second[0, 4:])
    assert first["local_codes"].shape == second["local_codes"].shape


def test_frame_windows_masks_outside_and_padded_frames():
    tokens = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1)
    valid = torch.tensor([[True, True, True, False]])
    windows, window_valid = frame_windows(tokens, valid, 1)
    assert windows.shape == (1, 4, 3, 1)
    assert windows[0, :, :, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 0]]
    assert window_valid[0].tolist() == [
        [False, True, True],
        [True, True, True],
        [True, True, False],
        [True, False, False],
    ]


def test_frame_windows_radius_zero_is_the_frame_itself():
    tokens = torch.randn(2, 3, 4)
    valid = torch.tensor([[True, False, True], [True, True, True]])
    windows, window_valid = frame_windows(tokens, valid, 0)
    assert torch.equal(windows[:, :, 0], tokens)
    assert torch.equal(window_valid[:, :, 0], valid)


def test_local_features_follow_the_frame_with_local_calibration_on():
    module = _module("none", local_window=0).eval()
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    # Frame-level features differ from the clip-level ones and from frame to frame.
    assert not torch.allclose(out["local_codes"][1, 0], out["global_codes"][1])
    assert not torch.allclose(out["local_codes"][1, 0], out["local_codes"][1, 1])
    # With a window of 0 each frame's feature is the prototypes attending to that frame alone.
    single = module(tokens[1:2, 2:3])
    torch.testing.assert_close(out["local_codes"][1, 2], single["global_codes"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_local_calibration_off_broadcasts_global_codes(variant):
    module = _module(variant, local_calibration=False)
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    for t in range(5):
        torch.testing.assert_close(out["local_codes"][:, t], out["global_codes"])
        assert torch.equal(out["local_indices"][:, t], out["global_indices"])
    assert out["distill_loss"].item() == 0.0


@pytest.mark.parametrize("variant", ["pq", "pq_split", "vq"])
@pytest.mark.parametrize("distill_loss", ["mse", "ce"])
def test_distillation_is_finite_and_backpropagates_to_local_encoder_only(variant, distill_loss):
    module = _module(variant, distill_loss=distill_loss).train()
    tokens, frame_valid = _inputs()
    tokens.requires_grad_(True)
    out = module(tokens, frame_valid)
    assert torch.isfinite(out["distill_loss"]) and out["distill_loss"].item() > 0.0
    out["distill_loss"].backward()
    # The codebook is detached in the local branch and the target is sg(VQ(g)).
    assert module.quantizer.codebook.grad is None
    encoder_params = [module.prototypes] if module.decoder is not None else list(module.split_in.parameters())
    grads = [p.grad for p in encoder_params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(torch.count_nonzero(g) > 0 for g in grads)
    assert torch.isfinite(tokens.grad).all() and torch.count_nonzero(tokens.grad[1]) > 0
    # Padded frames get no gradient through the distillation (not in any valid frame's window
    # except frame 3, which is in frame 2's window and masked there; frame 4 in none).
    assert torch.count_nonzero(tokens.grad[0, 3:]) == 0


def test_codebook_is_learnt_from_the_global_branch_only():
    module = _module("pq").train()
    tokens, frame_valid = _inputs()
    out = module(tokens, frame_valid)
    total = out["vq_loss"] + out["distill_loss"] + out["local_codes"].square().mean()
    total.backward()
    grad_all = module.quantizer.codebook.grad.clone()
    used = torch.unique(out["global_indices"])
    unused_by_global = torch.ones(N, dtype=torch.bool)
    unused_by_global[used] = False
    assert torch.count_nonzero(grad_all[used]) > 0
    assert torch.count_nonzero(grad_all[unused_by_global]) == 0


def test_total_loss_backpropagates_through_every_variant():
    for variant in VARIANTS:
        module = _module(variant).train()
        tokens, frame_valid = _inputs()
        out = module(tokens, frame_valid)
        loss = out["vq_loss"] + out["distill_loss"] + out["local_codes"].sum() + out["global_codes"].sum()
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is None or torch.isfinite(g).all() for g in grads), variant
        assert sum(int(torch.count_nonzero(g)) for g in grads if g is not None) > 0, variant


def test_frame_valid_none_means_all_frames_valid():
    module = _module("pq").eval()
    tokens, _ = _inputs()
    first = module(tokens)
    second = module(tokens, torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(first["local_codes"], second["local_codes"])
    assert torch.equal(first["global_indices"], second["global_indices"])


def test_clip_without_valid_frame_raises():
    module = _module("pq")
    tokens, frame_valid = _inputs()
    frame_valid[1] = False
    with pytest.raises(ValueError, match=r"no valid frame"):
        module(tokens, frame_valid)


def test_wrong_input_shapes_raise():
    module = _module("pq")
    with pytest.raises(ValueError, match="audio_tokens"):
        module(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="frame_valid"):
        module(torch.randn(2, 5, DIM), torch.ones(2, 4, dtype=torch.bool))


def test_attention_maps_ignore_padded_frames():
    module = _module("pq").eval()
    tokens, frame_valid = _inputs()
    maps = module.attention_maps(tokens, frame_valid)
    assert maps.shape == (2, K, 5)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, K))
    assert torch.count_nonzero(maps[0, :, 3:]) == 0
    with pytest.raises(ValueError, match="pq_split"):
        _module("pq_split").attention_maps(tokens, frame_valid)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"num_subspaces": 0}, "num_subspaces"),
        ({"codebook_size": 3}, "codebook_size"),
        ({"variant": "pq_split", "num_subspaces": 5}, "num_subspaces"),
        ({"variant": "pqx"}, "variant"),
        ({"distill_loss": "kl"}, "distill_loss"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
        ({"local_window": -1}, "local_window"),
        ({"num_heads": 5}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"beta": -0.1}, "beta"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"model\.decomposition\.{key}: got .*; allowed: ") as info:
        _module(overrides.pop("variant", "pq"), **overrides)
    assert "\n" not in str(info.value)


def test_vq_ignores_num_subspaces_and_accepts_small_codebooks():
    module = _module("vq", num_subspaces=8, codebook_size=2)
    assert module.num_tokens == 1
    tokens, frame_valid = _inputs()
    assert module(tokens, frame_valid)["global_codes"].shape == (2, 1, DIM)


def test_vq_is_pq_with_one_subspace():
    """The ablation reads the vq row as the K = 1 row of pq: same parameters, same outputs."""
    vq, pq1 = _module("vq", seed=5, num_subspaces=4), _module("pq", seed=5, num_subspaces=1)
    vq_state, pq_state = vq.state_dict(), pq1.state_dict()
    assert vq_state.keys() == pq_state.keys()
    for key in vq_state:
        torch.testing.assert_close(vq_state[key], pq_state[key], rtol=0, atol=0)
    tokens, frame_valid = _inputs()
    a, b = vq.eval()(tokens, frame_valid), pq1.eval()(tokens, frame_valid)
    for key in ("global_codes", "local_codes", "vq_loss", "distill_loss", "local_indices"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hydra_configs_instantiate_with_the_same_keys(variant):
    cfg = OmegaConf.load(CONF_DIR / f"{variant}.yaml")
    assert cfg.variant == variant
    keys = {name for name in OmegaConf.load(CONF_DIR / "pq.yaml")}
    assert set(cfg) == keys  # one sweep can cross variants
    assert cfg.num_subspaces == 4 and cfg.codebook_size == 512 and cfg.beta == 0.25
    module = build_decomposition(OmegaConf.to_container(cfg), dim=64)
    assert isinstance(module, AudioDecomposition) and module.variant == variant
    out = module(torch.randn(1, 3, 64))
    assert out["local_codes"].shape == (1, 3, module.num_tokens, 64)


def test_reseeding_through_the_module_keeps_training_finite():
    module = _module("pq", codebook_size=64, reseed_dead_codes=True, usage_ema_decay=0.5, dead_code_threshold=0.5)
    module.train()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    tokens, frame_valid = _inputs()
    for _ in range(4):
        out = module(tokens, frame_valid)
        optimizer.zero_grad()
        (out["vq_loss"] + out["distill_loss"]).backward()
        optimizer.step()
        assert torch.isfinite(out["vq_loss"])
    assert int(module.quantizer.num_reseeded) > 0


def test_data_initialised_codebook_does_not_collapse_on_offset_audio_tokens():
    # Audio tokens sharing a large common component (what a near-constant audio encoder gives):
    # the N(0, 1) codebook maps every prototype feature to one code; the data-initialised one
    # with re-seeding (the qdformer_tiny setting) keeps several codes in use.
    generator = torch.Generator().manual_seed(3)
    sources = torch.randn(6, DIM, generator=generator)

    def batch() -> torch.Tensor:
        pick = torch.randint(6, (8, 5), generator=generator)
        return sources[pick] + 0.1 * torch.randn(8, 5, DIM, generator=generator) + 3.0

    codes_in_use = {}
    for init in ("normal", "data"):
        module = _module(
            "pq",
            codebook_size=32,
            codebook_init=init,
            reseed_dead_codes=init == "data",
            usage_ema_decay=0.9,
            dead_code_threshold=0.1,
        )
        module.train()
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        for _ in range(6):
            out = module(batch())
            optimizer.zero_grad()
            (out["vq_loss"] + out["distill_loss"]).backward()
            optimizer.step()
        assert bool(module.quantizer.data_initialised)
        module.eval()
        with torch.no_grad():
            indices = module(batch())["global_indices"]
        codes_in_use[init] = len(set(indices.flatten().tolist()))
    assert codes_in_use["data"] >= 4
    assert codes_in_use["data"] > codes_in_use["normal"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [({"codebook_init": "uniform"}, "codebook_init"), ({"usage_ema_decay": 1.0}, "usage_ema_decay")],
)
def test_anti_collapse_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"model\.decomposition\.{key}: got .*; allowed: "):
        _module("pq", **overrides)


def test_tiny_model_config_turns_the_anti_collapse_mechanism_on():
    cfg = OmegaConf.load(CONF_DIR.parent / "qdformer_tiny.yaml")
    options = dict(cfg.decomposition)
    assert options["codebook_init"] == "data" and options["reseed_dead_codes"] is True
    module = build_decomposition({"_target_": TARGET, **options}, dim=64)
    assert module.quantizer.options.codebook_init == "data" and module.quantizer.options.reseed_dead_codes


@pytest.mark.parametrize("variant", VARIANTS)
def test_band_tokens_several_per_second_shapes_padding_and_windows(variant):
    """Audio tokens [B, T, M, C] (M frequency-band tokens per second): the same outputs as [B, T, C];
    padded frames' bands take no part in the clip code; frame t's local feature sees only the bands
    of frames t-1..t+1."""
    module = _module(variant, local_window=1).eval()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 6, 3, DIM, generator=generator)
    frame_valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = module(tokens, frame_valid)
    k = module.num_tokens
    assert out["global_codes"].shape == (2, k, DIM) and out["local_codes"].shape == (2, 6, k, DIM)

    padded_changed = tokens.clone()
    padded_changed[0, 4:] += 7.0
    torch.testing.assert_close(
        module._global_features(tokens, frame_valid)[0], module._global_features(padded_changed, frame_valid)[0]
    )
    all_valid = torch.ones(1, 6, dtype=torch.bool)
    changed = tokens[1:].clone()
    changed[0, 5, 2] += 5.0  # one band of the last second
    before, after = module._local_features(tokens[1:], all_valid), module._local_features(changed, all_valid)
    torch.testing.assert_close(before[0, :4], after[0, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(before[0, 4:], after[0, 4:])
