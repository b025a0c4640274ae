"""The official AVSBench metrics (docs/AVSBENCH.md section 5) as torchmetrics ``Metric``s.

Both metrics keep per-frame sufficient statistics rather than logits, so evaluation memory grows
by a few kilobytes per frame, and ``compute()`` reproduces the official numbers from them:

- `BinaryAVSMetric` (S4 / MS3): per frame the IoU of ``sigmoid(logit) > 0.5`` (with the official
  empty-ground-truth quirk), the ground-truth pixel count and, for each of the 255 F-score
  thresholds, the true-positive and predicted-positive counts.
- `SemanticAVSMetric` (AVSS): per frame and class the intersection, predicted and ground-truth
  pixel counts.

``update(logits, target, frame_index=None)``: ``frame_index`` [N] is each frame's global position
in the evaluation set (clip index * T + t). ``compute()`` drops duplicate indices (DDP's
`DistributedSampler` pads the last round by repeating samples; the first copy in gather order is
kept), orders frames by index and, for the binary metric, cuts them into the official test
batches of ``frames_per_batch`` consecutive frames (4 clips x 5 frames = 20 by default; the last
batch may be partial, as in the official loop). Without indices the frames keep their arrival
order and nothing is deduplicated (mixing indexed and unindexed updates raises). Every state is a
list of 1-D float64 tensors reduced by concatenation, so DDP gathers them whatever each rank holds
(float64 represents every pixel count and index exactly), and after deduplication and sorting the
arithmetic is the same as in a single process.

The official code thresholds and compares in float32 (``torch.linspace(0, 1 - 1e-10, 255)`` is
float32, so its last threshold is exactly 1.0); this module does the same, then computes the
scores from integer counts in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["BinaryAVSMetric", "SemanticAVSMetric", "FSCORE_THRESHOLDS", "NUM_FSCORE_THRESHOLDS"]

NUM_FSCORE_THRESHOLDS = 255
# float32 on purpose: the official thresholds (and the `>=` comparisons) are float32.
FSCORE_THRESHOLDS = torch.linspace(0, 1 - 1e-10, NUM_FSCORE_THRESHOLDS)
_BETA2 = 0.3
_IOU_EPS = 1e-7
_PR_EPS = 1e-20
_SEMANTIC_EPS = 2.220446049250313e-16
# Frames per chunk when turning semantic scores into an argmax (bounds the softmax's memory).
_SEMANTIC_CHUNK = 8


def _as_frame_index(frame_index: Tensor | None, num_frames: int, device: torch.device) -> Tensor:
    """Validated float64 [N] frame indices; NaN marks frames that came without an index."""
    if frame_index is None:
        return torch.full((num_frames,), float("nan"), dtype=torch.float64, device=device)
    frame_index = torch.as_tensor(frame_index, device=device)
    if frame_index.shape != (num_frames,):
        raise ValueError(f"frame_index must be [N] = [{num_frames}], got {tuple(frame_index.shape)}")
    if frame_index.is_floating_point() or frame_index.dtype == torch.bool:
        raise ValueError(f"frame_index must be an integer tensor, got {frame_index.dtype}")
    if num_frames and int(frame_index.min()) < 0:
        raise ValueError("frame_index must be >= 0")
    if num_frames and int(frame_index.max()) >= 2**53:
        raise ValueError("frame_index values must be < 2**53")
    return frame_index.to(torch.float64)


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    """True when a list state (local, or concatenated by a DDP sync) holds no frame."""
    if isinstance(state, Tensor):
        return state.numel() == 0
    return sum(part.numel() for part in state) == 0


def _order_frames(frame_index: Tensor) -> Tensor:
    """Positions of the frames to score, in scoring order.

    All indices NaN (no index ever given): arrival (gather) order. All indices present: sorted by
    index, duplicates dropped (the first copy is kept). A mix raises.
    """
    missing = torch.isnan(frame_index)
    if bool(missing.all()):
        return torch.arange(frame_index.shape[0], device=frame_index.device)
    if bool(missing.any()):
        raise ValueError("some updates gave frame_index and some did not: give it always (required under DDP) or never")
    sorted_index, order = torch.sort(frame_index, stable=True)
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return order[keep]


def _f_measure(true_pos: Tensor, predicted: Tensor, actual: Tensor) -> Tensor:
    """F-beta (beta^2 = 0.3) from counts, NaN -> 0: the official `_eval_pr` + `Eval_Fmeasure`."""
    precision = true_pos / (predicted + _PR_EPS)
    recall = true_pos / (actual + _PR_EPS)
    score = (1 + _BETA2) * precision * recall / (_BETA2 * precision + recall)
    return _nan_to_zero(score)


def _nan_to_zero(values: Tensor) -> Tensor:
    """NaN -> 0 and nothing else (unlike ``torch.nan_to_num``, infinities are left alone)."""
    return torch.where(torch.isnan(values), torch.zeros_like(values), values)


class _FrameMetric(Metric):
    """What the AVSBench metrics share: frames scored in ``frame_index`` order (see the module
    docstring), list states concatenated across ranks, and the class flags."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, states: Sequence[str], **kwargs: Any) -> None:
        """``states``: the list states besides ``frame_index``; ``kwargs``: torchmetrics ``Metric`` options."""
        super().__init__(**kwargs)
        for name in ("frame_index", *states):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _batch_frame_index(self, logits: Tensor, frame_index: Tensor | None) -> Tensor | None:
        """The indices [N] of the batch's frames (`_as_frame_index`), None for an empty batch;
        rejects NaN ``logits`` [N, ...]."""
        index = _as_frame_index(frame_index, logits.shape[0], logits.device)
        if logits.shape[0] == 0:
            return None
        if bool(torch.isnan(logits).any()):
            raise ValueError(f"{type(self).__name__}: logits contain NaN")
        return index

    def _scoring_order(self) -> Tensor:
        """`_order_frames` of the gathered ``frame_index``; raises when no frame was given."""
        if _is_empty(self.frame_index):
            raise ValueError(f"{type(self).__name__}.compute(): no frames were given to update()")
        return _order_frames(dim_zero_cat(self.frame_index))


