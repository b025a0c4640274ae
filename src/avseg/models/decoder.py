"""Semantic-guided deformable transformer decoder with class, box and dynamic-mask heads.

Per frame, the content queries are the frame's quantised local audio codes ``VQ(l_{t,i})``
(``Nq = K`` per frame, plus ``extra_queries`` learned content queries if configured); learned
query position embeddings give each query slot its position code and (through a linear layer)
its initial reference point. Each layer: self-attention among the frame's queries, multi-scale
deformable cross-attention into the fused encoder memory, FFN (Deformable DETR's decoder layer,
post-norm). Heads on every layer (shared weights across layers):

- class: sigmoid logits over the object classes (1 for AVS, 70 for AVSS; no background logit);
- box: ``cxcywh`` in [0, 1], predicted relative to the layer's reference point; with
  ``box_refine`` the next layer's reference point is the detached predicted centre;
- mask: a controller MLP turns each query into the weights of a 3-layer 1x1 conv stack (CondInst /
  ReferFormer dynamic mask head) applied to the mask features concatenated with the coordinates
  relative to the predicted box centre.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avseg.models.layers.mlp import MLP
from avseg.ops import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR decoder layer; key names (``cross_attn``, ``norm1``, ``self_attn``,
    ``norm2``, ``linear1``, ``linear2``, ``norm3``) match Deformable DETR / ReferFormer."""

    def __init__(
        self, *, dim: int, ffn_dim: int, dropout: float, num_levels: int, num_heads: int, num_points: int, backend: str
    ) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(
            dim=dim, num_levels=num_levels, num_heads=num_heads, num_points=num_points, backend=backend
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """``tgt, query_pos [N, Q, C]``, ``reference_points [N, Q, L, 2]``, ``memory [N, S, C]`` -> ``[N, Q, C]``."""
        q = tgt + query_pos
        attn, _ = self.self_attn(q, q, tgt, need_weights=False)
        tgt = self.norm2(tgt + self.dropout2(attn))
        cross = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index)
        tgt = self.norm1(tgt + self.dropout1(cross))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt), inplace=True)))
        return self.norm3(tgt + self.dropout4(ffn))


class DynamicMaskHead(nn.Module):
    """Controller MLP -> per-query 1x1 conv stack over ``[mask features, relative coords]``.

    ``forward(queries [..., N, Q, C], centres [..., N, Q, 2], mask_features [N, D, h, w])``
    -> mask logits ``[..., N, Q, h, w]``; all leading dims, frames and queries in batched matmuls.
    """

    def __init__(
        self, *, dim: int, mask_dim: int, channels: int = 8, num_layers: int = 3, rel_coords: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"dynamic mask head needs >= 2 layers, got {num_layers}")
        self.rel_coords = rel_coords
        in_ch = mask_dim + (2 if rel_coords else 0)
        self.layer_shapes = [(channels, in_ch)] + [(channels, channels)] * (num_layers - 2) + [(1, channels)]
        num_params = sum(o * i + o for o, i in self.layer_shapes)
        self.controller = MLP(in_dim=dim, hidden_dim=dim, out_dim=num_params, num_layers=3)
        for layer in self.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, queries: torch.Tensor, centres: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        n, d, h, w = mask_features.shape
        lead = queries.shape[:-1]  # [..., N, Q]
        params = self.controller(queries)  # [..., N, Q, P]
        feats = mask_features.flatten(2)  # [N, D, hw]
        feats = feats.expand(*lead[:-2], n, d, h * w)[..., None, :, :].expand(*lead, d, h * w)
        if self.rel_coords:
            ys = (torch.arange(h, device=feats.device, dtype=feats.dtype) + 0.5) / h
            xs = (torch.arange(w, device=feats.device, dtype=feats.dtype) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            locations = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=0)  # [2, hw]
            rel = centres[..., :, None] - locations  # [..., N, Q, 2, hw]
            x = torch.cat((feats, rel), dim=-2)
        else:
            x = feats
        offset = 0
        for index, (out_ch, in_ch) in enumerate(self.layer_shapes):
            weight = params[..., offset : offset + out_ch * in_ch].unflatten(-1, (out_ch, in_ch))
            offset += out_ch * in_ch
            bias = params[..., offset : offset + out_ch]
            offset += out_ch
            # bias and relu in place: neither the matmul nor the add keeps its output for backward
            x = torch.matmul(weight, x)
            x += bias[..., None]
            if index < len(self.layer_shapes) - 1:
                x = F.relu(x, inplace=True)
        return x.squeeze(-2).unflatten(-1, (h, w))


