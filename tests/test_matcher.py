"""Hungarian matcher (optimal on small problems, cost terms) and box utilities (hand values)."""

from __future__ import annotations

import itertools

import pytest
import torch

from avseg.errors import ConfigError
from avseg.models.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
)
from avseg.models.matcher import HungarianMatcher, align_masks
from avseg.models.terms import TermWeights, sigmoid_focal_terms


def _random_target(generator: torch.Generator, num_objects: int, num_classes: int, size: int) -> dict:
    masks = (torch.rand(num_objects, size, size, generator=generator) > 0.6).float()
    masks[:, 0, 0] = 1.0  # never empty
    return {
        "labels": torch.randint(0, num_classes, (num_objects,), generator=generator),
        "masks": masks,
        "boxes": masks_to_boxes(masks),
    }


def _brute_force_cost(cost: torch.Tensor) -> float:
    """Minimum total cost over every injective assignment of the smaller side."""
    num_queries, num_targets = cost.shape
    best = float("inf")
    if num_targets <= num_queries:
        for queries in itertools.permutations(range(num_queries), num_targets):
            best = min(best, sum(float(cost[q, t]) for t, q in enumerate(queries)))
    else:
        for targets in itertools.permutations(range(num_targets), num_queries):
            best = min(best, sum(float(cost[q, t]) for q, t in enumerate(targets)))
    return best


@pytest.mark.parametrize("num_queries,num_targets", [(4, 1), (4, 3), (5, 5), (3, 4), (4, 0)])
def test_matcher_is_optimal_against_brute_force(num_queries: int, num_targets: int) -> None:
    generator = torch.Generator().manual_seed(num_queries * 10 + num_targets)
    matcher = HungarianMatcher()
    num_frames, num_classes, size = 3, 4, 8
    outputs = {
        "pred_logits": torch.randn(num_frames, num_queries, num_classes, generator=generator),
        "pred_masks": torch.randn(num_frames, num_queries, size, size, generator=generator) * 3,
    }
    targets = [_random_target(generator, num_targets, num_classes, size) for _ in range(num_frames)]
    indices = matcher(outputs, targets)
    assert len(indices) == num_frames
    boxes = masks_to_boxes(outputs["pred_masks"].sigmoid() > 0.5)
    for frame, (rows, cols) in enumerate(indices):
        assert rows.dtype == torch.long and cols.dtype == torch.long
        assert len(rows) == len(cols) == min(num_queries, num_targets)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        cost = matcher.frame_cost(
            outputs["pred_logits"][frame], outputs["pred_masks"][frame], boxes[frame], targets[frame]
        )
        chosen = float(cost[rows, cols].sum()) if len(rows) else 0.0
        expected = _brute_force_cost(cost) if num_targets else 0.0
        assert chosen == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_matcher_accepts_batch_time_layout_and_pred_boxes() -> None:
    generator = torch.Generator().manual_seed(3)
    batch, frames, queries, classes, size = 2, 3, 4, 2, 8
    pred_logits = torch.randn(batch, frames, queries, classes, generator=generator)
    pred_masks = torch.randn(batch, frames, queries, size, size, generator=generator)
    targets = [_random_target(generator, 2, classes, size) for _ in range(batch * frames)]
    matcher = HungarianMatcher()
    flat = matcher({"pred_logits": pred_logits.flatten(0, 1), "pred_masks": pred_masks.flatten(0, 1)}, targets)
    nested = matcher({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)
    for (rows_a, cols_a), (rows_b, cols_b) in zip(flat, nested):
        assert torch.equal(rows_a, rows_b) and torch.equal(cols_a, cols_b)

    # With box costs only, the model's own boxes decide the matching.
    box_matcher = HungarianMatcher(costs=TermWeights(class_=0, mask=0, dice=0, bbox=1, giou=1))
    target_boxes = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.3, 0.3]])
    target = {"labels": torch.zeros(2, dtype=torch.long), "masks": torch.zeros(2, size, size), "boxes": target_boxes}
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.7, 0.68, 0.3, 0.3], [0.21, 0.2, 0.2, 0.2]]])
    rows, cols = box_matcher(
        {
            "pred_logits": torch.zeros(1, 3, 1),
            "pred_masks": torch.zeros(1, 3, size, size),
            "pred_boxes": pred_boxes,
        },
        [target],
    )[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 1}


def test_matcher_prefers_the_query_whose_mask_fits() -> None:
    size = 16
    target_mask = torch.zeros(1, 32, 32)
    target_mask[0, 8:24, 0:16] = 1.0
    target = {"labels": torch.zeros(1, dtype=torch.long), "masks": target_mask, "boxes": masks_to_boxes(target_mask)}
    pred_masks = torch.full((1, 3, size, size), -8.0)
    pred_masks[0, 0, :8, :] = 8.0  # wrong place
    pred_masks[0, 1, 4:12, 0:8] = 8.0  # the object, at stride 2
    pred_masks[0, 2] = 8.0  # everything
    for resolution in ("pred", "target"):
        matcher = HungarianMatcher(mask_resolution=resolution)
        rows, cols = matcher({"pred_logits": torch.zeros(1, 3, 1), "pred_masks": pred_masks}, [target])[0]
        assert rows.tolist() == [1] and cols.tolist() == [0]