class BinaryAVSMetric(_FrameMetric):
    """S4 / MS3 metrics: M_J (``miou``), the per-batch M_F (``fscore``) and ``fscore_global``.

    ``update(logits [N, H, W], target [N, H, W] (0 / 1), frame_index [N] long | None)``.
    ``compute() -> {"miou", "fscore", "fscore_global"}`` (float32 scalar tensors):
      - ``miou``: per frame ``|p & g| / (|p | g| + 1e-7)`` with ``p = sigmoid(logit) > 0.5``; for an
        empty ground truth ``#(p == 0) / (H*W + 1e-7)`` (the official quirk); averaged per test
        batch, then over batches (so a partial last batch weighs as much as a full one);
      - ``fscore``: per test batch, the F curve (255 thresholds, ``sigmoid >= t``) averaged over the
        batch's frames with a non-empty ground truth, its max over thresholds (0 for a batch without
        such frames); mean over batches;
      - ``fscore_global``: max over thresholds of the F curve averaged over all frames with a
        non-empty ground truth (independent of the batch size; 0 when there are none).
    """

    def __init__(self, *, frames_per_batch: int = 20, **kwargs: Any) -> None:
        """
        Args:
            frames_per_batch: frames per official test batch (4 clips x 5 frames for S4 / MS3).
            **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
        """
        if isinstance(frames_per_batch, bool) or not isinstance(frames_per_batch, int) or frames_per_batch < 1:
            raise ValueError(f"frames_per_batch must be a positive int, got {frames_per_batch!r}")
        # true_pos / pred_pos: [N * 255] flattened (1-D keeps DDP gathering uniform, see the module docstring)
        super().__init__(states=("frame_iou", "gt_pixels", "true_pos", "pred_pos"), **kwargs)
        self.frames_per_batch = frames_per_batch

    def update(self, logits: Tensor, target: Tensor, frame_index: Tensor | None = None) -> None:
        if logits.dim() != 3:
            raise ValueError(f"BinaryAVSMetric: logits must be [N, H, W], got {tuple(logits.shape)}")
        if target.shape != logits.shape:
            raise ValueError(f"BinaryAVSMetric: target {tuple(target.shape)} must match logits {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"BinaryAVSMetric: logits must be floating point, got {logits.dtype}")
        index = self._batch_frame_index(logits, frame_index)
        if index is None:
            return
        num_frames = logits.shape[0]
        target = target.to(logits.device)
        if not bool(((target == 0) | (target == 1)).all()):
            raise ValueError("BinaryAVSMetric: target values must be 0 or 1")
        gt = target.bool()
        prob = torch.sigmoid(logits.detach().float())  # float32, as the official code

        pred = prob > 0.5  # strict, as the official code
        inter = (pred & gt).flatten(1).sum(1)
        union = (pred | gt).flatten(1).sum(1)
        both_zero = (~pred & ~gt).flatten(1).sum(1)
        gt_pixels = gt.flatten(1).sum(1)
        empty = gt_pixels == 0
        num_pixels = logits.shape[-1] * logits.shape[-2]
        iou = torch.where(
            empty,
            both_zero.double() / (num_pixels + _IOU_EPS),
            inter.double() / (union.double() + _IOU_EPS),
        )

        # Counts of `prob >= threshold_k` per threshold in one pass: bucket every pixel by the number
        # of thresholds <= its probability, then suffix-sum the histogram.
        thresholds = FSCORE_THRESHOLDS.to(prob.device)
        bucket = torch.searchsorted(thresholds, prob.flatten(1).contiguous(), right=True)  # [N, P] in 0..255
        slots = NUM_FSCORE_THRESHOLDS + 1
        offsets = torch.arange(num_frames, device=prob.device)[:, None] * slots
        flat_bucket = (bucket + offsets).flatten()
        hist_pred = torch.bincount(flat_bucket, minlength=num_frames * slots).view(num_frames, slots)
        hist_tp = torch.bincount(
            flat_bucket, weights=gt.flatten().to(torch.float64), minlength=num_frames * slots
        ).view(num_frames, slots)
        # count(prob >= thresholds[k]) = number of pixels whose bucket is > k.
        pred_pos = hist_pred.flip(1).cumsum(1).flip(1)[:, 1:]
        true_pos = hist_tp.flip(1).cumsum(1).flip(1)[:, 1:]

        self.frame_index.append(index)
        self.frame_iou.append(iou)
        self.gt_pixels.append(gt_pixels.to(torch.float64))
        self.true_pos.append(true_pos.to(torch.float64).flatten())
        self.pred_pos.append(pred_pos.to(torch.float64).flatten())

    def compute(self) -> dict[str, Tensor]:
        order = self._scoring_order()
        iou = dim_zero_cat(self.frame_iou)[order]
        gt_pixels = dim_zero_cat(self.gt_pixels)[order]
        true_pos = dim_zero_cat(self.true_pos).view(-1, NUM_FSCORE_THRESHOLDS)[order]
        pred_pos = dim_zero_cat(self.pred_pos).view(-1, NUM_FSCORE_THRESHOLDS)[order]

        curves = _f_measure(true_pos, pred_pos, gt_pixels[:, None])  # [N, 255]
        nonempty = gt_pixels > 0

        batch_miou = []
        batch_fscore = []
        for start in range(0, iou.shape[0], self.frames_per_batch):
            stop = start + self.frames_per_batch
            batch_miou.append(iou[start:stop].mean())
            batch_nonempty = nonempty[start:stop]
            if bool(batch_nonempty.any()):
                batch_fscore.append(curves[start:stop][batch_nonempty].mean(0).max())
            else:
                batch_fscore.append(iou.new_zeros(()))
        if bool(nonempty.any()):
            fscore_global = curves[nonempty].mean(0).max()
        else:
            fscore_global = iou.new_zeros(())
        return {
            "miou": torch.stack(batch_miou).mean().float(),
            "fscore": torch.stack(batch_fscore).mean().float(),
            "fscore_global": fscore_global.float(),
        }


class SemanticAVSMetric(_FrameMetric):
    """AVSS metrics: the official per-class mIoU (``miou``) and F-score (``fscore``).

    ``update(logits [N, C, H, W] class scores, target [N, H, W] class indices, frame_index [N] |
    None)``; prediction = argmax over classes of the softmax (as the official code). Per frame and
    class: I, P, G, U = P + G - I; ``S_iou[c] += I / (U + 2.22e-16)``, ``S_f[c] += F`` (precision
    I/P, recall I/G, beta^2 0.3, 0/0 and NaN -> 0), ``cnt[c] += 1`` when U > 0.
    ``compute() -> {"miou", "fscore"}``: the mean over ALL classes (background included) of
    ``S / cnt`` with NaN -> 0, so a class that never occurs counts as 0.
    """

    def __init__(self, *, num_classes: int = 71, **kwargs: Any) -> None:
        """
        Args:
            num_classes: classes including background (71 for AVSBench-semantic).
            **kwargs: torchmetrics ``Metric`` options.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        # class_counts: [N * C * 3] flattened, per frame and class (I, P, G)
        super().__init__(states=("class_counts",), **kwargs)
        self.num_classes = num_classes

    def update(self, logits: Tensor, target: Tensor, frame_index: Tensor | None = None) -> None:
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"SemanticAVSMetric: logits must be [N, {self.num_classes}, H, W], got {tuple(logits.shape)}"
            )
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"SemanticAVSMetric: target {tuple(target.shape)} must be [N, H, W] = "
                f"{(logits.shape[0], *logits.shape[2:])}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"SemanticAVSMetric: logits must be floating point, got {logits.dtype}")
        if target.is_floating_point():
            raise ValueError(f"SemanticAVSMetric: target must hold integer class indices, got {target.dtype}")
        index = self._batch_frame_index(logits, frame_index)
        if index is None:
            return
        num_frames = logits.shape[0]
        target = target.to(logits.device).long()
        low, high = torch.aminmax(target)
        if int(low) < 0 or int(high) >= self.num_classes:
            raise ValueError(
                f"SemanticAVSMetric: target values must be in [0, {self.num_classes}), got [{int(low)}, {int(high)}]"
            )
        # The official code takes argmax(softmax(scores)); float32 softmax can round two close
        # scores to a tie that argmax breaks towards the lower class, so do the same, in chunks.
        pred = torch.cat(
            [torch.softmax(chunk.detach().float(), dim=1).argmax(dim=1) for chunk in logits.split(_SEMANTIC_CHUNK)]
        )
        classes = self.num_classes
        offsets = torch.arange(num_frames, device=logits.device)[:, None] * classes
        pred_flat = (pred.flatten(1) + offsets).flatten()
        target_flat = (target.flatten(1) + offsets).flatten()
        size = num_frames * classes
        predicted = torch.bincount(pred_flat, minlength=size)
        actual = torch.bincount(target_flat, minlength=size)
        hit = pred.flatten() == target.flatten()
        intersection = torch.bincount(target_flat[hit], minlength=size)
        counts = torch.stack([intersection, predicted, actual], dim=1)  # [N * C, 3]
        self.frame_index.append(index)
        self.class_counts.append(counts.to(torch.float64).flatten())

    def compute(self) -> dict[str, Tensor]:
        order = self._scoring_order()
        counts = dim_zero_cat(self.class_counts).view(-1, self.num_classes, 3)[order]
        intersection, predicted, actual = counts.unbind(-1)  # [N, C] each
        union = predicted + actual - intersection
        sum_iou = (intersection / (union + _SEMANTIC_EPS)).sum(0)
        precision = intersection / predicted
        recall = intersection / actual
        f_measure = (1 + _BETA2) * precision * recall / (_BETA2 * precision + recall)
        sum_f = _nan_to_zero(f_measure).sum(0)
        seen = (union > 0).sum(0).to(torch.float64)
        miou = _nan_to_zero(sum_iou / seen).mean()
        fscore = _nan_to_zero(sum_f / seen).mean()
        return {"miou": miou.float(), "fscore": fscore.float()}
