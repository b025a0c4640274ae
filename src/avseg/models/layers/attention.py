"""Multi-head attention wrappers (batch-first) used by the fusion and decoder modules."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``memory`` tokens, batch first.

    ``forward(query [N, Lq, C], memory [N, Lk, C], query_pos=None, memory_pos=None,
    memory_padding_mask=None [N, Lk] bool, True = ignore) -> [N, Lq, C]`` (the attention output
    only; residual, gating and norm are the caller's choice). Positions are added to queries and
    keys, not to values (DETR convention).
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        *,
        query_pos: torch.Tensor | None = None,
        memory_pos: torch.Tensor | None = None,
        memory_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = query if query_pos is None else query + query_pos
        k = memory if memory_pos is None else memory + memory_pos
        out, _ = self.attn(q, k, memory, key_padding_mask=memory_padding_mask, need_weights=False)
        return out


class _AttendAndCombine(nn.Module):
    """`CrossAttention` of ``query`` over ``memory``, then ``combine(query, attended)``.

    ``forward(query [N, Lq, C], memory [N, Lk, C], *, query_pos [N, Lq, C] | None, memory_pos
    [N, Lk, C] | None) -> [N, Lq, C]``.
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.cross = CrossAttention(dim=dim, num_heads=num_heads, dropout=dropout)

    def combine(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define combine()")

    def forward(self, query: torch.Tensor, memory: torch.Tensor, **positions: torch.Tensor | None) -> torch.Tensor:
        """``positions``: `CrossAttention`'s keywords ``query_pos`` and ``memory_pos``."""
        return self.combine(query, self.cross(query, memory, **positions))


GATE_FORMS = ("product", "residual_product", "sum")


class GatedCrossAttention(_AttendAndCombine):
    """Visual tokens attend to audio tokens; the result gates the visual tokens.

    ``form="product"``: ``x' = x * a`` with ``a = attn(x + pos, audio)``, ReferFormer's
    vision-language fusion, which the paper's ``audio_dual`` fusion builds on;
    ``"residual_product"``: ``x * (1 + a)`` (the identity at initialisation, when ``a`` is near 0,
    instead of nearly zeroing the visual tokens); ``"sum"``: ``x + a``.
    ``forward(visual [N, S, C], audio [N, K, C], *, query_pos (visual) [N, S, C] | None,
    memory_pos (audio) [N, K, C] | None) -> [N, S, C]``.
    """

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0, form: str = "product") -> None:
        if form not in GATE_FORMS:
            raise ValueError(f"GatedCrossAttention: form must be one of {GATE_FORMS}, got {form!r}")
        super().__init__(dim=dim, num_heads=num_heads, dropout=dropout)
        self.form = form

    def combine(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        if self.form == "product":
            return query * attended
        if self.form == "residual_product":
            return query * (1.0 + attended)
        return query + attended


class ResidualCrossAttention(_AttendAndCombine):
    """Cross-attention with residual, dropout and post-LayerNorm: ``norm(x + drop(attn(x, m)))``."""

    def __init__(self, *, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__(dim=dim, num_heads=num_heads, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def combine(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.norm(query + self.dropout(attended))