def test_matcher_rejects_bad_input() -> None:
    matcher = HungarianMatcher()
    target = {"labels": torch.tensor([3]), "masks": torch.ones(1, 4, 4), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}
    with pytest.raises(ValueError, match="labels"):
        matcher({"pred_logits": torch.zeros(1, 2, 2), "pred_masks": torch.zeros(1, 2, 4, 4)}, [target])
    with pytest.raises(ValueError, match="targets"):
        matcher({"pred_logits": torch.zeros(2, 2, 4), "pred_masks": torch.zeros(2, 2, 4, 4)}, [target])
    # Non-finite predictions still get a (meaningless but valid) assignment; their losses are
    # non-finite and the training loop deals with them (tests/test_criterion.py).
    rows, cols = matcher(
        {"pred_logits": torch.full((1, 2, 4), float("nan")), "pred_masks": torch.zeros(1, 2, 4, 4)}, [target]
    )[0]
    assert len(rows) == len(cols) == 1
    with pytest.raises(ConfigError):
        HungarianMatcher(mask_resolution="full")
    with pytest.raises(ConfigError):
        HungarianMatcher(costs=TermWeights(class_=0, bbox=0, giou=0, mask=0, dice=0))


def test_focal_terms_and_alignment() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0])
    pos, neg = sigmoid_focal_terms(logits, alpha=0.25, gamma=2.0)
    prob = logits.sigmoid()
    torch.testing.assert_close(pos, 0.25 * (1 - prob) ** 2 * -torch.log(prob))
    torch.testing.assert_close(neg, 0.75 * prob**2 * -torch.log(1 - prob))
    # Area downsampling: a 2x2 block half covered gives 0.5.
    target = torch.zeros(1, 4, 4)
    target[0, 0, 0:2] = 1.0
    _, small = align_masks(torch.zeros(3, 2, 2), target, "pred")
    torch.testing.assert_close(small, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    big, same = align_masks(torch.zeros(3, 2, 2), target, "target")
    assert big.shape == (3, 4, 4) and same is target


def test_masks_to_boxes_hand_values() -> None:
    masks = torch.zeros(3, 4, 8, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True  # rows 1..2, cols 2..5 -> x 2/8..6/8, y 1/4..3/4
    masks[1] = True
    boxes = masks_to_boxes(masks)
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(boxes[1], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(boxes[2], torch.zeros(4))
    single = torch.zeros(2, 2)
    single[1, 0] = 1
    torch.testing.assert_close(masks_to_boxes(single), torch.tensor([0.25, 0.75, 0.5, 0.5]))
    assert masks_to_boxes(torch.zeros(2, 3, 4, 4)).shape == (2, 3, 4)


def test_box_conversions_and_giou_hand_values() -> None:
    xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh[0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_area(xyxy), torch.tensor([4.0, 4.0, 1.0]))
    iou, union = box_iou(xyxy[:1], xyxy[1:2])
    torch.testing.assert_close(iou, torch.tensor([[1 / 7]]))
    torch.testing.assert_close(union, torch.tensor([[7.0]]))
    giou = generalized_box_iou(xyxy, xyxy)
    # Boxes 0 and 1: IoU 1/7, enclosing box 3x3 = 9, GIoU = 1/7 - (9 - 7)/9.
    torch.testing.assert_close(giou[0, 1], torch.tensor(1 / 7 - 2 / 9))
    # Boxes 0 and 2: disjoint, enclosing 5x2 = 10, union 5: GIoU = 0 - 5/10.
    torch.testing.assert_close(giou[0, 2], torch.tensor(-0.5))
    torch.testing.assert_close(torch.diag(giou), torch.ones(3))
    torch.testing.assert_close(giou, giou.T)
    # Degenerate boxes do not give NaN.
    point = torch.zeros(1, 4)
    assert torch.isfinite(generalized_box_iou(point, point)).all()
    with pytest.raises(ValueError, match="x1 < x0"):
        generalized_box_iou(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), xyxy)
    assert torch.isnan(generalized_box_iou(torch.full((1, 4), float("nan")), xyxy)).all()


def test_box_ops_agree_with_torchvision_where_torchvision_is_defined() -> None:
    import torchvision.ops as tvo

    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(7, 2, generator=generator)
    xyxy = torch.cat([corner, corner + torch.rand(7, 2, generator=generator) + 0.01], dim=-1)
    assert torch.equal(generalized_box_iou(xyxy, xyxy.flip(0)), tvo.generalized_box_iou(xyxy, xyxy.flip(0)))
    assert torch.equal(box_iou(xyxy, xyxy.flip(0))[0], tvo.box_iou(xyxy, xyxy.flip(0)))
    # pixel-cover boxes: torchvision's inclusive maximum index + 1, normalised by the size
    masks = torch.rand(5, 9, 11, generator=generator) > 0.7
    expected = (tvo.masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])) / torch.tensor([11.0, 9.0, 11.0, 9.0])
    torch.testing.assert_close(box_cxcywh_to_xyxy(masks_to_boxes(masks)), expected)
