"""What the Hungarian matcher and the set criterion share: the weights of the five matched terms
and the sigmoid focal loss (docs/METHOD.md section 1.7).

ReferFormer's convention, kept here: each matching cost equals the loss weight of the same term, so
one `TermWeights` is the criterion's weights and, unless ``model.matcher`` sets costs of its own,
the matcher's costs (`avseg.models.matcher.build_matcher`); one `FocalLoss` likewise serves both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from avseg.models.options import Check, non_negative, number_in, present, raise_first

__all__ = ["FOCAL_CHECKS", "TERMS", "FocalLoss", "TermWeights", "sigmoid_focal_terms"]

# the matched terms, in the order the criterion reports them; each has a loss weight
# (``model.loss.weight_<term>``) and a matching cost (``model.matcher.cost_<term>``)
TERMS = ("class", "bbox", "giou", "mask", "dice")


@dataclass(frozen=True)
class TermWeights:
    """Weights of the five matched terms: class (sigmoid focal), box L1, box GIoU, mask (sigmoid
    focal), mask dice; ReferFormer-family defaults. ``class_`` is the class term (``class`` is a
    Python keyword); `named` and `from_options` use the config's names (``class``)."""

    class_: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    mask: float = 2.0
    dice: float = 5.0

    def __post_init__(self) -> None:
        raise_first(present(self.named(), dict.fromkeys(TERMS, non_negative), "TermWeights."))
        for field in fields(self):
            object.__setattr__(self, field.name, float(getattr(self, field.name)))

    def named(self) -> dict[str, float]:
        """``{"class": ..., "bbox": ..., "giou": ..., "mask": ..., "dice": ...}`` in `TERMS` order."""
        return {term: getattr(self, _field(term)) for term in TERMS}

    @classmethod
    def from_options(cls, options: Mapping[str, Any], prefix: str) -> TermWeights:
        """The weights the keys ``prefix + term`` of ``options`` give (``weight_class``, or
        ``cost_class`` ...); a term without its key keeps its default."""
        return cls(**{_field(term): options[prefix + term] for term in TERMS if prefix + term in options})


def _field(term: str) -> str:
    return "class_" if term == "class" else term


# the focal parameters' allowed values, under their config names (``model.loss.focal_alpha`` ...)
FOCAL_CHECKS: dict[str, Check] = {
    "focal_alpha": lambda key, value: number_in(key, value, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "focal_gamma": non_negative,
}


def sigmoid_focal_terms(logits: Tensor, *, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Element-wise sigmoid focal loss for a positive and for a negative target.

    Returns ``(pos, neg)`` with ``pos = alpha * (1 - p)^gamma * -log(p)`` and
    ``neg = (1 - alpha) * p^gamma * -log(1 - p)``, ``p = sigmoid(logits)``; the logs are computed
    as softplus for stability. The focal loss of a target ``t`` in [0, 1] is ``t*pos + (1-t)*neg``.
    """
    prob = logits.sigmoid()
    pos = alpha * (1 - prob).pow(gamma) * F.softplus(-logits)
    neg = (1 - alpha) * prob.pow(gamma) * F.softplus(logits)
    return pos, neg


@dataclass(frozen=True)
class FocalLoss:
    """The sigmoid focal loss's parameters (RetinaNet's alpha 0.25, gamma 2), for the class and
    mask terms of both the matcher and the criterion."""

    alpha: float = 0.25
    gamma: float = 2.0

    def __post_init__(self) -> None:
        raise_first(present({"focal_alpha": self.alpha, "focal_gamma": self.gamma}, FOCAL_CHECKS, ""))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "gamma", float(self.gamma))

    def terms(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(pos, neg)`` of `sigmoid_focal_terms` with these parameters, shaped like ``logits``."""
        return sigmoid_focal_terms(logits, alpha=self.alpha, gamma=self.gamma)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> FocalLoss:
        """The parameters the keys ``focal_alpha`` / ``focal_gamma`` of ``options`` give (defaults otherwise)."""
        return cls(**{name: options[f"focal_{name}"] for name in ("alpha", "gamma") if f"focal_{name}" in options})
