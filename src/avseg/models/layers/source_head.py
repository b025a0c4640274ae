"""Linear source head on the K sub-space codes (issue 13; the permutation-invariant source loss,
`avseg.models.source_loss`; built only when ``model.loss.weight_source`` > 0)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SourceHead"]


class SourceHead(nn.Module):
    """codes [B, T, K, C] -> logits [B, T, K, num_classes + 1] (the last index is "none"):
    one shared linear layer applied to each frame's each sub-space code."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        if dim < 1 or num_classes < 1:
            raise ValueError(f"SourceHead: dim and num_classes must be >= 1, got {dim} and {num_classes}")
        self.num_classes = int(num_classes)
        self.proj = nn.Linear(dim, num_classes + 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 4 or codes.shape[-1] != self.proj.in_features:
            raise ValueError(f"SourceHead: codes must be [B, T, K, {self.proj.in_features}], got {tuple(codes.shape)}")
        return self.proj(codes)
