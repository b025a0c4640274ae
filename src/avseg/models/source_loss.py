"""Permutation-invariant source loss of the K sub-space codes (issue 13 item 3; not in the paper;
docs/MODEL.md "Decomposition readings": ``model.loss.weight_source``).

Each frame's K sub-space codes go through a linear head (`avseg.models.layers.source_head`) that
predicts, per sub-space, one object class or "none" (index ``num_classes``). The classes sounding in
the frame are matched one-to-one to sub-spaces by the Hungarian algorithm on the cost
-log p_k(class) + log p_k(none) (what the frame's total loss changes by when sub-space k takes that
class instead of "none", so the matching minimises the loss itself); each matched sub-space is
trained toward its class, every other sub-space toward "none". Which sub-space takes which source
is left to the model (the loss is invariant to the order of the sub-spaces), so it asks for a
decomposition, not for a fixed slot per class. With more sounding classes than sub-spaces only K of
them are matched.

The sounding classes of a frame are the object classes in its semantic mask (AVSS: the mask labels
the sounding objects), so the loss needs semantic (per-source class) labels: binary S4 / MS3 masks
cannot say which sources sound, and the criterion refuses it there (AVSBench-MS3 has no such labels,
so a model trained with it would use supervision its real counterpart lacks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["match_sources", "source_loss"]


def match_sources(log_probs: Tensor, classes: Tensor) -> Tensor:
    """The target of each sub-space of one frame.

    log_probs [K, C + 1] (log-softmax over C classes and "none" = index C), classes [S] long (the
    frame's sounding classes, distinct) -> targets [K] long: the matched class, or C ("none").
    """
    num_subspaces, width = log_probs.shape
    none = width - 1
    targets = torch.full((num_subspaces,), none, dtype=torch.long)
    if classes.numel() == 0:
        return targets
    detached = log_probs.detach().float()
    cost = (detached[:, none, None] - detached[:, classes.to(log_probs.device)]).cpu().numpy()  # [K, S]
    rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e9, posinf=1e9))
    targets[torch.as_tensor(rows, dtype=torch.long)] = classes.cpu()[torch.as_tensor(cols, dtype=torch.long)]
    return targets


def source_loss(pred_sources: Tensor, frame_ids: Tensor, frame_classes: list[Tensor]) -> Tensor:
    """Mean cross-entropy over the K sub-spaces of the labelled frames after Hungarian matching.

    pred_sources [B, T, K, C + 1] logits; frame_ids [F] long (labelled frames in flattened (b, t)
    order); frame_classes: F tensors of the sounding classes (0..C-1) of those frames. 0 (still
    connected to ``pred_sources``) without a labelled frame.
    """
    if pred_sources.dim() != 4:
        raise ValueError(f"source_loss: pred_sources must be [B, T, K, C + 1], got {tuple(pred_sources.shape)}")
    if frame_ids.numel() != len(frame_classes):
        raise ValueError(f"source_loss: {frame_ids.numel()} labelled frames but {len(frame_classes)} class sets")
    logits = rearrange(pred_sources, "b t k c -> (b t) k c")[frame_ids.to(pred_sources.device)].float()  # [F, K, C+1]
    if logits.shape[0] == 0:
        return pred_sources.sum() * 0.0
    highest = logits.shape[-1] - 1
    for classes in frame_classes:
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= highest):
            raise ValueError(f"source_loss: class indices must be in [0, {highest - 1}], got {classes.tolist()}")
    log_probs = logits.log_softmax(dim=-1)
    targets = torch.stack([match_sources(frame, classes) for frame, classes in zip(log_probs, frame_classes)])
    return F.nll_loss(rearrange(log_probs, "f k c -> (f k) c"), targets.reshape(-1).to(logits.device))
