"""The tiny model overfits one synthetic clip on CPU (binary and semantic), with the project's
SetCriterion: the loss falls by most of its value within a bounded number of steps."""

from __future__ import annotations

import pytest
import torch
from test_model_build import tiny

from avseg.models.criterion import SetCriterion
from avseg.models.postprocess import binary_logits, semantic_scores

STEPS = 80


def _clip(semantic: bool):
    """One 2-frame 64 px clip: two coloured squares that move; audio embeddings per frame."""
    g = torch.Generator().manual_seed(0)
    frames = 0.1 * torch.randn(1, 2, 3, 64, 64, generator=g)
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    boxes = [((8, 30), (10, 34)), ((14, 36), (20, 44))]
    for t, ((y0, y1), (x0, x1)) in enumerate(boxes):
        frames[0, t, 0, y0:y1, x0:x1] += 2.0
        masks[0, t, y0:y1, x0:x1] = 6 if semantic else 1
    if semantic:
        frames[0, :, 2, 40:60, 40:60] += 2.0
        masks[0, :, 40:60, 40:60] = 3
    audio = torch.randn(1, 2, 128, generator=g)
    return frames, audio, masks


def _paper_heads(num_classes: int):
    """The tiny widths with the paper setup's ancestor choices: per-layer box heads, ReferFormer's
    controller layout and pixel coordinates, wide mask features (the factorised first layer),
    R2VOS's clip-level dual block, taming's VQ loss form."""
    from test_model_build import model_config

    cfg = model_config("qdformer_tiny", [f"num_classes={num_classes}", "audio_encoder=embeddings"])
    cfg["decoder"].update(box_head="per_layer", controller_layout="referformer", rel_coords_unit="pixels")
    cfg["fusion"].update(dual_form="r2vos", mask_dim=64)
    cfg["decomposition"].update(vq_loss_form="taming_legacy")
    from avseg.models.build import build_qdformer

    return build_qdformer(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["demo", "paper"])
@pytest.mark.parametrize("semantic", [False, True])
def test_tiny_model_overfits_one_clip(semantic, heads):
    torch.manual_seed(0)
    num_classes = 70 if semantic else 1
    if heads == "demo":
        net = tiny(num_classes=num_classes)
        criterion = SetCriterion(num_classes=num_classes, semantic=semantic)
    else:
        net = _paper_heads(num_classes)
        criterion = SetCriterion(num_classes=num_classes, semantic=semantic, match_level="clip")
    frames, audio, masks = _clip(semantic)
    label_valid = torch.ones(1, 2, dtype=torch.bool)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        loss = criterion(net(frames, audio), masks, label_valid)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    first = sum(losses[:3]) / 3
    last = sum(losses[-3:]) / 3
    assert last < 0.3 * first, f"loss {first:.3f} -> {last:.3f}"
    # and the prediction the metric sees matches the target
    net.eval()
    with torch.no_grad():
        out = net(frames, audio)
    if semantic:
        pred = semantic_scores(out, 64).argmax(1)
    else:
        pred = (binary_logits(out, 64) > 0).long()
    accuracy = (pred == masks.flatten(0, 1)).float().mean().item()
    assert accuracy > 0.9, accuracy
