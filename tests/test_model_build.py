"""Config composition, build_qdformer, whole-model forward, padded frames, init_from."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from referformer_layout import referformer_state, write_referformer_checkpoint

from avseg.errors import CheckpointError, ConfigError
from avseg.models.build import build_qdformer, load_init_from
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
    assert net.decomposition.quantizer.options.loss_form == "taming_legacy"
    assert cfg["loss"]["match_level"] == "clip"
    demo = model_config("qdformer_tiny")  # the demo keeps avseg's earlier choices
    assert demo["loss"]["match_level"] == "frame" and demo["decomposition"]["vq_loss_form"] == "vqvae"
    assert (demo["decoder"]["box_head"], demo["decoder"]["controller_layout"], demo["fusion"]["mask_dim"]) == (
        "shared",
        "interleaved",
        8,
    )
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
# The checkpoints are written from ReferFormer's own parameter list (tests/referformer_layout.py),
# never from avseg's model.
TINY_REFERFORMER = dict(
    backbone="resnet18",
    hidden_dim=64,
    dim_feedforward=128,
    enc_layers=2,
    dec_layers=3,
    nheads=4,
    enc_n_points=2,
    dec_n_points=2,
    mask_dim=8,
)


def _dynamic_mask_reference(
    params: torch.Tensor, feats: torch.Tensor, centre: torch.Tensor, mask_dim: int
) -> torch.Tensor:
    """ReferFormer's dynamic mask head for one query: params split [w0 w1 w2 b0 b1 b2], relative
    coordinates in input-image pixels (stride 4, cell centres 4k + 2)."""
    channels = 8
    weight_nums, bias_nums = [(mask_dim + 2) * channels, channels * channels, channels], [channels, channels, 1]
    splits = torch.split(params, weight_nums + bias_nums)
    h, w = feats.shape[-2:]
    loc_y, loc_x = torch.meshgrid(torch.arange(0, 4 * h, 4.0) + 2, torch.arange(0, 4 * w, 4.0) + 2, indexing="ij")
    rel = torch.stack((centre[0] * 4 * w - loc_x, centre[1] * 4 * h - loc_y))
    x = torch.cat((feats, rel))[None]
    for i, (weight, bias) in enumerate(zip(splits[:3], splits[3:])):
        x = torch.nn.functional.conv2d(x, weight.reshape(bias.numel(), -1, 1, 1), bias)
        if i < 2:
            x = x.relu()
    return x[0, 0]


def test_init_from_tiny_demo_head_reorders_the_controller(tmp_path, caplog):
    """The demo's head (shared box head, interleaved controller): copied groups, the controller's
    last layer reordered (checked by running ReferFormer's reading on the same tensors), box
    heads / text branch / class head / pixel decoder skipped with reasons, extra layers skipped."""
    net = tiny()
    state = referformer_state(**TINY_REFERFORMER)
    path = write_referformer_checkpoint(tmp_path / "r50_pretrained.pth", state)
    with caplog.at_level(logging.INFO, logger="avseg.models.init_from"):
        report = load_init_from(net, path)
    torch.testing.assert_close(net.backbone.body.layer1[0].conv1.weight, state["backbone.0.body.layer1.0.conv1.weight"])
    torch.testing.assert_close(net.backbone.body.bn1.running_var, state["backbone.0.body.bn1.running_var"])
    torch.testing.assert_close(
        net.fusion.encoder.layers[0].self_attn.sampling_offsets.weight,
        state["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"],
    )
    torch.testing.assert_close(net.neck.proj[3][1].weight, state["input_proj.3.1.weight"])
    torch.testing.assert_close(
        net.decoder.layers[1].self_attn.in_proj_weight, state["transformer.decoder.layers.1.self_attn.in_proj_weight"]
    )
    torch.testing.assert_close(net.decoder.reference_points.weight, state["transformer.reference_points.weight"])
    torch.testing.assert_close(net.fusion.encoder.level_embed, state["transformer.level_embed"])
    # same masks as ReferFormer's head with the checkpoint's controller, avseg reading interleaved
    head = net.decoder.mask_head
    assert head.controller_layout == "interleaved"
    torch.manual_seed(0)
    query, feats, centre = torch.randn(1, 1, 64), torch.randn(1, 8, 5, 6), torch.rand(1, 1, 2)
    head.rel_coords_unit = "pixels"
    with torch.no_grad():
        ours = head(query, centre, feats)[0, 0]
        x = query[0, 0]
        for i in range(3):
            x = torch.nn.functional.linear(
                x, state[f"controller.layers.{i}.weight"], state[f"controller.layers.{i}.bias"]
            )
            x = x.relu() if i < 2 else x
        expected = _dynamic_mask_reference(x, feats[0], centre[0, 0], 8)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=1e-3)
    assert report.reordered and "decoder.mask_head.controller.layers.2.weight" in report.loaded
    skipped = report.skipped_keys
    for key in (
        "text_encoder.embeddings.word_embeddings.weight",
        "class_embed.0.weight",
        "bbox_embed.0.layers.0.weight",
        "pixel_decoder.mask_features.weight",
        "query_embed.weight",
        "transformer.decoder.bbox_embed.1.layers.2.bias",
        "transformer.decoder.layers.2.linear1.weight",
    ):
        assert key in skipped, key
    assert any(k.startswith("decoder.bbox_embed.") for k in report.left_at_init)
    assert "reordered: controller output rows" in caplog.text and "skipped" in caplog.text
    assert "class head" not in report.copied


def test_init_from_paper_head_copies_per_layer_box_heads_and_controller(tmp_path):
    """Per-layer box heads and ReferFormer's controller layout (the paper setup's head) at tiny
    widths: every box head copied to its layer, the controller copied unchanged."""
    net = tiny(
        decoder={
            **model_config("qdformer_tiny")["decoder"],
            "box_head": "per_layer",
            "controller_layout": "referformer",
            "num_layers": 3,
        }
    )
    state = referformer_state(**TINY_REFERFORMER)
    path = write_referformer_checkpoint(tmp_path / "ckpt.pth", state)
    report = load_init_from(net, path)
    for layer in range(3):
        for j in range(3):
            torch.testing.assert_close(
                net.decoder.bbox_embed[layer].layers[j].weight, state[f"bbox_embed.{layer}.layers.{j}.weight"]
            )
    torch.testing.assert_close(net.decoder.mask_head.controller.layers[2].weight, state["controller.layers.2.weight"])
    assert not report.reordered
    assert report.copied["box heads"] and report.copied["controller"]


@pytest.mark.slow
def test_init_from_loads_a_referformer_r50_checkpoint_into_the_paper_setup(tmp_path):
    """The real layout: ReferFormer R50 options (opts.py + --with_box_refine) against the
    paper setup's model; every backbone / input_proj / transformer / box-head / controller tensor
    lands, nothing but the allowed groups is left at init."""
    cfg = model_config("qdformer", ["backbone.weights=null", "backbone.random_init=true", "audio_encoder=embeddings"])
    state = referformer_state()
    state["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(7)  # as a plain-BatchNorm checkpoint would hold
    path = write_referformer_checkpoint(tmp_path / "r50_pretrained.pth", state)
    cfg["init_from"] = str(path)
    net = build_qdformer(cfg)
    for key, value in state.items():
        if key.startswith("backbone.0.body.") and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(net.state_dict()["backbone.body." + key.removeprefix("backbone.0.body.")], value)
    torch.testing.assert_close(net.decoder.bbox_embed[3].layers[2].bias, state["bbox_embed.3.layers.2.bias"])
    torch.testing.assert_close(
        net.decoder.layers[3].linear1.weight, state["transformer.decoder.layers.3.linear1.weight"]
    )
    torch.testing.assert_close(
        net.fusion.encoder.layers[3].linear2.weight, state["transformer.encoder.layers.3.linear2.weight"]
    )
    torch.testing.assert_close(net.decoder.mask_head.controller.layers[2].weight, state["controller.layers.2.weight"])
    report = load_init_from(net, path)
    assert not any("beyond" in reason for reason in report.skipped)  # 4 + 4 layers: nothing left over
    assert "backbone.0.body.bn1.num_batches_tracked" in report.skipped_keys
    left = {".".join(k.split(".")[:2]) for k in report.left_at_init}
    assert left <= {
        "audio_encoder.embed",
        "audio_encoder.proj",
        "audio_encoder.norm",
        "decoder.query_pos",
        "decoder.class_embed",
    } | {k for k in left if k.startswith(("decomposition.", "fusion.", "audio_encoder."))}
    assert not any(
        k.startswith(("backbone.", "neck.", "fusion.encoder.", "decoder.layers.", "decoder.bbox_embed"))
        for k in report.left_at_init
    )


def test_init_from_via_build_config(tmp_path):
    state = referformer_state(**TINY_REFERFORMER)
    path = write_referformer_checkpoint(tmp_path / "ckpt.pth", state)
    rebuilt = tiny(init_from=str(path))
    torch.testing.assert_close(rebuilt.fusion.encoder.level_embed, state["transformer.level_embed"])


def test_init_from_rejects_missing_and_unknown_keys(tmp_path):
    net = tiny()
    state = referformer_state(**TINY_REFERFORMER)
    del state["backbone.0.body.layer2.0.conv1.weight"]
    path = tmp_path / "short.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"short\.pth.*backbone\.body\.layer2\.0\.conv1\.weight"):
        load_init_from(net, path)
    state = referformer_state(**TINY_REFERFORMER)
    state["mystery.module.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="mystery.module.weight"):
        load_init_from(net, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_init_from(net, tmp_path / "absent.pth")


def test_init_from_refuses_to_run_code_from_the_file(tmp_path):
    """Only tensors, containers and argparse.Namespace are allowed: another global is refused."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": tmp_path}, path)  # a PosixPath: not allow-listed
    with pytest.raises(CheckpointError, match="weights-only"):
        load_init_from(tiny(), path)


def test_init_from_rejects_shape_mismatch(tmp_path):
    net = tiny()
    state = referformer_state(**TINY_REFERFORMER)
    state["transformer.level_embed"] = torch.randn(4, 256)
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="shape mismatches.*level_embed"):
        load_init_from(net, path)
