"""Semantic-guided deformable transformer decoder with class, box and dynamic-mask heads.

Per frame, the content queries are the frame's quantised local audio codes ``VQ(l_{t,i})``
(``Nq = K`` per frame, plus ``extra_queries`` learned content queries if configured); learned
query position embeddings give each query slot its position code and (through a linear layer)
its initial reference point. Each layer: self-attention among the frame's queries, multi-scale
deformable cross-attention into the fused encoder memory, FFN (Deformable DETR's decoder layer,
post-norm). Heads on every layer (one per layer, or shared: ``box_head``):

- class: sigmoid logits over the object classes (1 for AVS, 70 for AVSS; no background logit);
- box: ``cxcywh`` in [0, 1], predicted relative to the layer's reference; with ``box_refine`` the
  next layer's reference is the detached predicted box (``box_head: per_layer``, 4-D) or its
  centre (``box_head: shared``, 2-D);
- mask: a controller MLP turns each query into the weights of a 3-layer 1x1 conv stack (CondInst /
  ReferFormer dynamic mask head) applied to the mask features concatenated with the coordinates
  relative to the predicted box centre.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avseg.models.layers.deformable import DeformableLayerSpec, post_norm_ffn
from avseg.models.layers.mlp import MLP
from avseg.models.options import Problem, choice, present, raise_first


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR decoder layer; key names (``cross_attn``, ``norm1``, ``self_attn``,
    ``norm2``, ``linear1``, ``linear2``, ``norm3``) match Deformable DETR / ReferFormer."""

    def __init__(self, *, spec: DeformableLayerSpec) -> None:
        super().__init__()
        self.cross_attn, self.dropout1, self.norm1 = spec.attention_parts()
        self.self_attn = nn.MultiheadAttention(spec.dim, spec.num_heads, dropout=spec.dropout, batch_first=True)
        self.dropout2 = nn.Dropout(spec.dropout)
        self.norm2 = nn.LayerNorm(spec.dim)
        self.linear1, self.linear2, self.dropout3, self.dropout4, self.norm3 = spec.ffn_parts()

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
        return post_norm_ffn(tgt, self.linear1, self.linear2, self.dropout3, self.dropout4, self.norm3)


CONTROLLER_LAYOUTS = ("referformer", "interleaved")
REL_COORD_UNITS = ("pixels", "unit")
BOX_HEADS = ("per_layer", "shared")
# mask-feature width from which the dynamic head's first layer is computed factorised (see forward)
FACTORISED_MIN_CHANNELS = 64


