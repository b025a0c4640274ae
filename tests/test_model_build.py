"""Config composition, build_qdformer, whole-model forward, padded frames, init_from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from avseg.errors import CheckpointError, ConfigError
from avseg.models.build import REFERFORMER_KEY_MAP, build_qdformer, load_init_from
from avseg.models.qdformer import QDFormer

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_config(name: str = "qdformer_tiny", overrides: list[str] | None = None) -> dict:
    """Compose ``conf/model/<name>.yaml`` and resolve it the way the training config does."""
    with initialize_config_dir(config_dir=str(MODEL_CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides or [])
    root = OmegaConf.create({"paths": {"weights_dir": "/nonexistent-weights"}, "model": cfg})
    return OmegaConf.to_container(root.model, resolve=True)


def tiny(num_classes: int = 1, audio: str = "embeddings", **extra) -> QDFormer:
    overrides = [f"num_classes={num_classes}"]
    if audio == "embeddings":
        overrides.append("audio_encoder=embeddings")
    cfg = model_config("qdformer_tiny", overrides)
    cfg.update(extra)
    return build_qdformer(cfg)


@pytest.mark.parametrize(
    ("backbone", "audio_encoder", "decomposition"),
    [
        ("resnet50", "vggish", "pq"),
        ("resnet18", "embeddings", "pq_split"),
        ("swin_t", "vggish", "vq"),
        ("timm", "embeddings", "none"),
    ],
)
def test_every_model_config_composes(backbone, audio_encoder, decomposition):
    cfg = model_config(
        "qdformer", [f"backbone={backbone}", f"audio_encoder={audio_encoder}", f"decomposition={decomposition}"]
    )
    assert cfg["_target_"] == "avseg.lit.module.AVSLitModule" and cfg["_recursive_"] is False
    for key in ("backbone", "audio_encoder", "decomposition", "fusion", "decoder"):
        assert "_target_" in cfg[key]


def test_paper_config_builds_with_resnet50_and_runs():
    cfg = model_config(
        "qdformer",
        ["backbone.weights=null", "backbone.random_init=true", "audio_encoder=embeddings", "num_classes=70"],
    )
    net = build_qdformer(cfg).eval()
    assert net.backbone.out_channels == [256, 512, 1024, 2048]
    # ReferFormer R50's options (opts.py): 4 + 4 layers, FFN 2048, mask_dim 256, per-layer box heads
    assert len(net.fusion.encoder.layers) == 4 and len(net.decoder.layers) == 4
    assert net.fusion.encoder.layers[0].linear1.out_features == 2048
    assert net.decoder.layers[0].linear1.out_features == 2048
    assert net.decoder.layers[0].dropout1.p == 0.1
    assert net.fusion.mask_dim == 256 and net.decoder.mask_head.layer_shapes[0] == (8, 258)
    assert len(net.decoder.bbox_embed) == 4 and net.decoder.mask_head.controller_layout == "referformer"
    assert net.decoder.mask_head.rel_coords_unit == "pixels"
    with torch.no_grad():
        out = net(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 128))
    assert out["pred_masks"].shape == (1, 2, 4, 16, 16)
    assert out["pred_logits"].shape == (1, 2, 4, 70)
    assert len(out["aux_outputs"]) == 3


def test_missing_pretrained_path_is_an_error_not_random_init():
    cfg = model_config("qdformer", ["audio_encoder=embeddings"])
    with pytest.raises(CheckpointError, match="nonexistent-weights/resnet50.pth"):
        build_qdformer(cfg)


def test_shared_size_conflict_is_an_error():
    cfg = model_config("qdformer_tiny", ["audio_encoder=embeddings"])
    cfg["decoder"]["dim"] = 128
    with pytest.raises(ConfigError, match="model.decoder.dim"):
        build_qdformer(cfg)


def test_tiny_binary_forward_with_log_mel_audio():
    torch.manual_seed(0)
    net = tiny(num_classes=1, audio="log_mel")
    frames = torch.randn(1, 2, 3, 64, 64)
    out = net(frames, torch.randn(1, 2, 1, 96, 64))
    assert out["pred_masks"].shape == (1, 2, 4, 16, 16)
    assert out["pred_logits"].shape == (1, 2, 4, 1)
    assert out["pred_boxes"].shape == (1, 2, 4, 4)
    assert [tuple(a["pred_masks"].shape) for a in out["aux_outputs"]] == [(1, 2, 4, 16, 16)]
    assert out["quant"]["local_codes"].shape == (1, 2, 4, 64)
    maps = net.backbone(frames.flatten(0, 1))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    (out["pred_masks"].mean() + out["pred_logits"].mean() + out["quant"]["vq_loss"]).backward()
    assert net.decoder.class_embed.weight.grad is not None
    assert net.backbone.body.conv1.weight.grad is not None


def test_similarity_map_is_an_output_only_when_on():
    torch.manual_seed(0)
    frames, audio = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 128)
    assert "pred_similarity" not in tiny()(frames, audio)
    cfg = model_config("qdformer_tiny", ["num_classes=1", "audio_encoder=embeddings", "fusion.audio_similarity_dim=8"])
    net = build_qdformer(cfg)
    out = net(frames, audio)
    assert out["pred_similarity"].shape == (1, 2, 1, 16, 16)
    # the map the loss supervises reaches back to the audio path and the pixel embedding
    out["pred_similarity"].sum().backward()
    assert net.fusion.similarity.audio_embed.weight.grad.abs().sum() > 0
    assert net.fusion.similarity.visual_embed.weight.grad.abs().sum() > 0


def test_similarity_to_masks_adds_the_map_to_every_querys_mask_logits():
    frames, audio = torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 128)
    base = ["num_classes=1", "audio_encoder=embeddings", "fusion.audio_similarity_dim=8"]
    torch.manual_seed(0)
    plain = build_qdformer(model_config("qdformer_tiny", base)).eval()
    torch.manual_seed(0)
    gated = build_qdformer(model_config("qdformer_tiny", [*base, "fusion.similarity_to_masks=true"])).eval()
    gated.load_state_dict(plain.state_dict())  # no new parameters: same weights, same maps
    with torch.no_grad():
        a, b = plain(frames, audio), gated(frames, audio)
    sim = b["pred_similarity"]  # [B, T, 1, h, w], broadcast over the queries
    torch.testing.assert_close(b["pred_masks"], a["pred_masks"] + sim)
    torch.testing.assert_close(b["aux_outputs"][0]["pred_masks"], a["aux_outputs"][0]["pred_masks"] + sim)
    with pytest.raises(ConfigError, match="similarity_to_masks"):
        build_qdformer(model_config("qdformer_tiny", ["num_classes=1", "fusion.similarity_to_masks=true"]))


def test_tiny_semantic_forward():
    net = tiny(num_classes=70)
    out = net(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 128))
    assert out["pred_masks"].shape == (1, 2, 4, 16, 16)
    assert out["pred_logits"].shape == (1, 2, 4, 70)


def test_padded_frames_take_no_part_in_the_clip_decomposition():
    torch.manual_seed(0)
    net = tiny().eval()
    frames, audio = torch.randn(1, 3, 3, 64, 64), torch.randn(1, 3, 128)
    valid = torch.tensor([[True, True, False]])
    frames2, audio2 = frames.clone(), audio.clone()
    frames2[:, 2] = torch.randn(3, 64, 64)
    audio2[:, 2] = 100 * torch.randn(128)
    with torch.no_grad():
        a = net(frames, audio, valid)
        b = net(frames2, audio2, valid)
        c = net(frames, audio2, None)  # without frame_valid the third frame does count
    torch.testing.assert_close(a["quant"]["global_codes"], b["quant"]["global_codes"])
    torch.testing.assert_close(a["pred_masks"][:, :2], b["pred_masks"][:, :2])
    torch.testing.assert_close(a["pred_logits"][:, :2], b["pred_logits"][:, :2])
    assert not torch.allclose(a["pred_masks"][:, :2], c["pred_masks"][:, :2])


# ------------------------------------------------------------------ init_from
def _referformer_checkpoint(net: QDFormer, *, extra_encoder_layers: int = 1) -> dict[str, torch.Tensor]:
    """A synthetic ReferFormer-format state dict built by inverting REFERFORMER_KEY_MAP."""
    inverse = [
        ("backbone.body.", "backbone.0.body."),
        ("neck.proj.", "input_proj."),
        ("fusion.encoder.level_embed", "transformer.level_embed"),
        ("fusion.encoder.layers.", "transformer.encoder.layers."),
        ("decoder.layers.", "transformer.decoder.layers."),
        ("decoder.reference_points.", "transformer.reference_points."),
    ]
    state = {}
    for key, value in net.state_dict().items():
        for ours, theirs in inverse:
            if key.startswith(ours):
                state[theirs + key[len(ours):]] = torch.randn_like(value) if value.is_floating_point() else value
    depth = len(net.fusion.encoder.layers)
    for key in [k for k in state if k.startswith("transformer.encoder.layers.0.")]:
        for extra in range(extra_encoder_layers):
            state[key.replace(".0.", f".{depth + extra}.", 1)] = state[key].clone()
    # keys of ReferFormer's text branch and heads: allowed to be unused
    state["text_encoder.embeddings.word_embeddings.weight"] = torch.randn(5, 3)
    state["class_embed.0.weight"] = torch.randn(1, 4)
    state["backbone.0.body.fc.weight"] = torch.randn(3, 3)
    return state


def test_key_map_covers_the_referformer_prefixes():
    patterns = " ".join(p for p, _ in REFERFORMER_KEY_MAP)
    for prefix in ("backbone", "input_proj", "level_embed", "encoder", "decoder", "reference_points"):
        assert prefix in patterns


def test_init_from_loads_mapped_keys_and_reports(tmp_path, capsys):
    net = tiny()
    state = _referformer_checkpoint(net)
    path = tmp_path / "r50_pretrained.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, backbone="resnet18")}, path)
    report = load_init_from(net, path)
    assert len(report.loaded) > 100
    torch.testing.assert_close(net.backbone.body.layer1[0].conv1.weight, state["backbone.0.body.layer1.0.conv1.weight"])
    torch.testing.assert_close(
        net.fusion.encoder.layers[0].self_attn.sampling_offsets.weight,
        state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"],
    )
    torch.testing.assert_close(net.neck.proj[3][1].weight, state["input_proj.3.1.weight"])
    torch.testing.assert_close(net.decoder.layers[1].self_attn.in_proj_weight, state["transformer.decoder.layers.1.self_attn.in_proj_weight"])
    assert "text_encoder.embeddings.word_embeddings.weight" in report.skipped
    assert any(k.startswith("transformer.encoder.layers.1.") for k in report.skipped)  # beyond depth
    assert any(k.startswith("decomposition.") for k in report.left_at_init)
    printed = capsys.readouterr().out
    assert f"loaded: {len(report.loaded)} tensors" in printed and "left at init" in printed


def test_init_from_via_build_config(tmp_path):
    net = tiny()
    path = tmp_path / "ckpt.pth"
    state = _referformer_checkpoint(net)
    torch.save({"model": state}, path)
    rebuilt = tiny(init_from=str(path))
    torch.testing.assert_close(rebuilt.fusion.encoder.level_embed, state["transformer.level_embed"])


def test_init_from_rejects_missing_and_unknown_keys(tmp_path):
    net = tiny()
    state = _referformer_checkpoint(net)
    del state["backbone.0.body.layer2.0.conv1.weight"]
    path = tmp_path / "short.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"short\.pth.*backbone\.body\.layer2\.0\.conv1\.weight"):
        load_init_from(net, path)
    state = _referformer_checkpoint(net)
    state["mystery.module.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="mystery.module.weight"):
        load_init_from(net, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_init_from(net, tmp_path / "absent.pth")


def test_init_from_rejects_shape_mismatch(tmp_path):
    net = tiny()
    state = _referformer_checkpoint(net)
    state["transformer.level_embed"] = torch.randn(4, 256)
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="shape mismatches.*level_embed"):
        load_init_from(net, path)
