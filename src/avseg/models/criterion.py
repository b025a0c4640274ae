"""Set criterion of QDFormer: Hungarian matching (per clip or per frame) and the DETR-family losses.

``match_level: clip`` (the paper setup, ReferFormer's criterion): one match per clip, a query being
one object across the clip; see ``SetCriterion._stream_losses_clip``. ``match_level: frame`` (the
keyword default and the CPU demo): every labelled frame matched on its own, as described below.

Targets (docs/METHOD.md section 1.7):
  - binary (AVS, ``semantic=False``, ``num_classes=1``): a labelled frame whose mask has any
    foreground (value 1) holds one object of class 0 whose mask is the foreground;
  - semantic (AVSS, ``semantic=True``, ``num_classes=70`` for AVSBench): every class c > 0 present in
    the frame is one object of class c - 1 (no background logit; class 0 is background).
Frames whose ``label_valid`` flag is false contribute nothing. A labelled frame without objects
still supervises classification (every query -> "no object", i.e. all-zero class targets) but has
no mask or box loss.

Losses, each computed on the final output and on every ``aux_outputs`` entry (names suffixed
``_aux{i}``), every one normalised by the number of ground-truth objects in the batch (averaged over
DDP ranks, clamped to >= 1), as in Deformable DETR:
  - ``loss_class``: sigmoid focal loss (alpha 0.25, gamma 2) over all queries and classes of the
    labelled frames; unmatched queries have an all-zero target;
  - ``loss_mask``: sigmoid focal loss of each matched mask, averaged over pixels;
  - ``loss_dice``: 1 - soft dice of each matched mask;
  - ``loss_bbox``: L1 distance of each matched normalised cxcywh box;
  - ``loss_giou``: 1 - GIoU of each matched box.
Masks are compared at the resolution picked by ``mask_resolution`` (see `avseg.models.matcher`).
Boxes: the ground-truth box is the tight box of the full-resolution mask; the predicted box is
``outputs["pred_boxes"]`` when present, else the tight box of ``sigmoid(mask) > 0.5``, which has no
gradient (the two box terms are then reported, and still steer the matching, but train nothing).
Optional (not in the paper; ``weight_similarity``, default 0): ``loss_similarity``, binary cross-entropy
(averaged over pixels) plus 1 - soft dice of ``outputs["pred_similarity"]`` [B, T, 1, h, w] (the
fusion's audio-visual similarity map read as a per-pixel logit) against the foreground of each
labelled frame (every sounding pixel, whatever its class), averaged over the labelled frames: a
direct "these pixels sound" supervision of the path from the audio codes to the pixels, in the
spirit of the auxiliary loss on the audio-visual mixed map of AVSegFormer-style decoders.
Optional (not in the paper; ``weight_source``, default 0, semantic data only): ``loss_source``, the
permutation-invariant source loss of `avseg.models.source_loss` on ``outputs["pred_sources"]``
[B, T, K, num_classes + 1] against the classes of each labelled frame's semantic mask.
Plus the quantiser terms of ``outputs["quant"]`` when present: ``loss_vq`` (``vq_loss``) and
``loss_distill`` (``distill_loss``). They depend on the audio only, so they are added whatever the
label flags say.

``forward`` returns the UNWEIGHTED named terms and ``loss``, the weighted total
(defaults: class 2, L1 5, GIoU 2, mask 2, dice 5, VQ 0.5, distillation 1, similarity 0). A batch without any
labelled frame (and without quantiser terms) gives ``loss == 0`` that is still connected to the
graph, so ``backward()`` works and every rank of a DDP job runs the same collective operations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from avseg.errors import ConfigError
from avseg.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, masks_to_boxes
from avseg.models.matcher import MASK_RESOLUTIONS, HungarianMatcher, align_masks, build_matcher, predicted_boxes
from avseg.models.options import Problem, choice, non_negative, present, raise_first
from avseg.models.source_loss import source_loss
from avseg.models.terms import FOCAL_CHECKS, TERMS, FocalLoss, TermWeights
from avseg.precision import full_precision

__all__ = ["SetCriterion", "FrameTargets"]

_SEGMENTATION_TERMS = ("loss_class", "loss_mask", "loss_dice", "loss_bbox", "loss_giou")
MATCH_LEVELS = ("clip", "frame")
# the loss weights: the five matched terms' (`TermWeights`), then the other terms'
_WEIGHTS = tuple(f"weight_{term}" for term in (*TERMS, "vq", "distill", "similarity", "source"))


class FrameTargets:
    """Ground-truth objects of the labelled frames of a batch.

    Attributes:
        frame_ids: [F] long, positions of the labelled frames in the flattened (b, t) order.
        labels: [n] long, masks: [n, h, w] float (at the loss resolution), boxes: [n, 4]
            normalised cxcywh (from the full-resolution masks): all objects, frame-major.
        counts: objects per labelled frame (F ints).
        per_frame: F dicts with ``labels``, ``masks``, ``boxes`` (views of the flat tensors), the
            matcher's input.
    """

    def __init__(self, frame_ids: Tensor, labels: Tensor, masks: Tensor, boxes: Tensor, counts: list[int]) -> None:
        self.frame_ids = frame_ids
        self.labels = labels
        self.masks = masks
        self.boxes = boxes
        self.counts = counts
        self.num_objects = int(sum(counts))
        self.per_frame = [
            {"labels": frame_labels, "masks": frame_masks, "boxes": frame_boxes}
            for frame_labels, frame_masks, frame_boxes in zip(
                labels.split(counts), masks.split(counts), boxes.split(counts)
            )
        ]


def _zero_connected(*tensors: Tensor | None) -> Tensor:
    """A zero scalar that depends on every given tensor (so backward reaches them, with zero grads)."""
    total: Tensor | None = None
    for tensor in tensors:
        if tensor is None or not tensor.is_floating_point():
            continue
        # nan_to_num keeps the anchor exactly 0 (a NaN prediction must show in its own term, not
        # leak into every term through 0 * NaN) while staying in the graph.
        term = torch.nan_to_num(tensor.float(), nan=0.0, posinf=0.0, neginf=0.0).sum() * 0.0
        total = term if total is None else total + term
    if total is None:
        raise ValueError("criterion: no floating-point prediction tensor to attach the zero loss to")
    return total


def _box_losses(src_boxes: Tensor, tgt_boxes: Tensor, num_objects: Tensor | float) -> dict[str, Tensor]:
    """``loss_bbox`` (L1) and ``loss_giou`` of matched box pairs ``[M, 4]`` cxcywh, summed over the
    pairs and divided by ``num_objects``."""
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
    return {
        "loss_bbox": F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_objects,
        "loss_giou": (1 - giou).sum() / num_objects,
    }


class SetCriterion(nn.Module):
    """Hungarian-matched segmentation losses for binary (AVS) and semantic (AVSS) training.

    ``forward(outputs, masks [B, T, H, W] long, label_valid [B, T] bool) -> dict[str, Tensor]``
    where ``outputs`` holds ``pred_logits`` [B, T, Nq, num_classes], ``pred_masks``
    [B, T, Nq, h, w], optionally ``pred_boxes`` [B, T, Nq, 4], ``aux_outputs`` (a list of dicts
    with the same keys) and ``quant`` (a dict with ``vq_loss`` and ``distill_loss`` scalars).
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.loss`` options ``options`` holds (absent ones are not checked)."""
        checks = {"mask_resolution": choice(MASK_RESOLUTIONS), "match_level": choice(MATCH_LEVELS), **FOCAL_CHECKS}
        return present(options, {**checks, **dict.fromkeys(_WEIGHTS, non_negative)}, "model.loss.")

    @classmethod
    def from_config(
        cls,
        options: Mapping[str, Any],
        *,
        num_classes: int,
        semantic: bool,
        matcher: Mapping[str, Any] | None = None,
    ) -> SetCriterion:
        """The criterion of the flat ``model.loss`` options (``weight_class`` ... ``weight_dice``
        grouped into `TermWeights`, ``focal_alpha`` / ``focal_gamma`` into `FocalLoss`, the rest
        passed on as keywords) and the ``model.matcher`` mapping (`build_matcher`)."""
        grouped = {f"weight_{term}" for term in TERMS} | set(FOCAL_CHECKS)
        # the grouped keys checked here under their config names; the constructor checks the rest
        raise_first(cls.check_options({key: value for key, value in options.items() if key in grouped}))
        rest = {key: value for key, value in options.items() if key not in grouped}
        weights, focal = TermWeights.from_options(options, "weight_"), FocalLoss.from_options(options)
        return cls(num_classes=num_classes, semantic=semantic, matcher=matcher, weights=weights, focal=focal, **rest)

    def __init__(
        self,
        *,
        num_classes: int,
        semantic: bool,
        matcher: HungarianMatcher | Mapping[str, Any] | None = None,
        weights: TermWeights = TermWeights(),
        weight_vq: float = 0.5,
        weight_distill: float = 1.0,
        weight_similarity: float = 0.0,
        weight_source: float = 0.0,
        focal: FocalLoss = FocalLoss(),
        mask_resolution: str = "pred",
        match_level: str = "frame",
    ) -> None:
        """
        Args:
            num_classes: object classes (class logits per query): 1 for binary AVS, 70 for AVSS
                (71 classes minus background).
            semantic: AVSS mode (mask values are class indices 0..num_classes) or binary mode
                (mask values 0 / 1; ``num_classes`` must be 1).
            matcher: the Hungarian matcher, or its ``model.matcher`` config (a mapping of costs), or
                ``None`` (costs equal to the loss weights): `build_matcher` builds it.
            weights: the weights of the five matched terms in the total (`TermWeights`).
            weight_*: the weights of the other terms; the returned terms are unweighted.
            focal: the sigmoid focal loss parameters (class and mask terms).
            mask_resolution: ``"pred"`` or ``"target"`` (see `avseg.models.matcher`); must equal
                the matcher's.
            match_level: ``"clip"`` (ReferFormer: one match per clip, mask / dice per instance over
                the clip's labelled frames) or ``"frame"`` (every frame matched on its own; the
                keyword default, avseg's earlier criterion; the paper setup sets ``clip``).
        """
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"criterion.num_classes={num_classes}: must be >= 1")
        if not semantic and num_classes != 1:
            raise ConfigError(
                f"criterion.num_classes={num_classes}: binary AVS has exactly one object class (use 1), "
                "or set semantic=true"
            )
        other = {"vq": weight_vq, "distill": weight_distill, "similarity": weight_similarity, "source": weight_source}
        options = {f"weight_{term}": value for term, value in other.items()}
        raise_first(self.check_options({**options, "mask_resolution": mask_resolution, "match_level": match_level}))
        if weight_source > 0 and not semantic:
            raise ConfigError(
                f"model.loss.weight_source={weight_source}: allowed: 0 on binary (S4 / MS3) data, whose masks "
                "name no source classes; the source loss needs semantic labels (synth_avss, AVSS)"
            )
        if matcher is None or isinstance(matcher, Mapping):
            matcher = build_matcher(matcher, weights=weights, focal=focal, mask_resolution=mask_resolution)
        if matcher.mask_resolution != mask_resolution:
            raise ConfigError(
                f"criterion.mask_resolution={mask_resolution!r} but the matcher uses {matcher.mask_resolution!r}: "
                "set both to the same value"
            )
        self.num_classes = int(num_classes)
        self.semantic = bool(semantic)
        self.matcher = matcher
        terms = {**weights.named(), **other}
        self.weight_dict: dict[str, float] = {f"loss_{term}": float(value) for term, value in terms.items()}
        self.focal = focal
        self.mask_resolution = mask_resolution
        self.match_level = match_level

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, semantic={self.semantic}, weights={self.weight_dict}"

    # ------------------------------------------------------------------ targets
    def build_targets(self, masks: Tensor, label_valid: Tensor, pred_size: tuple[int, int]) -> FrameTargets:
        """Per-frame target instances of the labelled frames.

        Args:
            masks: [B, T, H, W] integer masks. label_valid: [B, T] bool.
            pred_size: (h, w) of the predicted masks (the loss resolution in ``"pred"`` mode).
        """
        if masks.dim() != 4:
            raise ValueError(f"criterion: masks must be [B, T, H, W], got {tuple(masks.shape)}")
        if label_valid.shape != masks.shape[:2]:
            raise ValueError(
                f"criterion: label_valid {tuple(label_valid.shape)} does not match "
                f"masks [B, T] = {tuple(masks.shape[:2])}"
            )
        if masks.is_floating_point():
            raise ValueError(f"criterion: masks must be an integer tensor, got {masks.dtype}")
        frame_masks = rearrange(masks, "b t h w -> (b t) h w")
        frame_ids = label_valid.reshape(-1).to(torch.bool).nonzero().squeeze(1)
        labelled = frame_masks[frame_ids].long()  # [F, H, W]
        num_frames = labelled.shape[0]
        if num_frames == 0:
            return FrameTargets(
                frame_ids,
                labels=labelled.new_zeros((0,)),
                masks=torch.zeros((0, *pred_size), device=labelled.device),
                boxes=torch.zeros((0, 4), device=labelled.device),
                counts=[],
            )
        highest = self.num_classes if self.semantic else 1
        low, high = torch.aminmax(labelled)
        if int(low) < 0 or int(high) > highest:
            mode = "semantic" if self.semantic else "binary"
            raise ValueError(
                f"criterion ({mode}): mask values must be in [0, {highest}], got [{int(low)}, {int(high)}]"
            )
        # Which classes occur in which frame, with one bincount (no per-frame host syncs).
        slots = highest + 1
        offsets = torch.arange(num_frames, device=labelled.device)[:, None, None] * slots
        counts = torch.bincount((labelled + offsets).reshape(-1), minlength=num_frames * slots)
        present = counts.view(num_frames, slots)[:, 1:] > 0  # [F, highest]
        object_frame, object_class = present.nonzero(as_tuple=True)  # frame-major order
        object_masks = labelled[object_frame] == (object_class + 1)[:, None, None]  # [n, H, W] bool
        object_boxes = masks_to_boxes(object_masks)
        object_masks = object_masks.float()
        if self.mask_resolution == "pred" and object_masks.shape[0] and object_masks.shape[-2:] != pred_size:
            object_masks = F.interpolate(object_masks[:, None], size=pred_size, mode="area")[:, 0]
        elif object_masks.shape[0] == 0 and self.mask_resolution == "pred":
            object_masks = object_masks.new_zeros((0, *pred_size))
        counts = present.sum(1).tolist()
        return FrameTargets(frame_ids, labels=object_class, masks=object_masks, boxes=object_boxes, counts=counts)

    @staticmethod
    def _global_num_objects(num_objects: int, device: torch.device) -> float:
        """Objects per rank averaged over the DDP world, clamped to >= 1 (Deformable DETR)."""
        count = torch.tensor(float(num_objects), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(float(count), 1.0)

    # ------------------------------------------------------------------ losses
    def _select_frames(self, output: dict[str, Any], frame_ids: Tensor) -> dict[str, Tensor]:
        for key in ("pred_logits", "pred_masks"):
            if key not in output:
                raise KeyError(f"criterion: model output is missing {key!r}")
        pred_logits = output["pred_logits"]
        pred_masks = output["pred_masks"]
        if pred_logits.dim() != 4 or pred_masks.dim() != 5:
            raise ValueError(
                "criterion: expected pred_logits [B, T, Nq, K] and pred_masks [B, T, Nq, h, w], got "
                f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
            )
        if pred_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"criterion: pred_logits has {pred_logits.shape[-1]} classes, the criterion expects {self.num_classes}"
            )
        selected = {
            "pred_logits": rearrange(pred_logits, "b t q k -> (b t) q k")[frame_ids],
            "pred_masks": rearrange(pred_masks, "b t q h w -> (b t) q h w")[frame_ids],
        }
        if output.get("pred_boxes") is not None:
            selected["pred_boxes"] = rearrange(output["pred_boxes"], "b t q c -> (b t) q c")[frame_ids]
        return selected

    def _stream_losses(self, output: dict[str, Any], targets: FrameTargets, num_objects: float) -> dict[str, Tensor]:
        """The five segmentation terms of one decoder output (final or auxiliary)."""
        frames = self._select_frames(output, targets.frame_ids)
        anchor = _zero_connected(output["pred_logits"], output["pred_masks"], output.get("pred_boxes"))
        if frames["pred_logits"].shape[0] == 0:
            return {name: anchor for name in _SEGMENTATION_TERMS}
        if frames["pred_logits"].shape[:2] != frames["pred_masks"].shape[:2]:
            raise ValueError("criterion: pred_logits and pred_masks disagree on frames / queries")

        indices = self.matcher(frames, targets.per_frame)
        device = frames["pred_logits"].device
        # Flat (frame, query) <-> object pairs; object ids index the flat target tensors.
        first_object = [0]
        for count in targets.counts[:-1]:
            first_object.append(first_object[-1] + count)
        frame_index = torch.cat([torch.full_like(query_ids, frame) for frame, (query_ids, _) in enumerate(indices)]).to(
            device
        )
        query_index = torch.cat([query_ids for query_ids, _ in indices]).to(device)
        object_index = torch.cat([target_ids + first for (_, target_ids), first in zip(indices, first_object)]).to(
            device
        )

        # Classification over every query of every labelled frame; unmatched queries: all zeros.
        logits = frames["pred_logits"].float()
        class_target = torch.zeros_like(logits)
        class_target[frame_index, query_index, targets.labels[object_index]] = 1.0
        pos, neg = self.focal.terms(logits)
        # The anchor ties the mask (and box) predictions to the total even when nothing is matched.
        losses = {"loss_class": (class_target * pos + (1 - class_target) * neg).sum() / num_objects + anchor}

        if query_index.numel() == 0:
            for name in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
                losses[name] = anchor
            return losses

        # Matched masks and boxes, one (query, object) pair per row.
        src_masks = frames["pred_masks"][frame_index, query_index].float()  # [M, h, w]
        tgt_masks = targets.masks[object_index]
        tgt_boxes = targets.boxes[object_index]
        if "pred_boxes" in frames:
            src_boxes = frames["pred_boxes"][frame_index, query_index].float()
        else:
            src_boxes = predicted_boxes(src_masks)

        src_aligned, tgt_aligned = align_masks(src_masks, tgt_masks, self.mask_resolution)
        src_flat = src_aligned.flatten(1)
        tgt_flat = tgt_aligned.flatten(1)
        pos, neg = self.focal.terms(src_flat)
        losses["loss_mask"] = (tgt_flat * pos + (1 - tgt_flat) * neg).mean(1).sum() / num_objects
        prob = src_flat.sigmoid()
        dice = 1 - (2 * (prob * tgt_flat).sum(1) + 1) / (prob.sum(1) + tgt_flat.sum(1) + 1)
        losses["loss_dice"] = dice.sum() / num_objects
        losses.update(_box_losses(src_boxes, tgt_boxes, num_objects))
        return losses

    @staticmethod
    def clip_instances(targets: FrameTargets, length: int) -> list[dict[str, Tensor]]:
        """Group the labelled frames' objects into clip-level instances (one per class per clip).

        Returns one dict per clip that has labelled frames: ``frames`` [F_b] long (positions among
        the labelled frames), ``labels`` [n] long, ``objects`` [n, F_b] long (index into the flat
        targets, -1 where the instance is absent from that frame).
        """
        frame_clip = (targets.frame_ids // length).tolist()
        first_object = [0]
        for count in targets.counts[:-1]:
            first_object.append(first_object[-1] + count)
        labels_host = targets.labels.tolist()
        clips: dict[int, list[int]] = {}
        for position, clip in enumerate(frame_clip):
            clips.setdefault(clip, []).append(position)
        result = []
        for positions in clips.values():
            per_frame = {}
            for column, position in enumerate(positions):
                for offset in range(targets.counts[position]):
                    index = first_object[position] + offset
                    per_frame[(labels_host[index], column)] = index
            labels = sorted({label for label, _ in per_frame})
            objects = torch.full((len(labels), len(positions)), -1, dtype=torch.long)
            for (label, column), index in per_frame.items():
                objects[labels.index(label), column] = index
            result.append(
                {
                    "frames": torch.as_tensor(positions, dtype=torch.long),
                    "labels": torch.as_tensor(labels, dtype=torch.long),
                    "objects": objects,
                }
            )
        return result

    def _stream_losses_clip(
        self, output: dict[str, Any], targets: FrameTargets, clips: list[dict[str, Tensor]], num_objects: float
    ) -> dict[str, Tensor]:
        """The five terms with one match per clip (ReferFormer): a matched query is the instance's
        prediction in every labelled frame of the clip. Class: the matched query's target is the
        instance's class in the frames where it is present (no object elsewhere); boxes: over those
        frames; mask focal / dice: per instance over all the clip's labelled frames taken together
        (empty target where absent), summed over instances. All divided by ``num_objects`` (the
        (frame, object) pairs, ReferFormer's ``num_boxes``)."""
        frames = self._select_frames(output, targets.frame_ids)
        anchor = _zero_connected(output["pred_logits"], output["pred_masks"], output.get("pred_boxes"))
        if frames["pred_logits"].shape[0] == 0:
            return {name: anchor for name in _SEGMENTATION_TERMS}
        device = frames["pred_logits"].device
        if "pred_boxes" not in frames:
            frames["pred_boxes"] = predicted_boxes(frames["pred_masks"])
        empty = targets.masks.new_zeros((1, *targets.masks.shape[1:]))
        empty_box = targets.boxes.new_zeros((1, 4))
        flat_masks = torch.cat((targets.masks, empty))  # index -1 -> the empty mask
        flat_boxes = torch.cat((targets.boxes, empty_box))
        clip_outputs, clip_targets = [], []
        for clip in clips:
            positions = clip["frames"].to(device)
            objects = clip["objects"].to(device)
            clip_outputs.append({key: frames[key][positions] for key in ("pred_logits", "pred_masks", "pred_boxes")})
            clip_targets.append(
                {
                    "labels": clip["labels"].to(device),
                    "masks": flat_masks[objects],
                    "boxes": flat_boxes[objects],
                    "present": objects >= 0,
                }
            )
        indices = self.matcher.match_clips(clip_outputs, clip_targets)

        # rows: (matched instance, labelled frame of its clip)
        row_frame, row_query, row_object, row_instance = [], [], [], []
        instance = 0
        for clip, (query_ids, instance_ids) in zip(clips, indices):
            for query, inst in zip(query_ids.tolist(), instance_ids.tolist()):
                row_frame.append(clip["frames"])
                row_query.append(torch.full_like(clip["frames"], query))
                row_object.append(clip["objects"][inst])
                row_instance.append(torch.full_like(clip["frames"], instance))
                instance += 1
        logits = frames["pred_logits"].float()
        pos, neg = self.focal.terms(logits)
        if instance == 0:
            return {
                "loss_class": (neg.sum() / num_objects) + anchor,
                **{name: anchor for name in _SEGMENTATION_TERMS[1:]},
            }
        frame_index = torch.cat(row_frame).to(device)
        query_index = torch.cat(row_query).to(device)
        object_index = torch.cat(row_object).to(device)
        instance_index = torch.cat(row_instance).to(device)
        present = object_index >= 0

        class_target = torch.zeros_like(logits)
        class_target[frame_index[present], query_index[present], targets.labels[object_index[present]]] = 1.0
        losses = {"loss_class": (class_target * pos + (1 - class_target) * neg).sum() / num_objects + anchor}

        src_masks = frames["pred_masks"][frame_index, query_index].float()  # [R, h, w]
        src_aligned, tgt_aligned = align_masks(src_masks, flat_masks[object_index], self.mask_resolution)
        src_flat, tgt_flat = src_aligned.flatten(1), tgt_aligned.flatten(1)
        pos_m, neg_m = self.focal.terms(src_flat)
        focal_rows = (tgt_flat * pos_m + (1 - tgt_flat) * neg_m).sum(1)
        prob = src_flat.sigmoid()

        def per_instance(values: Tensor) -> Tensor:
            return values.new_zeros((instance,)).index_add_(0, instance_index, values)

        pixels = per_instance(torch.full_like(focal_rows, float(src_flat.shape[1])))
        losses["loss_mask"] = (per_instance(focal_rows) / pixels).sum() / num_objects
        inter = per_instance((prob * tgt_flat).sum(1))
        dice = 1 - (2 * inter + 1) / (per_instance(prob.sum(1)) + per_instance(tgt_flat.sum(1)) + 1)
        losses["loss_dice"] = dice.sum() / num_objects

        if not bool(present.any()):
            losses["loss_bbox"] = anchor
            losses["loss_giou"] = anchor
            return losses
        src_boxes = frames["pred_boxes"][frame_index[present], query_index[present]].float()
        tgt_boxes = targets.boxes[object_index[present]]
        losses.update(_box_losses(src_boxes, tgt_boxes, num_objects))
        return losses

    @staticmethod
    def _similarity_loss(similarity: Tensor, masks: Tensor, label_valid: Tensor) -> Tensor:
        """BCE + (1 - dice) of the similarity map [B, T, 1, h, w] against the labelled frames'
        foreground, averaged over those frames (0, still connected, without any)."""
        if similarity.dim() != 5 or similarity.shape[2] != 1 or similarity.shape[:2] != masks.shape[:2]:
            raise ValueError(
                f"criterion: pred_similarity must be [B, T, 1, h, w] with [B, T] = {tuple(masks.shape[:2])}, "
                f"got {tuple(similarity.shape)}"
            )
        frame_ids = label_valid.reshape(-1).to(torch.bool).nonzero().squeeze(1)
        logits = rearrange(similarity, "b t 1 h w -> (b t) h w")[frame_ids].float()
        if logits.shape[0] == 0:
            return similarity.sum() * 0.0
        foreground = (rearrange(masks, "b t h w -> (b t) h w")[frame_ids] > 0).float()
        if foreground.shape[-2:] != logits.shape[-2:]:
            foreground = F.interpolate(foreground[:, None], size=logits.shape[-2:], mode="area")[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits, foreground, reduction="none").flatten(1).mean(1)
        prob = logits.sigmoid().flatten(1)
        target = foreground.flatten(1)
        dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        return (bce + dice).mean()

    @full_precision  # the losses in float32 under autocast (inputs are cast with .float())
    def forward(self, outputs: dict[str, Any], masks: Tensor, label_valid: Tensor) -> dict[str, Tensor]:
        if "pred_masks" not in outputs or "pred_logits" not in outputs:
            raise KeyError("criterion: outputs must hold 'pred_logits' and 'pred_masks'")
        pred_masks = outputs["pred_masks"]
        if pred_masks.dim() != 5:
            raise ValueError(f"criterion: pred_masks must be [B, T, Nq, h, w], got {tuple(pred_masks.shape)}")
        if pred_masks.shape[:2] != masks.shape[:2]:
            raise ValueError(
                f"criterion: predictions cover [B, T] = {tuple(pred_masks.shape[:2])}, masks {tuple(masks.shape[:2])}"
            )
        device = pred_masks.device
        targets = self.build_targets(masks.to(device), label_valid.to(device), tuple(pred_masks.shape[-2:]))
        num_objects = self._global_num_objects(targets.num_objects, pred_masks.device)

        if self.match_level == "clip":
            clips = self.clip_instances(targets, pred_masks.shape[1])

            def stream(output: dict[str, Any]) -> dict[str, Tensor]:
                return self._stream_losses_clip(output, targets, clips, num_objects)
        else:

            def stream(output: dict[str, Any]) -> dict[str, Tensor]:
                return self._stream_losses(output, targets, num_objects)

        terms: dict[str, Tensor] = dict(stream(outputs))
        for layer, aux in enumerate(outputs.get("aux_outputs") or []):
            for name, value in stream(aux).items():
                terms[f"{name}_aux{layer}"] = value

        quant = outputs.get("quant")
        if quant is not None:
            for source, name in (("vq_loss", "loss_vq"), ("distill_loss", "loss_distill")):
                if source not in quant:
                    raise KeyError(f"criterion: outputs['quant'] is missing {source!r}")
                terms[name] = quant[source].float()

        if outputs.get("pred_similarity") is not None:
            terms["loss_similarity"] = self._similarity_loss(
                outputs["pred_similarity"], masks.to(device), label_valid.to(device)
            )
        elif self.weight_dict["loss_similarity"] > 0:
            raise KeyError(
                "criterion: weight_similarity > 0 needs outputs['pred_similarity'] "
                "(model.fusion.audio_similarity_dim > 0)"
            )

        if self.weight_dict["loss_source"] > 0:
            if outputs.get("pred_sources") is None:
                raise KeyError("criterion: weight_source > 0 needs outputs['pred_sources'] (the model's source head)")
            frame_classes = [frame["labels"] for frame in targets.per_frame]
            terms["loss_source"] = source_loss(outputs["pred_sources"], targets.frame_ids, frame_classes)

        total: Tensor | None = None
        for name, value in terms.items():
            base = name.split("_aux", 1)[0]
            weighted = self.weight_dict[base] * value
            total = weighted if total is None else total + weighted
        assert total is not None  # the final output always yields the five segmentation terms
        terms["loss"] = total
        return terms