class SemanticGuidedDecoder(nn.Module):
    """Decoder + heads. ``forward(codes [N, K, C], memory [N, S, C], spatial_shapes [L, 2],
    level_start_index [L], mask_features [N, D, H/4, W/4])`` -> dict of per-layer stacks:
    ``logits [layers, N, Q, num_classes]``, ``boxes [layers, N, Q, 4]``, ``masks [layers, N, Q, H/4, W/4]``
    with ``Q = K + extra_queries``."""

    def __init__(
        self,
        *,
        dim: int,
        num_classes: int,
        mask_dim: int,
        num_layers: int = 6,
        num_levels: int = 4,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        max_queries: int = 32,
        extra_queries: int = 0,
        box_refine: bool = True,
        dynamic_mask_channels: int = 8,
        controller_layers: int = 3,
        rel_coords: bool = True,
        prior_prob: float = 0.01,
        ms_deform_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.max_queries = max_queries
        self.box_refine = box_refine
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                dim=dim,
                ffn_dim=ffn_dim,
                dropout=dropout,
                num_levels=num_levels,
                num_heads=num_heads,
                num_points=num_points,
                backend=ms_deform_backend,
            )
            for _ in range(num_layers)
        )
        self.query_pos = nn.Embedding(max_queries, dim)
        self.extra_content = nn.Embedding(extra_queries, dim) if extra_queries > 0 else None
        self.reference_points = nn.Linear(dim, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        self.class_embed = nn.Linear(dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        self.bbox_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
        self.mask_head = DynamicMaskHead(
            dim=dim, mask_dim=mask_dim, channels=dynamic_mask_channels, num_layers=controller_layers, rel_coords=rel_coords
        )

    def forward(
        self,
        codes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        mask_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        n = codes.shape[0]
        tgt = codes
        if self.extra_content is not None:
            tgt = torch.cat((tgt, self.extra_content.weight[None].expand(n, -1, -1)), dim=1)
        num_queries = tgt.shape[1]
        if num_queries > self.max_queries:
            raise ValueError(
                f"decoder got {num_queries} queries per frame but model.decoder.max_queries is {self.max_queries}"
            )
        query_pos = self.query_pos.weight[:num_queries][None].expand(n, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()  # [N, Q, 2]
        hidden, references = [], []
        for layer in self.layers:
            ref_in = reference[:, :, None, :].expand(-1, -1, self.num_levels, -1)
            tgt = layer(tgt, query_pos, ref_in, memory, spatial_shapes, level_start_index)
            hidden.append(tgt)
            references.append(reference)
            if self.box_refine:
                delta = self.bbox_embed(tgt)[..., :2]
                reference = (delta + inverse_sigmoid(reference)).sigmoid().detach()
        hs = torch.stack(hidden)  # [layers, N, Q, C]
        refs = torch.stack(references)  # [layers, N, Q, 2]
        logits = self.class_embed(hs)
        box = self.bbox_embed(hs)
        box = torch.cat((box[..., :2] + inverse_sigmoid(refs), box[..., 2:]), dim=-1).sigmoid()
        masks = self.mask_head(hs, box[..., :2], mask_features)
        return {"logits": logits, "boxes": box, "masks": masks}
