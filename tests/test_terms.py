"""The matched terms' weights and the focal loss that the matcher and the criterion share."""

from __future__ import annotations

import pytest
import torch

from avseg.errors import ConfigError
from avseg.models.criterion import SetCriterion
from avseg.models.terms import TERMS, FocalLoss, TermWeights, sigmoid_focal_terms


def test_term_weights_defaults_names_and_options() -> None:
    weights = TermWeights()
    assert weights.named() == {"class": 2.0, "bbox": 5.0, "giou": 2.0, "mask": 2.0, "dice": 5.0}
    assert tuple(weights.named()) == TERMS
    given = TermWeights.from_options({"weight_class": 1, "weight_dice": 3.5, "weight_vq": 9.0}, "weight_")
    assert given == TermWeights(class_=1.0, dice=3.5)
    assert isinstance(given.class_, float)
    with pytest.raises(ConfigError, match=r"TermWeights\.giou: got -1"):
        TermWeights(giou=-1)


def test_focal_loss_parameters_and_terms() -> None:
    logits = torch.linspace(-4, 4, 9)
    pos, neg = FocalLoss(alpha=0.5, gamma=1.0).terms(logits)
    expected = sigmoid_focal_terms(logits, alpha=0.5, gamma=1.0)
    assert torch.equal(pos, expected[0]) and torch.equal(neg, expected[1])
    assert FocalLoss.from_options({"focal_gamma": 0, "weight_class": 1.0}) == FocalLoss(gamma=0.0)
    with pytest.raises(ConfigError, match="focal_alpha"):
        FocalLoss(alpha=1.5)
    with pytest.raises(ConfigError, match="focal_gamma"):
        FocalLoss(gamma=-0.5)


def test_the_config_path_groups_the_flat_keys_and_names_bad_ones() -> None:
    options = {"weight_dice": 3.0, "focal_alpha": 0.5, "weight_vq": 0.25, "match_level": "clip"}
    criterion = SetCriterion.from_config(options, num_classes=1, semantic=False)
    assert criterion.weight_dict["loss_dice"] == 3.0 and criterion.weight_dict["loss_vq"] == 0.25
    assert criterion.focal == FocalLoss(alpha=0.5) and criterion.matcher.focal == FocalLoss(alpha=0.5)
    assert criterion.matcher.costs == TermWeights(dice=3.0)
    with pytest.raises(ConfigError, match=r"model\.loss\.focal_alpha"):
        SetCriterion.from_config({"focal_alpha": 2.0}, num_classes=1, semantic=False)
    with pytest.raises(ConfigError, match=r"model\.matcher\.cost_klass"):
        SetCriterion.from_config({}, num_classes=1, semantic=False, matcher={"cost_klass": 1.0})
    with pytest.raises(ConfigError, match=r"model\.matcher\.cost_dice"):
        SetCriterion.from_config({}, num_classes=1, semantic=False, matcher={"cost_dice": -1.0})
    configured = SetCriterion.from_config({}, num_classes=1, semantic=False, matcher={"focal_gamma": 1.0})
    assert configured.matcher.focal == FocalLoss(gamma=1.0) and configured.focal == FocalLoss()
