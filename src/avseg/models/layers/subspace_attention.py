"""Cross-attention of K sub-space queries over audio tokens, with the two decomposition switches of
docs/MODEL.md ("Decomposition readings"): competition among the queries (slot attention) and one
value / output projection per sub-space."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

__all__ = ["COMPETITIONS", "SubspaceCrossAttention"]

COMPETITIONS = ("none", "slots")


class SubspaceCrossAttention(nn.Module):
    """Multi-head attention of K query tokens over S memory tokens, batch first.

    ``forward(queries [N, K, C], memory [N, S, C], memory_padding_mask [N, S] bool (True = ignore))
    -> (out [N, K, C], weights [N, K, S])`` (weights averaged over heads; the output only, residual
    and norm are the caller's).

    - ``competition="none"``: ordinary attention, a softmax over the S tokens for each query.
    - ``competition="slots"``: slot-attention competition: a softmax over the K queries for each
      token (each token is shared out among the sub-spaces), then each query takes the weighted
      mean of the tokens by its share (weights renormalised over S, + ``eps``). A token that one
      sub-space claims is lost to the others, so the K outputs cannot all be the same mean.
    - ``subspace_values``: sub-space k has its own value and output projections (K of each), so
      two sub-spaces attending alike still read different features.

    The queries are read only through the query projection: a caller with query positions adds them
    to ``queries`` (DETR convention: positions steer attention, they are not read out), as it does
    for torch's attention.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_queries: int,
        competition: str = "none",
        subspace_values: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if competition not in COMPETITIONS:
            raise ValueError(f"SubspaceCrossAttention: competition {competition!r} not in {COMPETITIONS}")
        if dim % num_heads != 0:
            raise ValueError(f"SubspaceCrossAttention: num_heads {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.competition = competition
        self.subspace_values = bool(subspace_values)
        self.eps = eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        if self.subspace_values:
            bound = 1.0 / math.sqrt(dim)
            self.v_weight = nn.Parameter(torch.empty(num_queries, dim, dim).uniform_(-bound, bound))
            self.v_bias = nn.Parameter(torch.zeros(num_queries, dim))
            self.out_weight = nn.Parameter(torch.empty(num_queries, dim, dim).uniform_(-bound, bound))
            self.out_bias = nn.Parameter(torch.zeros(num_queries, dim))
        else:
            self.v_proj = nn.Linear(dim, dim)
            self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, k, _ = queries.shape
        if k != self.num_queries:
            raise ValueError(f"SubspaceCrossAttention: expected {self.num_queries} queries, got {k}")
        h = self.num_heads
        q = rearrange(self.q_proj(queries), "n k (h d) -> n h k d", h=h)
        key = rearrange(self.k_proj(memory), "n s (h d) -> n h s d", h=h)
        logits = torch.einsum("nhkd,nhsd->nhks", q, key) / math.sqrt(q.shape[-1])  # [N, h, K, S]
        if self.competition == "slots":
            attn = logits.softmax(dim=2)  # over the K queries, for each token
            if memory_padding_mask is not None:
                attn = attn.masked_fill(memory_padding_mask[:, None, None, :], 0.0)
            attn = attn / (attn.sum(dim=-1, keepdim=True) + self.eps)
        else:
            if memory_padding_mask is not None:
                logits = logits.masked_fill(memory_padding_mask[:, None, None, :], float("-inf"))
            attn = logits.softmax(dim=-1)
        if self.subspace_values:
            values = torch.einsum("nsc,kcd->nksd", memory, self.v_weight) + self.v_bias[None, :, None]
            values = rearrange(values, "n k s (h d) -> n h k s d", h=h)
            out = rearrange(torch.einsum("nhks,nhksd->nhkd", attn, values), "n h k d -> n k (h d)")
            out = torch.einsum("nkc,kcd->nkd", out, self.out_weight) + self.out_bias
        else:
            values = rearrange(self.v_proj(memory), "n s (h d) -> n h s d", h=h)
            out = self.out_proj(rearrange(torch.einsum("nhks,nhsd->nhkd", attn, values), "n h k d -> n k (h d)"))
        return out, attn.mean(dim=1)
