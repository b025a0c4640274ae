"""Small feed-forward blocks shared by the fusion, encoder and decoder modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """A plain multi-layer perceptron (ReLU between layers, none after the last).

    Used for the box head and the dynamic-mask controller. Input ``[..., in_dim]`` ->
    ``[..., out_dim]``.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class FeedForward(nn.Module):
    """Transformer FFN branch: ``linear2(dropout(relu(linear1(x))))`` with output dropout.

    Returns the residual branch only; the caller adds it and normalises (used by the dual block;
    the encoder/decoder layers inline the same FFN to keep Deformable DETR's key names).
    """

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.dropout_hidden = nn.Dropout(dropout)
        self.dropout_out = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> the residual branch ``[..., dim]`` (the caller adds and normalises)."""
        return self.dropout_out(self.linear2(self.dropout_hidden(F.relu(self.linear1(x), inplace=True))))
