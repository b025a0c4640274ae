"""Box utilities for the set criterion: boxes from masks, format conversions, generalised IoU.

Conventions: boxes are either ``xyxy`` (corners) or ``cxcywh`` (centre, width, height), both
normalised to [0, 1] by the mask's width and height. A mask pixel (row r, column c) covers the
square [c, c+1) x [r, r+1), so the box of a mask spans from the smallest occupied column to the
largest occupied column + 1: a full mask has the box (0, 0, 1, 1) at every resolution, which keeps
boxes from a stride-4 predicted mask comparable with boxes from the full-resolution ground truth.
An empty mask has the all-zero box.

Format conversions and areas are torchvision's (`torchvision.ops.box_convert`, ``box_area``). Two
functions stay here because torchvision's differ on purpose: `masks_to_boxes` (torchvision's
``masks_to_boxes`` gives inclusive pixel indices, [N, H, W] only, not the pixel-cover boxes
above) and `box_iou` / `generalized_box_iou` (torchvision divides by the union and the enclosing
area unguarded, so two degenerate boxes - the zero box of an empty predicted mask - give NaN; here
the divisions are guarded by a small epsilon). tests/test_matcher.py checks both against
torchvision where they agree.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert

__all__ = [
    "masks_to_boxes",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "box_iou",
    "generalized_box_iou",
]

# Guards the divisions of GIoU when both boxes are degenerate (empty predicted masks).
_EPS = 1e-7


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight boxes around the non-zero pixels of masks.

    Args:
        masks: [..., H, W], bool or numeric (non-zero = inside).

    Returns:
        [..., 4] float normalised ``cxcywh``; all zeros for an empty mask. Not differentiable
        (a box from a thresholded mask has no useful gradient).
    """
    if masks.dim() < 2:
        raise ValueError(f"masks_to_boxes expects [..., H, W], got shape {tuple(masks.shape)}")
    height, width = masks.shape[-2:]
    occupied = masks != 0
    if height == 0 or width == 0:
        raise ValueError(f"masks_to_boxes got an empty spatial size {height}x{width}")
    rows_any = occupied.any(dim=-1)  # [..., H]
    cols_any = occupied.any(dim=-2)  # [..., W]
    row_ids = torch.arange(height, device=masks.device)
    col_ids = torch.arange(width, device=masks.device)
    # Smallest / largest occupied index: mask the unused positions with out-of-range sentinels.
    y_min = torch.where(rows_any, row_ids, height).amin(dim=-1)
    y_max = torch.where(rows_any, row_ids, -1).amax(dim=-1) + 1
    x_min = torch.where(cols_any, col_ids, width).amin(dim=-1)
    x_max = torch.where(cols_any, col_ids, -1).amax(dim=-1) + 1
    boxes_xyxy = torch.stack([x_min / width, y_min / height, x_max / width, y_max / height], dim=-1).to(torch.float32)
    nonempty = rows_any.any(dim=-1, keepdim=True)
    boxes = box_xyxy_to_cxcywh(boxes_xyxy)
    return torch.where(nonempty, boxes, torch.zeros_like(boxes))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1) (`torchvision.ops.box_convert`)."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h) (`torchvision.ops.box_convert`)."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy. boxes2: [M, 4] xyxy.

    Returns:
        (iou [N, M], union [N, M]).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    intersection = extent[..., 0] * extent[..., 1]
    union = area1[:, None] + area2[None, :] - intersection
    return intersection / union.clamp(min=_EPS), union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes.

    ``GIoU = IoU - (|C| - |A u B|) / |C|`` with C the smallest box enclosing both. Degenerate
    (zero-area) boxes are allowed: the divisions are guarded by a small epsilon, so two identical
    points give 0 rather than NaN. Inverted boxes (x1 < x0) are a caller bug and raise.

    Args:
        boxes1: [N, 4] xyxy. boxes2: [M, 4] xyxy.

    Returns:
        [N, M] in [-1, 1].
    """
    for name, boxes in (("boxes1", boxes1), ("boxes2", boxes2)):
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"generalized_box_iou: {name} must be [N, 4], got {tuple(boxes.shape)}")
        # Written as "any inverted" so that NaN boxes pass through (and give NaN losses the
        # training loop reports) instead of raising here.
        if bool((boxes[:, 2:] < boxes[:, :2]).any()):
            raise ValueError(f"generalized_box_iou: {name} has boxes with x1 < x0 or y1 < y0")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    enclosing = extent[..., 0] * extent[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)
