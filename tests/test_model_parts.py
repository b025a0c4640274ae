"""Neck, fusion, decoder, heads and postprocessing on tiny tensors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avseg.errors import ConfigError
from avseg.models.decoder import DynamicMaskHead, SemanticGuidedDecoder
from avseg.models.fusion import AudioVisualFusion, DualCrossModalBlock, flatten_levels
from avseg.models.layers.deformable import DeformableLayerSpec
from avseg.models.layers.dual import R2VOSDualBlock
from avseg.models.neck import MultiLevelProjection
from avseg.models.postprocess import binary_logits, semantic_scores

DIM = 32
SPEC = DeformableLayerSpec(dim=DIM, ffn_dim=64, dropout=0.0, num_levels=4, num_heads=4, num_points=2, backend="torch")


def _levels(n: int = 3):
    return [torch.randn(n, DIM, s, s) for s in (8, 4, 2, 1)]


def test_neck_projects_three_levels_and_adds_stride_64():
    neck = MultiLevelProjection(in_channels=[16, 24, 40], dim=DIM)
    c3, c4, c5 = torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4), torch.randn(2, 40, 2, 2)
    levels = neck([c3, c4, c5])
    assert [tuple(x.shape) for x in levels] == [(2, DIM, 8, 8), (2, DIM, 4, 4), (2, DIM, 2, 2), (2, DIM, 1, 1)]


def test_flatten_levels_offsets():
    tokens, shapes, start = flatten_levels(_levels(2))
    assert tokens.shape == (2, 64 + 16 + 4 + 1, DIM)
    assert shapes.tolist() == [[8, 8], [4, 4], [2, 2], [1, 1]]
    assert start.tolist() == [0, 64, 80, 84]


@pytest.mark.parametrize("fpn_type", ["audio_dual", "audio", "none"])
def test_fusion_shapes(fpn_type):
    fusion = AudioVisualFusion(
        spec=SPEC,
        res2_channels=12,
        fpn_type=fpn_type,
        num_encoder_layers=1,
        mask_dim=8,
        stride4_dim=32,
    )
    audio = torch.randn(3, 4, DIM)
    out = fusion(_levels(), torch.randn(3, 12, 16, 16), audio)
    assert out["memory"].shape == (3, 85, DIM)
    assert out["mask_features"].shape == (3, 8, 16, 16)
    assert out["audio"].shape == audio.shape
    out["mask_features"].sum().backward()
    if fpn_type != "none":
        assert fusion.early_fusion.cross.attn.in_proj_weight.grad is not None


def test_fusion_uses_audio_only_when_configured():
    torch.manual_seed(0)
    levels, res2 = _levels(1), torch.randn(1, 12, 16, 16)
    for fpn_type, should_change in (("audio_dual", True), ("none", False)):
        fusion = AudioVisualFusion(
            spec=SPEC,
            res2_channels=12,
            fpn_type=fpn_type,
            num_encoder_layers=1,
        ).eval()
        a = fusion(levels, res2, torch.randn(1, 4, DIM))["mask_features"]
        b = fusion(levels, res2, torch.randn(1, 4, DIM))["mask_features"]
        assert (not torch.allclose(a, b)) == should_change


def test_fusion_rejects_unknown_fpn_type():
    with pytest.raises(ConfigError, match="fpn_type"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, fpn_type="dual")
    with pytest.raises(ConfigError, match="dual_stride"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, dual_stride=4)


def test_audio_similarity_map_is_max_cosine_over_tokens_times_temperature():
    from avseg.models.fusion import AudioVisualSimilarity

    torch.manual_seed(0)
    sim = AudioVisualSimilarity(dim=DIM, visual_dim=6, embed_dim=5)
    visual, audio = torch.randn(2, 6, 4, 3), torch.randn(2, 3, DIM)
    with torch.no_grad():
        out = sim(visual, audio)
        pixels = torch.nn.functional.normalize(sim.visual_embed(visual), dim=1)
        tokens = torch.nn.functional.normalize(sim.audio_embed(audio), dim=-1)
    assert out.shape == (2, 1, 4, 3)
    n, y, x = 1, 2, 0
    expected = max(float(tokens[n, k] @ pixels[n, :, y, x]) for k in range(3)) * 10.0
    assert float(out[n, 0, y, x]) == pytest.approx(expected, rel=1e-5)
    assert float(out.abs().max()) <= 10.0 + 1e-4  # cosine in [-1, 1] times the initial temperature


def test_fusion_audio_similarity_adds_one_audio_dependent_mask_channel():
    torch.manual_seed(0)
    levels, res2 = _levels(1), torch.randn(1, 12, 16, 16)
    fusion = AudioVisualFusion(
        spec=SPEC,
        res2_channels=12,
        num_encoder_layers=1,
        mask_dim=8,
        stride4_dim=16,
        audio_similarity_dim=8,
    ).eval()
    assert fusion.mask_dim == 9  # what the builder hands the dynamic mask head
    a = fusion(levels, res2, torch.randn(1, 4, DIM))["mask_features"]
    b = fusion(levels, res2, torch.randn(1, 4, DIM))["mask_features"]
    assert a.shape == (1, 9, 16, 16)
    assert not torch.allclose(a[:, 8], b[:, 8])
    with pytest.raises(ConfigError, match="audio_similarity_dim"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, audio_similarity_dim=-1)
    with pytest.raises(ConfigError, match="audio_similarity_dim"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, fpn_type="none", audio_similarity_dim=8)


def test_early_fusion_forms():
    """product: x * a; residual_product: x * (1 + a) (the identity when a = 0); sum: x + a."""
    from avseg.models.layers.attention import GatedCrossAttention

    torch.manual_seed(0)
    visual, audio = torch.randn(2, 5, DIM), torch.randn(2, 3, DIM)
    module, outputs = GatedCrossAttention(dim=DIM, num_heads=4), {}
    for form in ("product", "residual_product", "sum"):
        module.form = form  # the same weights under each form
        outputs[form] = module(visual, audio)
    attended = outputs["sum"] - visual
    torch.testing.assert_close(outputs["product"], visual * attended)
    torch.testing.assert_close(outputs["residual_product"], visual * (1 + attended))
    zero = GatedCrossAttention(dim=DIM, num_heads=4, form="residual_product")
    torch.nn.init.zeros_(zero.cross.attn.out_proj.weight)
    torch.testing.assert_close(zero(visual, audio), visual)
    with pytest.raises(ValueError, match="form"):
        GatedCrossAttention(dim=DIM, num_heads=4, form="concat")
    with pytest.raises(ConfigError, match="early_fusion_form"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, early_fusion_form="concat")


@pytest.mark.parametrize("dual_form", ["r2vos", "gate"])
@pytest.mark.parametrize("dual_stride", [8, 16, 32])
def test_dual_block_gates_the_chosen_encoder_level(dual_stride, dual_form):
    """The dual block works on the encoder output of the configured stride (its input has that
    level's size) and its output reaches the mask features (a gradient arrives at its filters)."""
    torch.manual_seed(0)
    fusion = AudioVisualFusion(
        spec=SPEC,
        res2_channels=12,
        fpn_type="audio_dual",
        num_encoder_layers=1,
        dual_stride=dual_stride,
        dual_form=dual_form,
    )
    seen = []
    fusion.dual.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    out = fusion(_levels(2), torch.randn(2, 12, 16, 16), torch.randn(2, 4, DIM))
    side = {8: 8, 16: 4, 32: 2}[dual_stride]
    assert seen == [(2, DIM, side, side)]
    out["mask_features"].square().sum().backward()
    assert fusion.dual.filter_proj.weight.grad.abs().sum() > 0


def test_r2vos_dual_block_attends_over_the_clip_and_masks_padded_frames():
    """R2VOS's block is clip-level: frame 0's output depends on frame 1's pixels and audio (the
    per-frame gate does not); a padded frame (frame_valid false) influences no other frame."""
    torch.manual_seed(0)
    block = R2VOSDualBlock(dim=DIM, num_heads=4, ffn_dim=64, dropout=0.0, pool_size=3).eval()
    visual, audio = torch.randn(4, DIM, 3, 3), torch.randn(4, 2, DIM)  # B = 2 clips of T = 2
    out, prompts = block(visual, audio, num_frames=2)
    assert out.shape == visual.shape and prompts.shape == audio.shape
    changed_visual, changed_audio = visual.clone(), audio.clone()
    changed_visual[1] += 1.0
    changed_audio[1] += 1.0
    out2, prompts2 = block(changed_visual, changed_audio, num_frames=2)
    assert not torch.allclose(out2[0], out[0]) and not torch.allclose(prompts2[0], prompts[0])
    torch.testing.assert_close(out2[2:], out[2:])  # the other clip is untouched
    valid = torch.tensor([[True, False], [True, True]])
    masked, _ = block(visual, audio, num_frames=2, frame_valid=valid)
    masked2, _ = block(changed_visual, changed_audio, num_frames=2, frame_valid=valid)
    torch.testing.assert_close(masked2[0], masked[0])
    gate = DualCrossModalBlock(dim=DIM, num_heads=4, ffn_dim=64, dropout=0.0, num_groups=8).eval()
    torch.testing.assert_close(gate(changed_visual, changed_audio)[0][0], gate(visual, audio)[0][0])
    with pytest.raises(ConfigError, match="dual_form"):
        AudioVisualFusion(spec=SPEC, res2_channels=12, dual_form="film")


@pytest.mark.parametrize("extra", [0, 2])
def test_decoder_heads_shapes(extra):
    decoder = SemanticGuidedDecoder(
        spec=SPEC,
        num_classes=70,
        mask_dim=8,
        num_layers=3,
        extra_queries=extra,
    )
    memory, shapes, start = flatten_levels(_levels())
    out = decoder(torch.randn(3, 4, DIM), memory, shapes, start, torch.randn(3, 8, 16, 16))
    q = 4 + extra
    assert out["logits"].shape == (3, 3, q, 70)
    assert out["boxes"].shape == (3, 3, q, 4)
    assert out["masks"].shape == (3, 3, q, 16, 16)
    assert (out["boxes"] > 0).all() and (out["boxes"] < 1).all()


def test_decoder_rejects_more_queries_than_table():
    decoder = SemanticGuidedDecoder(
        spec=replace(SPEC, dropout=0.1, ffn_dim=2048),
        num_classes=1,
        mask_dim=8,
        num_layers=1,
        max_queries=3,
    )
    memory, shapes, start = flatten_levels(_levels())
    with pytest.raises(ValueError, match="max_queries"):
        decoder(torch.randn(3, 4, DIM), memory, shapes, start, torch.randn(3, 8, 16, 16))


def test_dynamic_mask_head_matches_per_query_convolutions():
    """Interleaved layout [w0 b0 w1 b1 w2 b2], coordinates in [0, 1] (the CPU demo's head)."""
    torch.manual_seed(0)
    head = DynamicMaskHead(
        dim=DIM, mask_dim=5, channels=4, num_layers=3, controller_layout="interleaved", rel_coords_unit="unit"
    )
    queries, centres, feats = torch.randn(2, 3, DIM), torch.rand(2, 3, 2), torch.randn(2, 5, 6, 7)
    masks = head(queries, centres, feats)
    assert masks.shape == (2, 3, 6, 7)
    # reference: explicit conv2d per (frame, query) with the generated weights
    params = head.controller(queries)
    ys = (torch.arange(6) + 0.5) / 6
    xs = (torch.arange(7) + 0.5) / 7
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    for n in range(2):
        for q in range(3):
            rel = torch.stack((centres[n, q, 0] - gx, centres[n, q, 1] - gy))
            x = torch.cat((feats[n], rel))[None]
            offset = 0
            for i, (o, c) in enumerate(head.layer_shapes):
                w = params[n, q, offset : offset + o * c].view(o, c, 1, 1)
                offset += o * c
                b = params[n, q, offset : offset + o]
                offset += o
                x = torch.nn.functional.conv2d(x, w, b)
                if i < 2:
                    x = x.relu()
            torch.testing.assert_close(masks[n, q], x[0, 0], rtol=1e-4, atol=1e-5)


def test_dynamic_mask_head_reads_the_controller_as_referformer():
    """ReferFormer's reading: the controller output split into [w0, w1, w2, b0, b1, b2]
    (weights then biases); relative coordinates in input-image pixels, the reference centre
    scaled by the image size minus the stride-4 cell centres 4 * k + 2."""
    torch.manual_seed(0)
    head = DynamicMaskHead(
        dim=DIM, mask_dim=5, channels=4, num_layers=3, controller_layout="referformer", rel_coords_unit="pixels"
    )
    queries, centres, feats = torch.randn(2, 3, DIM), torch.rand(2, 3, 2), torch.randn(2, 5, 6, 7)
    masks = head(queries, centres, feats)
    params = head.controller(queries)
    weight_nums, bias_nums = [(5 + 2) * 4, 4 * 4, 4], [4, 4, 1]
    img_h, img_w = 6 * 4, 7 * 4
    loc_y, loc_x = torch.meshgrid(torch.arange(0, img_h, 4.0) + 2, torch.arange(0, img_w, 4.0) + 2, indexing="ij")
    for n in range(2):
        for q in range(3):
            splits = torch.split(params[n, q], weight_nums + bias_nums)
            weights, biases = splits[:3], splits[3:]
            cx, cy = centres[n, q, 0] * img_w, centres[n, q, 1] * img_h
            x = torch.cat((feats[n], torch.stack((cx - loc_x, cy - loc_y))))[None]
            for i, (w, b) in enumerate(zip(weights, biases)):
                x = torch.nn.functional.conv2d(x, w.reshape(b.numel(), -1, 1, 1), b)
                if i < 2:
                    x = x.relu()
            torch.testing.assert_close(masks[n, q], x[0, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rel_coords", [True, False])
def test_dynamic_mask_head_factorised_first_layer_equals_the_concatenation(rel_coords):
    """Wide mask features take the factorised first layer (no per-query copy of the features);
    it computes what the narrow path's concatenation computes, for stacked layers too."""
    torch.manual_seed(0)
    head = DynamicMaskHead(
        dim=DIM,
        mask_dim=64,
        channels=4,
        num_layers=3,
        rel_coords=rel_coords,
        controller_layout="referformer",
        rel_coords_unit="pixels",
    )
    queries, centres, feats = torch.randn(2, 3, 2, DIM), torch.rand(2, 3, 2, 2), torch.randn(3, 64, 5, 6)
    masks = head(queries, centres, feats)  # [layers 2, N 3, Q 2, 5, 6]
    assert masks.shape == (2, 3, 2, 5, 6)
    from avseg.models import decoder as decoder_module

    original = decoder_module.FACTORISED_MIN_CHANNELS
    decoder_module.FACTORISED_MIN_CHANNELS = 10**6  # force the concatenation path
    try:
        reference = head(queries, centres, feats)
    finally:
        decoder_module.FACTORISED_MIN_CHANNELS = original
    torch.testing.assert_close(masks, reference, rtol=1e-4, atol=1e-3)


def test_per_layer_box_heads_refine_4d_reference_boxes():
    """Deformable DETR box refinement: layer l's box = sigmoid(bbox_embed[l](h_l) + logit(ref_l)),
    ref_0 = the 2-D reference point (size from the head alone), ref_{l+1} = detached box_l (4-D),
    and the mask head reads the detached box centre."""
    torch.manual_seed(0)
    decoder = SemanticGuidedDecoder(
        spec=SPEC,
        num_classes=2,
        mask_dim=8,
        num_layers=3,
        box_head="per_layer",
    )
    assert len(decoder.bbox_embed) == 3 and len(decoder.class_embed) == 3
    assert (
        decoder.bbox_embed[0].layers[-1].bias[2:].eq(-2.0).all() and decoder.bbox_embed[1].layers[-1].bias.eq(0).all()
    )
    for head in decoder.bbox_embed:  # non-zero last layers, so refinement shows
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    seen = []
    for layer in decoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append(args[2]))
    memory, shapes, start = flatten_levels(_levels())
    out = decoder(torch.randn(3, 4, DIM), memory, shapes, start, torch.randn(3, 8, 16, 16))
    assert seen[0].shape[-1] == 2 and seen[1].shape[-1] == 4 and seen[2].shape[-1] == 4
    torch.testing.assert_close(seen[1][:, :, 0], out["boxes"][0])
    torch.testing.assert_close(seen[2][:, :, 0], out["boxes"][1])
    assert not seen[1].requires_grad
    assert not torch.allclose(out["boxes"][0], out["boxes"][1])


def _outputs(num_classes: int):
    torch.manual_seed(1)
    return {
        "pred_logits": torch.randn(2, 3, 4, num_classes),
        "pred_masks": torch.randn(2, 3, 4, 8, 8),
    }


def test_binary_logits_picks_best_query_per_frame():
    out = _outputs(1)
    logits = binary_logits(out, 8)  # same size: upsampling is the identity
    assert logits.shape == (6, 8, 8)
    best = out["pred_logits"][..., 0].argmax(-1)
    for b in range(2):
        for t in range(3):
            torch.testing.assert_close(logits[b * 3 + t], out["pred_masks"][b, t, best[b, t]])
    assert binary_logits(out, (224, 200)).shape == (6, 224, 200)


def test_semantic_scores_channels_and_background():
    out = _outputs(70)
    scores = semantic_scores(out, 8)
    assert scores.shape == (6, 71, 8, 8)
    class_prob, mask_prob = out["pred_logits"].sigmoid(), out["pred_masks"].sigmoid()
    for b, t, c in [(0, 0, 0), (1, 2, 69), (0, 1, 33)]:
        claims = torch.stack(
            [mask_prob[b, t, q] * class_prob[b, t, q, c] / max(class_prob[b, t, q].max(), 0.5) for q in range(4)]
        )
        torch.testing.assert_close(scores[b * 3 + t, c + 1], claims.amax(0))
    torch.testing.assert_close(scores[:, 0], 1 - scores[:, 1:].amax(1))
    # score_floor = 1: the plain product of class and mask probabilities
    plain = semantic_scores(out, 8, score_floor=1.0)
    product = (class_prob[..., None, None] * mask_prob[:, :, :, None]).amax(2).flatten(0, 1)
    torch.testing.assert_close(plain[:, 1:], product)
    assert semantic_scores(out, 224).shape == (6, 71, 224, 224)


def test_semantic_weak_query_claims_in_proportion_to_its_score():
    out = {"pred_logits": torch.full((1, 1, 1, 70), -20.0), "pred_masks": torch.full((1, 1, 1, 2, 2), 20.0)}
    out["pred_logits"][..., 4] = torch.logit(torch.tensor(0.2))
    scores = semantic_scores(out, 2)
    torch.testing.assert_close(scores[0, 5], torch.full((2, 2), 0.4), atol=1e-4, rtol=0)
    assert (scores.argmax(1) == 0).all()  # a 0.2-score query does not beat the background


def test_semantic_background_wins_where_no_query_claims_the_pixel():
    out = {"pred_logits": torch.full((1, 1, 2, 70), -20.0), "pred_masks": torch.full((1, 1, 2, 4, 4), -20.0)}
    out["pred_logits"][0, 0, 0, 5] = 20.0  # query 0 is confident class 5 ...
    out["pred_masks"][0, 0, 0, :2] = 20.0  # ... on the top half only
    labels = semantic_scores(out, 4).argmax(1)[0]
    assert (labels[:2] == 6).all() and (labels[2:] == 0).all()
