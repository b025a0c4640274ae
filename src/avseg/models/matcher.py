"""Hungarian matching between decoder queries and ground-truth objects, per frame or per clip.

``forward`` matches every frame on its own (``match_level: frame``). ``match_clips`` matches once
per clip (``match_level: clip``, ReferFormer's matcher): a query is one object across the clip, and
its cost against an object is the class and box costs averaged over the frames where the object is
present plus the mask focal / dice costs over the clip's labelled frames taken together (an absent
object's target is empty there), so the match is the query that follows the object best.

Costs (`avseg.models.terms.TermWeights`, docs/METHOD.md section 1.7, ReferFormer-family defaults;
the matching costs equal the loss weights): class sigmoid focal 2, box L1 5, box GIoU 2, mask sigmoid
focal 2, mask dice 5.

Mask resolution (``mask_resolution``):
  - ``"pred"`` (default): masks are compared at the prediction resolution (stride 4, e.g. 56x56
    for 224 px inputs). Ground-truth masks are area-downsampled to that size, which gives soft
    targets in [0, 1] (the fraction of each stride-4 cell covered by the object), so thin objects
    are not lost as they would be by nearest-neighbour downsampling. 16x fewer pixels than the
    alternative, on every query of every frame of every decoder layer.
  - ``"target"``: predicted mask logits are bilinearly upsampled (align_corners=False) to the
    ground-truth resolution and compared with the binary masks there (an avseg option; ReferFormer
    instead point-samples the ground truth at the stride-4 cell centres, ``mask[2::4, 2::4]``, and
    compares at the prediction's resolution, as ``"pred"`` does with area sampling).
The focal term is written as ``t * pos + (1 - t) * neg`` (the expected binary focal loss under a
Bernoulli(t) target): for binary targets it is the usual sigmoid focal loss, and it stays linear in
``t``, so the pairwise matching cost of a (query, object) pair equals the mask loss of that pair.

Boxes are normalised cxcywh. The ground-truth box comes from the full-resolution mask
(`box_ops.masks_to_boxes`). The predicted box is the model's ``pred_boxes`` when the outputs carry
that key, else the tight box of the predicted mask thresholded at ``sigmoid > 0.5`` (no gradient).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from avseg.errors import ConfigError
from avseg.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, masks_to_boxes
from avseg.models.options import non_negative, present, raise_first
from avseg.models.terms import FOCAL_CHECKS, TERMS, FocalLoss, TermWeights
from avseg.precision import full_precision

__all__ = [
    "MASK_RESOLUTIONS",
    "MATCHER_KEYS",
    "HungarianMatcher",
    "align_masks",
    "build_matcher",
    "predicted_boxes",
]

MASK_RESOLUTIONS = ("pred", "target")
# Stand-in for NaN / inf costs (see `HungarianMatcher.forward`).
_NONFINITE_COST = 1e8


def align_masks(pred_masks: Tensor, target_masks: Tensor, mask_resolution: str) -> tuple[Tensor, Tensor]:
    """Bring predicted mask logits and target masks to one resolution.

    Args:
        pred_masks: [Nq, h, w] logits.
        target_masks: [n, H, W] float in [0, 1].
        mask_resolution: ``"pred"`` (area-downsample targets to [h, w]) or ``"target"``
            (bilinearly upsample logits to [H, W]).

    Returns:
        (pred [Nq, S, S'], target [n, S, S']) at the common size.
    """
    if mask_resolution not in MASK_RESOLUTIONS:
        raise ConfigError(f"mask_resolution={mask_resolution!r}: allowed values are {MASK_RESOLUTIONS}")
    if pred_masks.shape[-2:] == target_masks.shape[-2:]:
        return pred_masks, target_masks
    if mask_resolution == "pred":
        if target_masks.shape[0] == 0:
            return pred_masks, target_masks.new_zeros((0, *pred_masks.shape[-2:]))
        resized = F.interpolate(target_masks[:, None], size=pred_masks.shape[-2:], mode="area")
        return pred_masks, resized[:, 0]
    if pred_masks.shape[0] == 0:
        return pred_masks.new_zeros((0, *target_masks.shape[-2:])), target_masks
    resized = F.interpolate(pred_masks[:, None], size=target_masks.shape[-2:], mode="bilinear", align_corners=False)
    return resized[:, 0], target_masks


@torch.no_grad()
def predicted_boxes(pred_masks: Tensor) -> Tensor:
    """Tight normalised cxcywh boxes of ``sigmoid(pred_masks) > 0.5``: [..., h, w] -> [..., 4]."""
    return masks_to_boxes(pred_masks.detach().float().sigmoid() > 0.5)


def _flatten_frames(tensor: Tensor, trailing_dims: int) -> Tensor:
    """[B, T, ...] or [F, ...] -> [F, ...] where ``...`` has ``trailing_dims`` dimensions."""
    if tensor.dim() == trailing_dims + 2:
        return rearrange(tensor, "b t ... -> (b t) ...")
    if tensor.dim() == trailing_dims + 1:
        return tensor
    raise ValueError(
        f"expected a tensor with {trailing_dims + 1} ([F, ...]) or {trailing_dims + 2} ([B, T, ...]) "
        f"dimensions, got shape {tuple(tensor.shape)}"
    )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth objects, independently per frame.

    ``forward(outputs, targets)``:
      - ``outputs["pred_logits"]`` [F, Nq, K] or [B, T, Nq, K] class logits (sigmoid, no background),
      - ``outputs["pred_masks"]`` [F, Nq, h, w] or [B, T, Nq, h, w] mask logits,
      - optional ``outputs["pred_boxes"]`` [F, Nq, 4] or [B, T, Nq, 4] normalised cxcywh;
      - ``targets``: F dicts (frames in (b, t) order when the outputs are [B, T, ...]) with
        ``labels`` [n] long in [0, K), ``masks`` [n, H, W] float in [0, 1], ``boxes`` [n, 4]
        normalised cxcywh.
    Returns F pairs ``(query_indices [m] long, target_indices [m] long)``, m = min(Nq, n), sorted
    by query index, on the CPU.
    """

    def __init__(
        self, *, costs: TermWeights = TermWeights(), focal: FocalLoss = FocalLoss(), mask_resolution: str = "pred"
    ) -> None:
        """
        Args:
            costs: the weight of each term in the cost (`TermWeights`; by default the loss weights'
                defaults, ReferFormer's convention); not all zero.
            focal: the focal parameters of the class and mask costs.
            mask_resolution: ``"pred"`` or ``"target"`` (see the module docstring).
        """
        super().__init__()
        if not any(costs.named().values()):
            raise ConfigError("matcher: all costs are 0, the matching would be arbitrary")
        if mask_resolution not in MASK_RESOLUTIONS:
            raise ConfigError(f"matcher.mask_resolution={mask_resolution!r}: allowed values are {MASK_RESOLUTIONS}")
        self.costs = costs
        self.focal = focal
        self.mask_resolution = mask_resolution

    def extra_repr(self) -> str:
        return f"costs={self.costs}, focal={self.focal}, mask_resolution={self.mask_resolution!r}"

    def class_box_cost(self, pred_logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
        """Class (focal) + box (L1, GIoU) cost of one frame.

        Args:
            pred_logits: [Nq, K]. pred_boxes: [Nq, 4] cxcywh. labels: [n] long. boxes: [n, 4] cxcywh.

        Returns:
            [Nq, n] float32.
        """
        pos, neg = self.focal.terms(pred_logits.float())
        cost = self.costs.class_ * (pos[:, labels] - neg[:, labels])
        boxes_pred, boxes_target = pred_boxes.float(), boxes.float()
        cost = cost + self.costs.bbox * torch.cdist(boxes_pred, boxes_target, p=1)
        return cost - self.costs.giou * generalized_box_iou(
            box_cxcywh_to_xyxy(boxes_pred), box_cxcywh_to_xyxy(boxes_target)
        )

    def mask_terms(self, pred_masks: Tensor, target_masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One frame's masks at the common resolution (`align_masks`), float32, flattened.

        Args:
            pred_masks: [Nq, h, w] logits. target_masks: [n, H, W] in [0, 1].

        Returns:
            (focal cost summed over the P pixels [Nq, n], sigmoid of the logits [Nq, P], target [n, P]).
        """
        masks_pred, masks_target = align_masks(pred_masks.float(), target_masks.float(), self.mask_resolution)
        masks_pred, masks_target = masks_pred.flatten(1), masks_target.flatten(1)
        pos, neg = self.focal.terms(masks_pred)
        return pos @ masks_target.T + neg @ (1 - masks_target).T, masks_pred.sigmoid(), masks_target

    @full_precision  # float32 costs under autocast: bf16 would turn near-ties into other assignments
    def frame_cost(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        pred_boxes: Tensor,
        target: dict[str, Tensor],
    ) -> Tensor:
        """Cost matrix of one frame.

        Args:
            pred_logits: [Nq, K]. pred_masks: [Nq, h, w]. pred_boxes: [Nq, 4] cxcywh.
            target: ``labels`` [n], ``masks`` [n, H, W], ``boxes`` [n, 4].

        Returns:
            [Nq, n] float32 (lower is better).
        """
        cost = self.class_box_cost(pred_logits, pred_boxes, target["labels"], target["boxes"])
        focal_sum, prob, masks_target = self.mask_terms(pred_masks, target["masks"])
        focal = focal_sum / prob.shape[1]
        numerator = 2 * prob @ masks_target.T
        denominator = prob.sum(-1)[:, None] + masks_target.sum(-1)[None, :]
        dice = 1 - (numerator + 1) / (denominator + 1)
        return cost + self.costs.mask * focal + self.costs.dice * dice

    def clip_cost(self, outputs: Mapping[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        """Cost matrix of one clip (its labelled frames only).

        Args:
            outputs: ``pred_logits`` [F, Nq, K], ``pred_masks`` [F, Nq, h, w], ``pred_boxes`` [F, Nq, 4] cxcywh.
            target: ``labels`` [n], ``masks`` [n, F, H, W] (empty where absent), ``boxes`` [n, F, 4],
                ``present`` [n, F] bool (every object present in at least one frame).

        Returns:
            [Nq, n] float32: class and box costs averaged over each object's present frames, mask
            focal cost averaged over all F frames' pixels, dice over the F frames taken together.
        """
        pred_logits, pred_masks, pred_boxes = outputs["pred_logits"], outputs["pred_masks"], outputs["pred_boxes"]
        labels, present = target["labels"], target["present"].float()  # [n], [n, F]
        frames_present = present.sum(1).clamp_min(1.0)  # [n]
        num_frames, num_queries = pred_logits.shape[:2]
        cost = pred_logits.new_zeros((num_queries, labels.shape[0]), dtype=torch.float32)
        focal = torch.zeros_like(cost)
        inter = torch.zeros_like(cost)
        prob_sum = torch.zeros_like(cost)
        target_sum = cost.new_zeros((labels.shape[0],))
        num_pixels = 0
        for f in range(num_frames):
            weight = present[:, f] / frames_present  # [n]
            frame_cost = self.class_box_cost(pred_logits[f], pred_boxes[f], labels, target["boxes"][:, f])
            cost = cost + frame_cost * weight[None, :]
            frame_focal, prob, masks_target = self.mask_terms(pred_masks[f], target["masks"][:, f])
            num_pixels += prob.shape[1]
            focal = focal + frame_focal
            inter = inter + prob @ masks_target.T
            prob_sum = prob_sum + prob.sum(-1)[:, None]
            target_sum = target_sum + masks_target.sum(-1)
        dice = 1 - (2 * inter + 1) / (prob_sum + target_sum[None, :] + 1)
        return cost + self.costs.mask * focal / max(num_pixels, 1) + self.costs.dice * dice

    @torch.no_grad()
    def match_clips(
        self, clip_outputs: list[dict[str, Tensor]], clip_targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """One assignment per clip: ``clip_outputs`` / ``clip_targets`` as ``clip_cost``'s
        arguments; returns per clip ``(query_indices, object_indices)`` sorted by query, on the CPU."""
        return self._assign([self.clip_cost(out, target) for out, target in zip(clip_outputs, clip_targets)])

    @staticmethod
    def _assign(costs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        # One device-to-host copy for all cost matrices. Non-finite costs come from non-finite
        # predictions, whose losses are then non-finite too: the training loop reports (or skips)
        # such a batch. Matching them as "very bad" keeps every DDP rank on the same code path.
        shapes = [tuple(cost.shape) for cost in costs]
        flat = torch.cat([cost.flatten() for cost in costs]).cpu() if costs else torch.zeros(0)
        flat = torch.nan_to_num(flat, nan=_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
        indices: list[tuple[Tensor, Tensor]] = []
        offset = 0
        for rows_count, cols_count in shapes:
            matrix = flat[offset : offset + rows_count * cols_count].view(rows_count, cols_count)
            offset += rows_count * cols_count
            rows, cols = linear_sum_assignment(matrix.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        pred_logits = _flatten_frames(outputs["pred_logits"], 2)
        pred_masks = _flatten_frames(outputs["pred_masks"], 3)
        if "pred_boxes" in outputs and outputs["pred_boxes"] is not None:
            pred_boxes = _flatten_frames(outputs["pred_boxes"], 2)
        else:
            pred_boxes = predicted_boxes(pred_masks)
        num_frames, num_queries = pred_logits.shape[:2]
        if pred_masks.shape[:2] != (num_frames, num_queries) or pred_boxes.shape[:2] != (num_frames, num_queries):
            raise ValueError(
                f"matcher: pred_logits {tuple(pred_logits.shape)}, pred_masks {tuple(pred_masks.shape)} and "
                f"pred_boxes {tuple(pred_boxes.shape)} disagree on frames / queries"
            )
        if len(targets) != num_frames:
            raise ValueError(f"matcher: {len(targets)} targets for {num_frames} frames")
        num_classes = pred_logits.shape[-1]
        all_labels = torch.cat([target["labels"].reshape(-1) for target in targets]) if targets else None
        if all_labels is not None and all_labels.numel():
            # One host sync for the whole batch rather than one per frame.
            low, high = torch.aminmax(all_labels)
            if int(low) < 0 or int(high) >= num_classes:
                raise ValueError(f"matcher: target labels must be in [0, {num_classes}), got [{int(low)}, {int(high)}]")

        costs = [self.frame_cost(pred_logits[i], pred_masks[i], pred_boxes[i], targets[i]) for i in range(num_frames)]
        return self._assign(costs)


# the keys a ``model.matcher`` mapping may hold
MATCHER_KEYS = (*(f"cost_{term}" for term in TERMS), *FOCAL_CHECKS, "mask_resolution")


def build_matcher(
    costs: Mapping[str, Any] | None, *, weights: TermWeights, focal: FocalLoss, mask_resolution: str
) -> HungarianMatcher:
    """The matcher of a criterion, from the ``model.matcher`` config: the one place it is built.

    ``costs`` null or empty: the costs are the loss ``weights`` (ReferFormer's convention) and the
    matcher shares the loss's ``focal`` parameters and ``mask_resolution``. Otherwise ``costs``
    holds `MATCHER_KEYS` (``cost_class`` ... ``cost_dice``, ``focal_alpha``, ``focal_gamma``,
    ``mask_resolution``): unset costs and focal parameters take their defaults and
    ``mask_resolution`` the loss's.
    """
    if not costs:
        return HungarianMatcher(costs=weights, focal=focal, mask_resolution=mask_resolution)
    unknown = sorted(set(costs) - set(MATCHER_KEYS))
    if unknown:
        raise ConfigError(f"model.matcher.{unknown[0]}: not a matcher option; allowed keys: {', '.join(MATCHER_KEYS)}")
    checks = {**dict.fromkeys((f"cost_{term}" for term in TERMS), non_negative), **FOCAL_CHECKS}
    raise_first(present(costs, checks, "model.matcher."))
    return HungarianMatcher(
        costs=TermWeights.from_options(costs, "cost_"),
        focal=FocalLoss.from_options(costs),
        mask_resolution=costs.get("mask_resolution", mask_resolution),
    )
