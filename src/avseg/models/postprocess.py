"""Query outputs -> the metric inputs of docs/METHOD.md section 1.8, at ground-truth resolution."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def binary_logits(outputs: Mapping[str, torch.Tensor], size: int | tuple[int, int]) -> torch.Tensor:
    """AVS: per frame, the mask logits of the query with the highest class score.

    ``outputs["pred_logits"] [B, T, Nq, 1]``, ``outputs["pred_masks"] [B, T, Nq, h, w]`` ->
    ``[B*T, H, W]`` logits (bilinear upsampling of the logits to ``size``; frame order b-major).
    """
    scores = outputs["pred_logits"].amax(dim=-1)  # [B, T, Nq]; one class in AVS
    best = scores.argmax(dim=-1)  # [B, T]
    masks = outputs["pred_masks"]
    index = best[..., None, None, None].expand(-1, -1, 1, *masks.shape[-2:])
    chosen = masks.gather(2, index).squeeze(2)  # [B, T, h, w]
    chosen = rearrange(chosen, "b t h w -> (b t) 1 h w")
    return F.interpolate(chosen, size=_size(size), mode="bilinear", align_corners=False)[:, 0]


def semantic_scores(
    outputs: Mapping[str, torch.Tensor], size: int | tuple[int, int], *, score_floor: float = 0.5
) -> torch.Tensor:
    """AVSS: per-pixel scores ``[B*T, 1 + num_classes, H, W]`` (71 channels for AVSBench-semantic).

    With ``s_qc = sigmoid(class logit)`` and ``m_qp = sigmoid(mask logit)``, object channel ``c + 1``
    is ``max_q m_qp * s_qc / max(max_c' s_qc', score_floor)``: a query whose best class score
    reaches ``score_floor`` claims its mask fully (split over classes in proportion to its scores),
    a weaker query claims it in proportion to its score. Channel 0 (background) is ``1 - max`` over
    the object channels: how much no object query claims the pixel. ``score_floor = 1`` gives the
    plain product ``s * m``; the default 0.5 keeps sigmoid-focal scores, which stay well below 1
    for correct queries, from handing every pixel to the background (docs/MODEL.md).
    Computed at mask resolution, then upsampled bilinearly to ``size``.
    """
    if not 0 < score_floor <= 1:
        raise ValueError(f"semantic_scores: score_floor must be in (0, 1], got {score_floor}")
    class_prob = outputs["pred_logits"].sigmoid()  # [B, T, Nq, K]
    mask_prob = outputs["pred_masks"].sigmoid()  # [B, T, Nq, h, w]
    claim = class_prob / class_prob.amax(dim=-1, keepdim=True).clamp(min=score_floor)
    objects = (claim[..., None, None] * mask_prob[:, :, :, None]).amax(dim=2)  # [B, T, K, h, w]
    background = 1.0 - objects.amax(dim=2, keepdim=True)
    scores = torch.cat((background, objects), dim=2)
    scores = rearrange(scores, "b t c h w -> (b t) c h w")
    return F.interpolate(scores, size=_size(size), mode="bilinear", align_corners=False)
