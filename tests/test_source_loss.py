"""Permutation-invariant source loss (issue 13 item 3; `avseg.models.source_loss`) and its head."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from avseg.errors import ConfigError
from avseg.models.criterion import SetCriterion
from avseg.models.layers.source_head import SourceHead
from avseg.models.source_loss import match_sources, source_loss


def test_matching_by_hand():
    # 3 sub-spaces, 4 classes + none. Sub-space 0 prefers class 2, sub-space 2 class 0.
    probs = torch.tensor(
        [
            [0.05, 0.05, 0.80, 0.05, 0.05],
            [0.10, 0.10, 0.10, 0.10, 0.60],
            [0.70, 0.10, 0.10, 0.05, 0.05],
        ]
    )
    targets = match_sources(probs.log(), torch.tensor([0, 2]))
    assert targets.tolist() == [2, 4, 0]  # the order of the classes does not matter
    assert match_sources(probs.log(), torch.tensor([2, 0])).tolist() == [2, 4, 0]
    assert match_sources(probs.log(), torch.tensor([], dtype=torch.long)).tolist() == [4, 4, 4]
    # more classes than sub-spaces: K of them are matched, no sub-space is left as none
    assert sorted(match_sources(probs.log(), torch.tensor([0, 1, 2, 3])).tolist()) in ([0, 1, 2], [0, 2, 3])


def test_loss_is_invariant_to_the_order_of_the_subspaces_and_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6)  # B=2, T=3, K=4, 5 classes + none
    frame_ids = torch.tensor([0, 2, 4])  # labelled frames (b, t) = (0,0), (0,2), (1,1)
    classes = [torch.tensor([1, 3]), torch.tensor([], dtype=torch.long), torch.tensor([4])]
    loss = source_loss(logits, frame_ids, classes)
    flat = logits.reshape(6, 4, 6)[frame_ids].log_softmax(-1)
    expected = []
    for frame, present in zip(flat, classes):
        best = math.inf  # brute force over the assignments of classes to distinct sub-spaces
        for subspaces in itertools.permutations(range(4), len(present)):
            target = torch.full((4,), 5)
            target[list(subspaces)] = present
            best = min(best, float(F.nll_loss(frame, target, reduction="sum")))
        expected.append(best)
    assert loss.item() == pytest.approx(sum(expected) / 12, rel=1e-5)
    permuted = logits[:, :, torch.tensor([3, 1, 0, 2])]
    assert source_loss(permuted, frame_ids, classes).item() == pytest.approx(loss.item(), rel=1e-5)
    empty = source_loss(logits.requires_grad_(), frame_ids[:0], [])
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="class indices"):
        source_loss(logits, frame_ids[:1], [torch.tensor([5])])


def test_source_head_and_criterion_term():
    torch.manual_seed(1)
    head = SourceHead(dim=8, num_classes=70)
    codes = torch.randn(1, 2, 4, 8, requires_grad=True)
    pred_sources = head(codes)
    assert pred_sources.shape == (1, 2, 4, 71)
    masks = torch.zeros(1, 2, 16, 16, dtype=torch.long)
    masks[0, 0, :4, :4] = 3  # class index 3 -> object class 2
    masks[0, 0, 8:, 8:] = 7
    outputs = {
        "pred_logits": torch.randn(1, 2, 3, 70, requires_grad=True),
        "pred_masks": torch.randn(1, 2, 3, 4, 4, requires_grad=True),
        "pred_sources": pred_sources,
    }
    label_valid = torch.tensor([[True, True]])
    criterion = SetCriterion(num_classes=70, semantic=True, weight_source=2.0)
    terms = criterion(outputs, masks, label_valid)
    expected = source_loss(
        pred_sources, torch.tensor([0, 1]), [torch.tensor([2, 6]), torch.tensor([], dtype=torch.long)]
    )
    torch.testing.assert_close(terms["loss_source"], expected)
    terms["loss"].backward()
    assert codes.grad is not None and codes.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="pred_sources"):
        criterion({k: v for k, v in outputs.items() if k != "pred_sources"}, masks, label_valid)
    assert "loss_source" not in SetCriterion(num_classes=70, semantic=True)(outputs, masks, label_valid)


def test_source_loss_is_refused_on_binary_data():
    with pytest.raises(ConfigError, match="weight_source") as info:
        SetCriterion(num_classes=1, semantic=False, weight_source=1.0)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="weight_source"):
        SetCriterion(num_classes=70, semantic=True, weight_source=-1.0)


def test_the_lit_module_builds_the_head_only_for_the_source_loss():
    from test_model_build import model_config

    from avseg.lit.module import AVSLitModule

    cfg = model_config("qdformer_tiny", ["num_classes=70", "audio_encoder=embeddings"])
    assert AVSLitModule(**cfg).net.source_head is None
    module = AVSLitModule(**{**cfg, "loss": {"weight_source": 1.0}})
    torch.manual_seed(0)
    out = module(torch.randn(1, 2, 3, 64, 64), torch.randn(1, 2, 128))
    k = module.net.decomposition.num_tokens
    assert out["pred_sources"].shape == (1, 2, k, 71)
    masks = torch.zeros(1, 2, 64, 64, dtype=torch.long)
    masks[0, :, 10:20, 10:20] = 5
    terms = module.criterion(out, masks, torch.ones(1, 2, dtype=torch.bool))
    assert terms["loss_source"] > 0
    terms["loss"].backward()
    assert module.net.source_head.proj.weight.grad.abs().sum() > 0
    assert module.net.decomposition.prototypes.grad.abs().sum() > 0  # the loss reaches the decomposition
    binary = model_config("qdformer_tiny", ["num_classes=1", "audio_encoder=embeddings"])
    with pytest.raises(ConfigError, match="weight_source"):
        AVSLitModule(**{**binary, "loss": {"weight_source": 1.0}})