class DynamicMaskHead(nn.Module):
    """Controller MLP -> per-query 1x1 conv stack over ``[mask features, relative coords]``.

    ``forward(queries [..., N, Q, C], centres [..., N, Q, 2], mask_features [N, D, h, w])``
    -> mask logits ``[..., N, Q, h, w]``; all leading dims, frames and queries in batched matmuls.

    ``controller_layout`` says how the controller's output vector is read:
    ``"referformer"`` (ReferFormer / CondInst): all layers' weights first, then all biases,
    ``[w0 w1 w2 b0 b1 b2]``; ``"interleaved"``: ``[w0 b0 w1 b1 w2 b2]`` (avseg's earlier layout,
    kept for the CPU demo and its checkpoints). Each weight block is row-major ``[out, in]``; the
    input channels are the mask features, then (x, y) relative coordinates.

    ``rel_coords_unit``: ``"pixels"`` (ReferFormer): centre minus the stride-4 cell centre in
    input-image pixels (the image is taken as ``stride`` times the mask-feature size), values of
    the order of the image size; ``"unit"``: the same difference in [0, 1] image coordinates.
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.decoder`` options of the mask head that ``options`` holds."""
        checks = {
            "controller_layout": choice(CONTROLLER_LAYOUTS),
            "rel_coords_unit": choice(REL_COORD_UNITS),
        }
        return present(options, checks, "model.decoder.")

    def __init__(
        self,
        *,
        dim: int,
        mask_dim: int,
        channels: int = 8,
        num_layers: int = 3,
        rel_coords: bool = True,
        controller_layout: str = "interleaved",
        rel_coords_unit: str = "unit",
        stride: int = 4,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"dynamic mask head needs >= 2 layers, got {num_layers}")
        raise_first(self.check_options({"controller_layout": controller_layout, "rel_coords_unit": rel_coords_unit}))
        self.rel_coords = rel_coords
        self.controller_layout = controller_layout
        self.rel_coords_unit = rel_coords_unit
        self.stride = stride
        in_ch = mask_dim + (2 if rel_coords else 0)
        self.layer_shapes = [(channels, in_ch)] + [(channels, channels)] * (num_layers - 2) + [(1, channels)]
        num_params = sum(o * i + o for o, i in self.layer_shapes)
        self.controller = MLP(in_dim=dim, hidden_dim=dim, out_dim=num_params, num_layers=3)
        for layer in self.controller.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def param_slices(self) -> list[tuple[slice, slice]]:
        """Per dynamic layer: (weight slice, bias slice) of the controller's output vector."""
        return self.param_slices_for(self.layer_shapes, self.controller_layout)

    @staticmethod
    def param_slices_for(layer_shapes: list[tuple[int, int]], layout: str) -> list[tuple[slice, slice]]:
        """(weight slice, bias slice) per layer of ``[(out, in), ...]`` read in ``layout``."""
        slices = []
        offset = 0
        if layout == "referformer":
            weights = []
            for out_ch, in_ch in layer_shapes:
                weights.append(slice(offset, offset + out_ch * in_ch))
                offset += out_ch * in_ch
            for (out_ch, _), weight in zip(layer_shapes, weights):
                slices.append((weight, slice(offset, offset + out_ch)))
                offset += out_ch
            return slices
        for out_ch, in_ch in layer_shapes:
            weight = slice(offset, offset + out_ch * in_ch)
            offset += out_ch * in_ch
            slices.append((weight, slice(offset, offset + out_ch)))
            offset += out_ch
        return slices

    def _relative_coords(self, centres: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """``centres [..., N, Q, 2]`` -> offsets to every cell centre ``[..., N, Q, 2, h*w]``."""
        ys = (torch.arange(h, device=centres.device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=centres.device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        locations = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=0)  # [2, hw]
        rel = centres[..., :, None] - locations  # [..., N, Q, 2, hw]
        if self.rel_coords_unit == "pixels":
            # input-image pixels: cell centres at stride * k + stride / 2 (ReferFormer)
            scale = torch.tensor([w * self.stride, h * self.stride], device=rel.device, dtype=rel.dtype)
            rel = rel * scale[:, None]
        return rel.to(dtype)

    def forward(self, queries: torch.Tensor, centres: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        n, d, h, w = mask_features.shape
        lead = queries.shape[:-1]  # [..., N, Q]
        params = self.controller(queries)  # [..., N, Q, P]
        feats = mask_features.flatten(2)  # [N, D, hw]
        slices = self.param_slices()
        rel = self._relative_coords(centres, h, w, feats.dtype) if self.rel_coords else None
        if d >= FACTORISED_MIN_CHANNELS:
            # wide mask features (the paper setup's 256): the first layer as W_feat @ features
            # (one matmul per frame for all queries and layers) + W_rel @ offsets, instead of
            # copying the features for every query and layer before the concatenation (ReferFormer
            # repeats them per query); the same function, without the [layers, N, Q, D, hw] copy
            out_ch, in_ch = self.layer_shapes[0]
            weight = params[..., slices[0][0]].unflatten(-1, (out_ch, in_ch))  # [..., N, Q, o, in]
            per_frame = weight[..., :d].movedim(-4, 0)  # [N, ..., Q, o, D]
            x = torch.matmul(per_frame.reshape(n, -1, d), feats).reshape(*per_frame.shape[:-1], h * w).movedim(0, -4)
            if rel is not None:
                x = x + torch.matmul(weight[..., d:], rel)
            x += params[..., slices[0][1]][..., None]
            layers = list(zip(self.layer_shapes, slices))[1:]
            x = F.relu(x, inplace=True)
        else:
            x = feats.expand(*lead[:-2], n, d, h * w)[..., None, :, :].expand(*lead, d, h * w)
            if rel is not None:
                x = torch.cat((x, rel), dim=-2)
            layers = list(zip(self.layer_shapes, slices))
        for index, ((out_ch, in_ch), (weight_slice, bias_slice)) in enumerate(
            layers, start=len(self.layer_shapes) - len(layers)
        ):
            weight = params[..., weight_slice].unflatten(-1, (out_ch, in_ch))
            bias = params[..., bias_slice]
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
    with ``Q = K + extra_queries``.

    ``spec``: width C, heads, points, levels, FFN width, dropout and backend of the deformable
    layers (`avseg.models.build` reads them from ``model.decoder``).

    The keyword defaults are avseg's earlier head (so checkpoints whose stored config predates
    these switches rebuild unchanged); the paper setup sets ReferFormer's values in
    ``conf/model/decoder/deformable.yaml``.

    ``box_head``:

    - ``"per_layer"`` (Deformable DETR / ReferFormer ``--with_box_refine``): one class head and
      one box head per decoder layer (``class_embed.{l}``, ``bbox_embed.{l}``); with
      ``box_refine`` the reference becomes the detached 4-D predicted box after the first layer,
      so later layers sample relative to the box size; the mask head's centre is that detached
      reference (ReferFormer reads ``inter_references[..., :2]``);
    - ``"shared"`` (avseg's earlier head, kept for the CPU demo): one class and one box head for
      all layers, 2-D reference points (``box_refine`` moves only the centre), and the mask
      head's centre is the (non-detached) predicted box centre.
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.decoder`` options ``options`` holds (absent ones are not checked)."""
        problems = present(options, {"box_head": choice(BOX_HEADS)}, "model.decoder.")
        return problems + DynamicMaskHead.check_options(options)

    def __init__(
        self,
        *,
        spec: DeformableLayerSpec,
        num_classes: int,
        mask_dim: int,
        num_layers: int = 4,
        max_queries: int = 32,
        extra_queries: int = 0,
        box_refine: bool = True,
        box_head: str = "shared",
        dynamic_mask_channels: int = 8,
        controller_layers: int = 3,
        controller_layout: str = "interleaved",
        rel_coords: bool = True,
        rel_coords_unit: str = "unit",
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        options = {"box_head": box_head, "controller_layout": controller_layout, "rel_coords_unit": rel_coords_unit}
        raise_first(self.check_options(options))
        dim = spec.dim
        self.num_levels = spec.num_levels
        self.max_queries = max_queries
        self.box_refine = box_refine
        self.box_head = box_head
        self.layers = spec.stack(DeformableDecoderLayer, num_layers)
        self.query_pos = nn.Embedding(max_queries, dim)
        self.extra_content = nn.Embedding(extra_queries, dim) if extra_queries > 0 else None
        self.reference_points = nn.Linear(dim, 2)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        bias_value = -math.log((1 - prior_prob) / prior_prob)

        def class_head() -> nn.Linear:
            head = nn.Linear(dim, num_classes)
            nn.init.constant_(head.bias, bias_value)
            return head

        def box_mlp(size_bias: float) -> MLP:
            head = MLP(in_dim=dim, hidden_dim=dim, out_dim=4, num_layers=3)
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            nn.init.constant_(head.layers[-1].bias[2:], size_bias)
            return head

        if box_head == "per_layer":
            # ReferFormer clones one initialised head per layer, then sets the size bias (-2) of the
            # first layer's box head only (later layers refine a box that already has a size)
            self.class_embed = nn.ModuleList(class_head() for _ in range(num_layers))
            self.bbox_embed = nn.ModuleList(box_mlp(-2.0 if i == 0 else 0.0) for i in range(num_layers))
        else:
            self.class_embed = class_head()
            self.bbox_embed = box_mlp(-2.0)
        self.mask_head = DynamicMaskHead(
            dim=dim,
            mask_dim=mask_dim,
            channels=dynamic_mask_channels,
            num_layers=controller_layers,
            rel_coords=rel_coords,
            controller_layout=controller_layout,
            rel_coords_unit=rel_coords_unit,
        )

    def _queries(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = codes.shape[0]
        tgt = codes
        if self.extra_content is not None:
            tgt = torch.cat((tgt, self.extra_content.weight[None].expand(n, -1, -1)), dim=1)
        num_queries = tgt.shape[1]
        if num_queries > self.max_queries:
            raise ValueError(
                f"decoder got {num_queries} queries per frame but model.decoder.max_queries is {self.max_queries}"
            )
        return tgt, self.query_pos.weight[:num_queries][None].expand(n, -1, -1)

    def forward(
        self,
        codes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        mask_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        tgt, query_pos = self._queries(codes)
        reference = self.reference_points(query_pos).sigmoid()  # [N, Q, 2]
        if self.box_head == "shared":
            return self._forward_shared(
                tgt, query_pos, reference, memory, spatial_shapes, level_start_index, mask_features
            )
        hidden, boxes, centres = [], [], []
        for lid, layer in enumerate(self.layers):
            ref_in = reference[:, :, None, :].expand(-1, -1, self.num_levels, -1)  # [N, Q, L, 2 or 4]
            tgt = layer(tgt, query_pos, ref_in, memory, spatial_shapes, level_start_index)
            hidden.append(tgt)
            delta = self.bbox_embed[lid](tgt)
            if reference.shape[-1] == 4:
                box = (delta + inverse_sigmoid(reference)).sigmoid()
            else:
                box = torch.cat((delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]), dim=-1).sigmoid()
            boxes.append(box)
            if self.box_refine:
                reference = box.detach()
            centres.append(reference[..., :2])
        hs = torch.stack(hidden)  # [layers, N, Q, C]
        logits = torch.stack([head(h) for head, h in zip(self.class_embed, hidden)])
        masks = self.mask_head(hs, torch.stack(centres), mask_features)
        return {"logits": logits, "boxes": torch.stack(boxes), "masks": masks}

    def _forward_shared(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        mask_features: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
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
