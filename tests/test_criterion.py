"""SetCriterion: target construction, label masking, empty frames, aux terms, loss sanity."""

from __future__ import annotations

import pytest
import torch

from avseg.errors import ConfigError
from avseg.models.criterion import SetCriterion
from avseg.models.matcher import HungarianMatcher
from avseg.models.terms import FocalLoss, TermWeights

SIZE = 16  # ground-truth resolution; predictions at SIZE // 4


def _value(tensor: torch.Tensor) -> float:
    return tensor.detach().item()


def _random_outputs(
    generator: torch.Generator, batch: int, frames: int, queries: int, classes: int, aux_layers: int = 0
) -> dict:
    def layer() -> dict:
        return {
            "pred_logits": torch.randn(batch, frames, queries, classes, generator=generator).requires_grad_(),
            "pred_masks": torch.randn(
                batch, frames, queries, SIZE // 4, SIZE // 4, generator=generator
            ).requires_grad_(),
        }

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(aux_layers)]
    return outputs


def _perfect_outputs(masks: torch.Tensor, queries: int, classes: int, semantic: bool) -> dict:
    """One query per object with a confident right class and the exact mask (at stride 4)."""
    batch, frames = masks.shape[:2]
    logits = torch.full((batch, frames, queries, classes), -12.0)
    mask_logits = torch.full((batch, frames, queries, SIZE // 4, SIZE // 4), -12.0)
    small = masks[..., ::4, ::4]
    for b in range(batch):
        for t in range(frames):
            present = [c for c in small[b, t].unique().tolist() if c > 0]
            for query, value in enumerate(present):
                label = value - 1 if semantic else 0
                logits[b, t, query, label] = 12.0
                mask_logits[b, t, query] = torch.where(small[b, t] == value, 12.0, -12.0)
    return {"pred_logits": logits, "pred_masks": mask_logits}


def _block_masks(batch: int, frames: int, semantic: bool) -> torch.Tensor:
    """Masks whose objects are aligned to the 4-pixel grid (exactly representable at stride 4)."""
    masks = torch.zeros(batch, frames, SIZE, SIZE, dtype=torch.long)
    masks[0, 0, 0:8, 4:12] = 1
    masks[0, 1, 8:16, 8:16] = 1
    masks[1, 1, 4:8, 0:16] = 1
    if semantic:
        masks[0, 0, 12:16, 0:4] = 5
        masks[1, 1, 12:16, 12:16] = 3
    return masks


def test_binary_targets() -> None:
    criterion = SetCriterion(num_classes=1, semantic=False)
    masks = _block_masks(2, 3, semantic=False)
    label_valid = torch.tensor([[True, True, True], [False, True, True]])
    targets = criterion.build_targets(masks, label_valid, (SIZE // 4, SIZE // 4))
    assert targets.frame_ids.tolist() == [0, 1, 2, 4, 5]
    assert targets.counts == [1, 1, 0, 1, 0]
    assert targets.labels.tolist() == [0, 0, 0]
    assert targets.masks.shape == (3, SIZE // 4, SIZE // 4)
    torch.testing.assert_close(targets.masks[0], (masks[0, 0, ::4, ::4] == 1).float())
    torch.testing.assert_close(targets.boxes[0], torch.tensor([0.5, 0.25, 0.5, 0.5]))
    assert [len(frame["labels"]) for frame in targets.per_frame] == targets.counts
    # Full-resolution targets in "target" mode.
    full = SetCriterion(num_classes=1, semantic=False, mask_resolution="target")
    assert full.build_targets(masks, label_valid, (4, 4)).masks.shape == (3, SIZE, SIZE)


def test_semantic_targets_and_value_checks() -> None:
    criterion = SetCriterion(num_classes=70, semantic=True)
    masks = _block_masks(2, 2, semantic=True)
    label_valid = torch.ones(2, 2, dtype=torch.bool)
    targets = criterion.build_targets(masks, label_valid, (SIZE // 4, SIZE // 4))
    # Frame (0,0): classes 1 and 5 -> labels 0 and 4; frame (0,1): class 1; (1,0): none; (1,1): 1 and 3.
    assert targets.counts == [2, 1, 0, 2]
    assert targets.labels.tolist() == [0, 4, 0, 0, 2]
    expected = (masks[0, 0] == 5).float()[::4, ::4]
    torch.testing.assert_close(targets.masks[1], expected)
    with pytest.raises(ValueError, match="mask values"):
        criterion.build_targets(torch.full((1, 1, 4, 4), 71), torch.ones(1, 1, dtype=torch.bool), (1, 1))
    binary = SetCriterion(num_classes=1, semantic=False)
    with pytest.raises(ValueError, match="mask values"):
        binary.build_targets(torch.full((1, 1, 4, 4), 255), torch.ones(1, 1, dtype=torch.bool), (1, 1))
    # An unlabelled frame's values are not inspected (its mask is all zeros by contract anyway).
    binary.build_targets(torch.full((1, 1, 4, 4), 255), torch.zeros(1, 1, dtype=torch.bool), (1, 1))
    with pytest.raises(ValueError, match="integer"):
        binary.build_targets(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, dtype=torch.bool), (1, 1))


def test_constructor_checks() -> None:
    with pytest.raises(ConfigError):
        SetCriterion(num_classes=70, semantic=False)
    with pytest.raises(ConfigError):
        SetCriterion(num_classes=1, semantic=False, matcher=HungarianMatcher(mask_resolution="target"))
    with pytest.raises(ConfigError):
        SetCriterion(num_classes=1, semantic=False, weights=TermWeights(dice=-1.0))
    criterion = SetCriterion(num_classes=1, semantic=False)
    assert criterion.weight_dict == {
        "loss_class": 2.0,
        "loss_bbox": 5.0,
        "loss_giou": 2.0,
        "loss_mask": 2.0,
        "loss_dice": 5.0,
        "loss_vq": 0.5,
        "loss_distill": 1.0,
        "loss_similarity": 0.0,
        "loss_source": 0.0,
    }
    assert criterion.matcher.costs.dice == 5.0 and criterion.matcher.costs.class_ == 2.0


def test_terms_aux_and_weighted_total() -> None:
    generator = torch.Generator().manual_seed(0)
    criterion = SetCriterion(num_classes=1, semantic=False, weight_vq=0.25, weight_distill=3.0)
    outputs = _random_outputs(generator, 2, 3, 4, 1, aux_layers=2)
    outputs["quant"] = {"vq_loss": torch.tensor(0.4, requires_grad=True), "distill_loss": torch.tensor(0.1)}
    masks = _block_masks(2, 3, semantic=False)
    terms = criterion(outputs, masks, torch.ones(2, 3, dtype=torch.bool))
    base = ["loss_class", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"]
    expected_names = set(base) | {f"{n}_aux{i}" for n in base for i in range(2)} | {"loss_vq", "loss_distill", "loss"}
    assert set(terms) == expected_names
    weights = {
        "loss_class": 2,
        "loss_mask": 2,
        "loss_dice": 5,
        "loss_bbox": 5,
        "loss_giou": 2,
        "loss_vq": 0.25,
        "loss_distill": 3,
    }
    total = sum(weights[name.split("_aux")[0]] * value for name, value in terms.items() if name != "loss")
    torch.testing.assert_close(terms["loss"], total)
    for name, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), name
        if name.startswith(("loss_class", "loss_mask", "loss_dice")):
            assert _value(value) > 0, name
    terms["loss"].backward()
    for layer in [outputs, *outputs["aux_outputs"]]:
        assert layer["pred_masks"].grad is not None and layer["pred_masks"].grad.abs().sum() > 0
        assert layer["pred_logits"].grad.abs().sum() > 0
    assert outputs["quant"]["vq_loss"].grad == pytest.approx(0.25)
    with pytest.raises(KeyError, match="distill_loss"):
        criterion({**outputs, "quant": {"vq_loss": torch.tensor(0.0)}}, masks, torch.ones(2, 3, dtype=torch.bool))


def test_unlabelled_frames_contribute_nothing() -> None:
    generator = torch.Generator().manual_seed(1)
    criterion = SetCriterion(num_classes=70, semantic=True)
    outputs = _random_outputs(generator, 2, 2, 3, 70, aux_layers=1)
    masks = _block_masks(2, 2, semantic=True)
    label_valid = torch.tensor([[True, False], [False, True]])
    terms = criterion(outputs, masks, label_valid)
    terms["loss"].backward()
    for layer in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            grad = layer[key].grad
            assert grad[0, 1].abs().sum() == 0 and grad[1, 0].abs().sum() == 0
            assert grad[0, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0

    # Changing what the model says on unlabelled frames, or their masks, changes nothing.
    changed = {
        "pred_logits": outputs["pred_logits"].detach().clone(),
        "pred_masks": outputs["pred_masks"].detach().clone(),
        "aux_outputs": [{k: v.detach().clone() for k, v in outputs["aux_outputs"][0].items()}],
    }
    for layer in [changed, *changed["aux_outputs"]]:
        layer["pred_logits"][0, 1] = 5.0
        layer["pred_masks"][1, 0] = -3.0
    changed_masks = masks.clone()
    changed_masks[0, 1] = 7
    again = criterion(changed, changed_masks, label_valid)
    for name in terms:
        torch.testing.assert_close(again[name], terms[name].detach())


def test_empty_frames_supervise_classification_only() -> None:
    generator = torch.Generator().manual_seed(2)
    criterion = SetCriterion(num_classes=1, semantic=False)
    outputs = _random_outputs(generator, 1, 2, 3, 1)
    masks = torch.zeros(1, 2, SIZE, SIZE, dtype=torch.long)
    terms = criterion(outputs, masks, torch.ones(1, 2, dtype=torch.bool))
    assert _value(terms["loss_class"]) > 0
    for name in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
        assert _value(terms[name]) == 0.0
    terms["loss"].backward()
    # Every query is pushed towards "no object"; masks get no gradient.
    assert (outputs["pred_logits"].grad > 0).all()
    assert outputs["pred_masks"].grad.abs().sum() == 0

    # Empty frames add class loss but no objects: with an object elsewhere, the normaliser stays 1.
    masks_one = masks.clone()
    masks_one[0, 0, :4, :4] = 1
    only_first = criterion(outputs, masks_one, torch.tensor([[True, False]]))
    both = criterion(outputs, masks_one, torch.tensor([[True, True]]))
    torch.testing.assert_close(only_first["loss_mask"], both["loss_mask"])
    assert _value(both["loss_class"]) > _value(only_first["loss_class"])


def test_no_labelled_frame_gives_zero_loss_with_grad() -> None:
    generator = torch.Generator().manual_seed(3)
    criterion = SetCriterion(num_classes=1, semantic=False)
    outputs = _random_outputs(generator, 2, 2, 3, 1, aux_layers=1)
    outputs["pred_boxes"] = torch.rand(2, 2, 3, 4, generator=generator).requires_grad_()
    terms = criterion(outputs, _block_masks(2, 2, semantic=False), torch.zeros(2, 2, dtype=torch.bool))
    assert _value(terms["loss"]) == 0.0
    assert terms["loss"].requires_grad
    terms["loss"].backward()
    for tensor in (outputs["pred_logits"], outputs["pred_masks"], outputs["pred_boxes"]):
        assert tensor.grad is not None and tensor.grad.abs().sum() == 0
    assert outputs["aux_outputs"][0]["pred_masks"].grad is not None

    # The audio-only quantiser terms are still added.
    outputs["quant"] = {"vq_loss": torch.tensor(2.0), "distill_loss": torch.tensor(1.0)}
    terms = criterion(outputs, _block_masks(2, 2, semantic=False), torch.zeros(2, 2, dtype=torch.bool))
    assert _value(terms["loss"]) == pytest.approx(0.5 * 2.0 + 1.0)


def test_pred_boxes_are_used_and_trained() -> None:
    criterion = SetCriterion(num_classes=1, semantic=False)
    masks = _block_masks(2, 2, semantic=False)[:1, :1]  # one frame, box cxcywh (0.5, 0.25, 0.5, 0.5)
    outputs = _perfect_outputs(masks, 2, 1, semantic=False)
    exact = criterion(outputs, masks, torch.ones(1, 1, dtype=torch.bool))
    assert _value(exact["loss_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert _value(exact["loss_giou"]) == pytest.approx(0.0, abs=1e-6)
    pred_boxes = torch.tensor([[[[0.5, 0.25, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]]]]) + 0.05
    pred_boxes.requires_grad_()
    shifted = criterion({**outputs, "pred_boxes": pred_boxes}, masks, torch.ones(1, 1, dtype=torch.bool))
    assert _value(shifted["loss_bbox"]) == pytest.approx(4 * 0.05, rel=1e-4)
    shifted["loss"].backward()
    assert pred_boxes.grad[0, 0, 0].abs().sum() > 0 and pred_boxes.grad[0, 0, 1].abs().sum() == 0


@pytest.mark.parametrize("semantic", [False, True])
@pytest.mark.parametrize("mask_resolution", ["pred", "target"])
def test_perfect_prediction_beats_random(semantic: bool, mask_resolution: str) -> None:
    classes = 70 if semantic else 1
    criterion = SetCriterion(num_classes=classes, semantic=semantic, mask_resolution=mask_resolution)
    masks = _block_masks(2, 2, semantic=semantic)
    label_valid = torch.ones(2, 2, dtype=torch.bool)
    perfect = criterion(_perfect_outputs(masks, 3, classes, semantic), masks, label_valid)
    generator = torch.Generator().manual_seed(4)
    random_terms = criterion(_random_outputs(generator, 2, 2, 3, classes), masks, label_valid)
    assert _value(perfect["loss"]) < 0.02 * _value(random_terms["loss"])
    # Exact at the prediction resolution; "target" mode sees the bilinear blur of the block edges.
    assert _value(perfect["loss_dice"]) < (1e-3 if mask_resolution == "pred" else 0.1)
    assert _value(perfect["loss_giou"]) < 1e-6


def test_nonfinite_predictions_give_nonfinite_terms_not_an_exception() -> None:
    criterion = SetCriterion(num_classes=1, semantic=False)
    masks = _block_masks(2, 2, semantic=False)
    outputs = _perfect_outputs(masks, 3, 1, semantic=False)
    outputs["pred_masks"][0, 0, 0, 0, 0] = float("nan")
    outputs["pred_boxes"] = torch.full((2, 2, 3, 4), float("nan"))
    terms = criterion(outputs, masks, torch.ones(2, 2, dtype=torch.bool))
    assert not torch.isfinite(terms["loss"])
    assert not torch.isfinite(terms["loss_bbox"]) and torch.isfinite(terms["loss_class"])


def test_similarity_loss_is_bce_plus_dice_on_labelled_foreground() -> None:
    generator = torch.Generator().manual_seed(1)
    masks = _block_masks(2, 3, semantic=True)  # semantic values count as foreground too
    label_valid = torch.tensor([[True, False, True], [True, True, False]])
    similarity = torch.randn(2, 3, 1, SIZE // 4, SIZE // 4, generator=generator).requires_grad_()
    criterion = SetCriterion(num_classes=70, semantic=True, weight_similarity=1.5)
    outputs = _random_outputs(generator, 2, 3, 4, 70)
    terms = criterion({**outputs, "pred_similarity": similarity}, masks, label_valid)

    # by hand: the labelled frames only, foreground area-pooled to stride 4, BCE mean + 1 - dice
    expected = []
    for b, t in label_valid.nonzero().tolist():
        target = torch.nn.functional.avg_pool2d((masks[b, t] > 0).float()[None], 4)[0]
        logit = similarity[b, t, 0].detach()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, target)
        prob = logit.sigmoid()
        dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        expected.append(bce + dice)
    torch.testing.assert_close(terms["loss_similarity"].detach(), torch.stack(expected).mean())
    without = criterion.weight_dict["loss_similarity"] * terms["loss_similarity"]
    rest = SetCriterion(num_classes=70, semantic=True)(outputs, masks, label_valid)["loss"]
    torch.testing.assert_close(terms["loss"].detach(), (rest + without).detach())
    terms["loss"].backward()
    assert similarity.grad[0, 1].abs().sum() == 0  # an unlabelled frame gets no gradient
    assert similarity.grad[0, 0].abs().sum() > 0

    # a perfect map (+/-12 on and off the foreground) costs almost nothing
    perfect = torch.where(masks[..., ::4, ::4] > 0, 12.0, -12.0)[:, :, None].float()
    terms = criterion({**outputs, "pred_similarity": perfect}, masks, label_valid)
    assert _value(terms["loss_similarity"]) < 1e-3


def test_similarity_weight_needs_the_similarity_map() -> None:
    generator = torch.Generator().manual_seed(2)
    outputs = _random_outputs(generator, 2, 2, 3, 1)
    masks = _block_masks(2, 2, semantic=False)
    with pytest.raises(KeyError, match="audio_similarity_dim"):
        SetCriterion(num_classes=1, semantic=False, weight_similarity=1.0)(
            outputs, masks, torch.ones(2, 2, dtype=torch.bool)
        )
    with pytest.raises(ConfigError, match="weight_similarity"):
        SetCriterion(num_classes=1, semantic=False, weight_similarity=-1.0)
    # weight 0 (the default): the term is reported when the map is there, and adds nothing
    similarity = torch.zeros(2, 2, 1, SIZE // 4, SIZE // 4)
    terms = SetCriterion(num_classes=1, semantic=False)(
        {**outputs, "pred_similarity": similarity}, masks, torch.ones(2, 2, dtype=torch.bool)
    )
    plain = SetCriterion(num_classes=1, semantic=False)(outputs, masks, torch.ones(2, 2, dtype=torch.bool))
    assert "loss_similarity" in terms
    torch.testing.assert_close(terms["loss"], plain["loss"])


# ------------------------------------------------------------------ clip-level matching (ReferFormer)
@pytest.mark.parametrize("semantic", [False, True])
def test_clip_matching_equals_frame_matching_with_one_labelled_frame_per_clip(semantic: bool) -> None:
    """With one labelled frame per clip the clip instance is the frame object: same terms."""
    generator = torch.Generator().manual_seed(3)
    classes = 70 if semantic else 1
    outputs = _random_outputs(generator, 2, 3, 4, classes, aux_layers=1)
    outputs["pred_boxes"] = torch.rand(2, 3, 4, 4, generator=generator) * 0.5 + 0.25
    outputs["aux_outputs"][0]["pred_boxes"] = outputs["pred_boxes"].flip(2)
    masks = _block_masks(2, 3, semantic)
    label_valid = torch.zeros(2, 3, dtype=torch.bool)
    label_valid[0, 0] = label_valid[1, 1] = True
    clip = SetCriterion(num_classes=classes, semantic=semantic, match_level="clip")(outputs, masks, label_valid)
    frame = SetCriterion(num_classes=classes, semantic=semantic, match_level="frame")(outputs, masks, label_valid)
    assert set(clip) == set(frame)
    for name in frame:
        torch.testing.assert_close(clip[name], frame[name], msg=name)


def test_clip_matching_picks_the_query_that_follows_the_object() -> None:
    """Query 0 fits frame 0 best but misses frames 1-2; query 1 fits all three reasonably: the clip
    match takes query 1 for every frame, the frame match takes query 0 in frame 0."""
    masks = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.long)
    masks[0, :, 4:12, 4:12] = 1
    small = masks[0, :, ::4, ::4].float()
    mask_logits = torch.full((1, 3, 2, SIZE // 4, SIZE // 4), -8.0)
    mask_logits[0, 0, 0] = small[0] * 16 - 8  # perfect in frame 0
    mask_logits[0, :, 1] = small * 4 - 2  # good everywhere
    outputs = {"pred_logits": torch.zeros(1, 3, 2, 1), "pred_masks": mask_logits}
    labelled = torch.ones(1, 3, dtype=torch.bool)
    clip = SetCriterion(num_classes=1, semantic=False, match_level="clip", weights=TermWeights(bbox=0, giou=0))
    targets = clip.build_targets(masks, labelled, (SIZE // 4, SIZE // 4))
    instances = clip.clip_instances(targets, 3)
    assert len(instances) == 1 and instances[0]["objects"].tolist() == [[0, 1, 2]]
    frames = {k: v.flatten(0, 1) for k, v in outputs.items()}
    frames["pred_boxes"] = torch.full((3, 2, 4), 0.5)
    clip_target = {
        "labels": torch.tensor([0]),
        "masks": targets.masks[None],
        "boxes": targets.boxes[None],
        "present": torch.ones(1, 3, dtype=torch.bool),
    }
    ((query, _),) = clip.matcher.match_clips([frames], [clip_target])
    assert query.tolist() == [1]
    per_frame = clip.matcher(frames, targets.per_frame)
    assert per_frame[0][0].tolist() == [0] and per_frame[1][0].tolist() == [1]


def test_clip_mask_and_dice_are_per_instance_over_its_labelled_frames() -> None:
    """One object present in frame 0, absent in frame 1 (both labelled), frame 2 unlabelled:
    mask focal = mean over the two frames' pixels, dice over both frames together (empty target
    in frame 1), class target only in frame 0, all divided by the 1 (frame, object) pair."""
    generator = torch.Generator().manual_seed(5)
    masks = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.long)
    masks[0, 0, 0:8, 0:8] = 1
    masks[0, 2, 8:16, 8:16] = 1  # unlabelled: must be ignored
    labelled = torch.tensor([[True, True, False]])
    outputs = _random_outputs(generator, 1, 3, 1, 1)
    outputs["pred_boxes"] = torch.full((1, 3, 1, 4), 0.4)
    terms = SetCriterion(num_classes=1, semantic=False, match_level="clip")(outputs, masks, labelled)
    logits = outputs["pred_masks"][0, :2, 0].detach().flatten()  # two labelled frames, one query
    target = (masks[0, :2, ::4, ::4] > 0).float().flatten()
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha_t * ce * (1 - p_t) ** 2).mean()
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    torch.testing.assert_close(terms["loss_mask"].detach(), focal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_dice"].detach(), dice, rtol=1e-5, atol=1e-6)
    class_logits = outputs["pred_logits"][0, :2, 0, 0].detach()
    class_target = torch.tensor([1.0, 0.0])
    p = class_logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(class_logits, class_target, reduction="none")
    p_t = p * class_target + (1 - p) * (1 - class_target)
    alpha_t = 0.25 * class_target + 0.75 * (1 - class_target)
    torch.testing.assert_close(
        terms["loss_class"].detach(), (alpha_t * ce * (1 - p_t) ** 2).sum(), rtol=1e-5, atol=1e-6
    )
    box = torch.tensor([0.25, 0.25, 0.5, 0.5])  # frame 0's object only
    torch.testing.assert_close(terms["loss_bbox"].detach(), (torch.full((4,), 0.4) - box).abs().sum())


def test_match_level_is_checked() -> None:
    with pytest.raises(ConfigError, match="match_level"):
        SetCriterion(num_classes=1, semantic=False, match_level="video")


def test_matcher_is_built_from_config_in_one_place() -> None:
    """``matcher=None``: costs equal the loss weights and share the focal / resolution settings;
    a ``model.matcher`` mapping: its costs, the rest HungarianMatcher's defaults, the loss's
    mask resolution; both through `build_matcher`."""
    weighted = SetCriterion(
        num_classes=1,
        semantic=False,
        weights=TermWeights(dice=3.0),
        focal=FocalLoss(gamma=1.5),
        mask_resolution="target",
    )
    matcher = weighted.matcher
    settings = (matcher.costs.dice, matcher.costs.class_, matcher.focal.gamma, matcher.mask_resolution)
    assert settings == (3.0, 2.0, 1.5, "target")
    configured = SetCriterion(num_classes=1, semantic=False, matcher={"cost_class": 1.0}, mask_resolution="target")
    matcher = configured.matcher
    settings = (matcher.costs.class_, matcher.costs.dice, matcher.focal.gamma, matcher.mask_resolution)
    assert settings == (1.0, 5.0, 2.0, "target")
    with pytest.raises(ConfigError, match="mask_resolution"):
        SetCriterion(num_classes=1, semantic=False, matcher={"mask_resolution": "pred"}, mask_resolution="target")
