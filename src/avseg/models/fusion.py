"""Audio-visual fusion (``fpn_type: audio_dual``), deformable encoder and the mask-feature FPN.

Per frame (all ``N = B*T`` frames in one batch):

1. gated early fusion: the visual tokens of every level cross-attend to the frame's K decomposed
   audio tokens and are multiplied by the result (ReferFormer's multiplicative fusion);
2. a multi-scale deformable transformer encoder over the 4 fused levels (strides 8..64);
3. the "dual" cross-modal block at the coarsest FPN level (stride 32; ``dual_stride`` 16 or 8
   moves it to a finer encoder output). ``dual_form: r2vos`` (the paper setup): R2VOS's dual
   block over the whole clip with the audio tokens as its prompts (`avseg.models.layers.dual`);
   ``dual_form: gate`` (avseg's earlier per-frame block, kept for the CPU demo): audio tokens
   attend to the frame's visual tokens, visual tokens attend back, and every audio token becomes a
   dynamic 1x1 filter whose response maps (max-pooled over tokens) gate the visual map;
4. a top-down FPN from stride 32 to stride 4 (with the backbone's res2) giving mask features
   ``[N, mask_dim, H/4, W/4]``.

``fpn_type``: ``audio_dual`` (all of the above), ``audio`` (no dual block), ``none`` (no audio in
the pixel path at all: steps 1 and 3 skipped; the ablation baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from avseg.models.layers.attention import GATE_FORMS, GatedCrossAttention, ResidualCrossAttention
from avseg.models.layers.deformable import DeformableLayerSpec, post_norm_ffn
from avseg.models.layers.dual import R2VOSDualBlock
from avseg.models.layers.mlp import FeedForward
from avseg.models.layers.position import sine_position_2d
from avseg.models.options import Problem, at_least, boolean, choice, is_int, present, raise_first

FPN_TYPES = ("audio_dual", "audio", "none")
DUAL_FORMS = ("r2vos", "gate")
_KEY = "model.fusion"
# stride of the encoder output the dual block works on -> index among the FPN maps (strides 8, 16, 32)
DUAL_STRIDES = {8: 0, 16: 1, 32: 2}


def flatten_levels(levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, C, h_l, w_l]`` per level -> tokens ``[N, S, C]``, ``spatial_shapes [L, 2]`` (h, w),
    ``level_start_index [L]`` (both long)."""
    device = levels[0].device
    shapes = torch.tensor([list(x.shape[-2:]) for x in levels], dtype=torch.long, device=device)
    areas = shapes.prod(1)
    start = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    tokens = torch.cat([rearrange(x, "n c h w -> n (h w) c") for x in levels], dim=1)
    return tokens, shapes, start


def level_positions(levels: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """2-D sine code of every level, concatenated: ``[S, dim]`` (no batch dimension)."""
    x = levels[0]
    codes = [
        rearrange(sine_position_2d(h, w, dim, device=x.device, dtype=x.dtype), "c h w -> (h w) c")
        for h, w in (lvl.shape[-2:] for lvl in levels)
    ]
    return torch.cat(codes, dim=0)


def encoder_reference_points(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1]: ``[S, 2]`` (x, y); no padding."""
    x = levels[0]
    points = []
    for h, w in (lvl.shape[-2:] for lvl in levels):
        ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR encoder layer (post-norm). Key names match Deformable DETR / ReferFormer:
    ``self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}``, ``norm1``,
    ``linear1``, ``linear2``, ``norm2``."""

    def __init__(self, *, spec: DeformableLayerSpec) -> None:
        super().__init__()
        self.self_attn, self.dropout1, self.norm1 = spec.attention_parts()
        self.linear1, self.linear2, self.dropout2, self.dropout3, self.norm2 = spec.ffn_parts()

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """``src [N, S, C]``, ``pos [N or 1, S, C]``, ``reference_points [N, S, L, 2]`` -> ``[N, S, C]``."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attn))
        return post_norm_ffn(src, self.linear1, self.linear2, self.dropout2, self.dropout3, self.norm2)


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers with a learned per-level embedding (``level_embed``)."""

    def __init__(self, *, num_layers: int, spec: DeformableLayerSpec) -> None:
        super().__init__()
        self.dim = spec.dim
        self.level_embed = nn.Parameter(torch.empty(spec.num_levels, spec.dim))
        nn.init.normal_(self.level_embed)
        self.layers = spec.stack(DeformableEncoderLayer, num_layers)

    def positions(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sine code plus level embedding, ``[1, S, C]``."""
        pos = level_positions(levels, self.dim)
        level_ids = torch.cat(
            [
                torch.full((h * w,), i, device=pos.device, dtype=torch.long)
                for i, (h, w) in enumerate(x.shape[-2:] for x in levels)
            ]
        )
        return (pos + self.level_embed[level_ids])[None]

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        levels: Sequence[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """``src [N, S, C]`` (flattened fused levels) -> memory ``[N, S, C]``."""
        num_levels = len(levels)
        reference = encoder_reference_points(levels)  # [S, 2]
        reference = reference[None, :, None, :].expand(src.shape[0], -1, num_levels, -1)
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, level_start_index)
        return src


class DualCrossModalBlock(nn.Module):
    """Visual <-> audio cross-attention both ways plus audio-token dynamic 1x1 filters.

    ``forward(visual [N, C, h, w], audio [N, K, C]) -> (visual [N, C, h, w], audio [N, K, C])``.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float, num_groups: int = 32) -> None:
        super().__init__()
        self.audio_to_visual = ResidualCrossAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.audio_ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout)
        self.audio_norm = nn.LayerNorm(dim)
        self.visual_to_audio = ResidualCrossAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.filter_proj = nn.Linear(dim, dim)
        self.out_norm = nn.GroupNorm(num_groups, dim)

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = visual.shape
        pos = rearrange(sine_position_2d(h, w, c, device=visual.device, dtype=visual.dtype), "c h w -> 1 (h w) c")
        tokens = rearrange(visual, "n c h w -> n (h w) c")
        # audio tokens gather the visual evidence of their source
        audio = self.audio_to_visual(audio, tokens, memory_pos=pos)
        audio = self.audio_norm(audio + self.audio_ffn(audio))
        # visual tokens read the updated audio tokens
        tokens = self.visual_to_audio(tokens, audio, query_pos=pos)
        # each audio token -> one 1x1 filter; response maps max-pooled over tokens gate the map
        filters = self.filter_proj(audio)  # [N, K, C]
        response = torch.einsum("nkc,nsc->nks", filters, tokens) / math.sqrt(c)
        gate = torch.sigmoid(response.amax(dim=1))[..., None]  # [N, S, 1]
        tokens = tokens * (1.0 + gate)
        out = rearrange(tokens, "n (h w) c -> n c h w", h=h, w=w)
        return self.out_norm(out), audio


class AudioVisualSimilarity(nn.Module):
    """Per-pixel audio-visual similarity map (the localisation map of sound-source localisation).

    ``forward(visual [N, Cv, h, w], audio [N, K, C]) -> [N, 1, h, w]``: cosine similarity between a
    1x1-conv embedding of every pixel and a linear embedding of every audio token (both of width
    ``embed_dim``), max over the K tokens, times a learnt temperature (initialised to 10). It gives the
    mask head a direct, bilinear path from "which sound" to "which pixels".
    """

    def __init__(self, *, dim: int, visual_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.visual_embed = nn.Conv2d(visual_dim, embed_dim, kernel_size=1)
        self.audio_embed = nn.Linear(dim, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        pixels = F.normalize(self.visual_embed(visual), dim=1)  # [N, D, h, w]
        tokens = F.normalize(self.audio_embed(audio), dim=-1)  # [N, K, D]
        similarity = torch.einsum("nkd,ndhw->nkhw", tokens, pixels).amax(dim=1, keepdim=True)
        return similarity * self.log_temperature.exp()


def _conv_gn_relu(in_ch: int, out_ch: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.GroupNorm(min(num_groups, out_ch), out_ch),
        nn.ReLU(inplace=True),
    )


class AudioVisualFusion(nn.Module):
    """Steps 1-4 of the module docstring.

    ``forward(levels [p3, p4, p5, p6] each [N, C, h, w], res2 [N, C2, H/4, W/4], audio [N, K, C],
    num_frames=T, frame_valid [B, T] | None)``
    -> dict with ``memory [N, S, C]``, ``spatial_shapes [L, 2]``, ``level_start_index [L]``,
    ``memory_pos [1, S, C]``, ``mask_features [N, mask_dim, H/4, W/4]``, ``audio [N, K, C]``
    (after the dual block) and ``similarity`` (the audio-visual similarity map [N, 1, H/4, W/4], the
    last channel of ``mask_features``, when ``audio_similarity_dim`` is on; else None).

    ``spec``: width C, heads, points, levels, FFN width, dropout and backend of the deformable
    encoder layers, also the heads, FFN width and dropout of the fusion blocks (`avseg.models.build`
    reads them from ``model.fusion``).
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.fusion`` options ``options`` holds (absent ones take the
        constructor's defaults)."""
        checks = {
            "fpn_type": choice(FPN_TYPES),
            "dual_stride": choice(tuple(DUAL_STRIDES)),
            "early_fusion_form": choice(GATE_FORMS),
            "dual_form": choice(DUAL_FORMS),
            "num_levels": choice((4,)),
            "audio_similarity_dim": at_least(0, note=" (0 = off)"),
            "similarity_to_masks": boolean,
        }
        problems = present(options, checks, f"{_KEY}.")
        similarity = options.get("audio_similarity_dim", 0)
        similarity_on = is_int(similarity) and similarity > 0
        if similarity_on and options.get("fpn_type") == "none":
            allowed = f"0 while {_KEY}.fpn_type=none (no audio in the pixel path)"
            problems.append(Problem(f"{_KEY}.audio_similarity_dim", similarity, allowed))
        if options.get("similarity_to_masks") is True and not similarity_on:
            allowed = f"false unless {_KEY}.audio_similarity_dim > 0 (it adds that map to the masks)"
            problems.append(Problem(f"{_KEY}.similarity_to_masks", True, allowed))
        return problems

    def __init__(
        self,
        *,
        spec: DeformableLayerSpec,
        res2_channels: int,
        fpn_type: str = "audio_dual",
        num_encoder_layers: int = 6,
        mask_dim: int = 8,
        stride4_dim: int = 64,
        num_groups: int = 32,
        dual_stride: int = 32,
        early_fusion_form: str = "product",
        audio_similarity_dim: int = 0,
        similarity_to_masks: bool = False,
        dual_form: str = "gate",
        dual_pool_size: int = 3,
    ) -> None:
        super().__init__()
        options = {
            "fpn_type": fpn_type,
            "dual_form": dual_form,
            "early_fusion_form": early_fusion_form,
            "dual_stride": dual_stride,
            "num_levels": spec.num_levels,
            "audio_similarity_dim": audio_similarity_dim,
            "similarity_to_masks": similarity_to_masks,
        }
        raise_first(self.check_options(options))
        dim, num_heads, ffn_dim, dropout = spec.dim, spec.num_heads, spec.ffn_dim, spec.dropout
        self.dual_level = DUAL_STRIDES[dual_stride]
        # read by QDFormer: add the similarity map to every query's mask logits (an audio gate on the masks)
        self.similarity_to_masks = similarity_to_masks
        self.fpn_type = fpn_type
        self.dim = dim
        # channels the mask head receives: mask_dim, plus the audio-visual similarity map when on
        self.mask_dim = mask_dim + (1 if audio_similarity_dim else 0)
        self.early_fusion = (
            GatedCrossAttention(dim=dim, num_heads=num_heads, dropout=0.0, form=early_fusion_form)
            if fpn_type != "none"
            else None
        )
        self.encoder = DeformableEncoder(num_layers=num_encoder_layers, spec=spec)
        self.dual_form = dual_form
        if fpn_type != "audio_dual":
            self.dual = None
        elif dual_form == "r2vos":
            self.dual = R2VOSDualBlock(
                dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, pool_size=dual_pool_size
            )
        else:
            self.dual = DualCrossModalBlock(
                dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout, num_groups=num_groups
            )
        # top-down FPN: stride 32 -> 16 -> 8 at width C, then stride 4 at the narrower stride4_dim
        self.out16 = _conv_gn_relu(dim, dim, num_groups)
        self.out8 = _conv_gn_relu(dim, dim, num_groups)
        self.reduce8 = nn.Conv2d(dim, stride4_dim, kernel_size=1)  # applied before upsampling (cheaper, same result)
        self.lateral4 = nn.Conv2d(res2_channels, stride4_dim, kernel_size=1)
        self.out4 = _conv_gn_relu(stride4_dim, stride4_dim, num_groups)
        self.mask_proj = nn.Conv2d(stride4_dim, mask_dim, kernel_size=1)
        # optional audio-visual similarity map (sound-source-localisation style; not in the paper):
        # cosine similarity of each stride-4 pixel embedding with each audio token, max over tokens,
        # times a learnt temperature, appended to the mask features as one more channel
        self.similarity = (
            AudioVisualSimilarity(dim=dim, visual_dim=stride4_dim, embed_dim=audio_similarity_dim)
            if audio_similarity_dim
            else None
        )

    def forward(
        self,
        levels: Sequence[torch.Tensor],
        res2: torch.Tensor,
        audio: torch.Tensor,
        *,
        num_frames: int = 1,
        frame_valid: torch.Tensor | None = None,
    ) -> dict:
        """``num_frames`` (T) and ``frame_valid [B, T]`` are read by the clip-level ``r2vos`` dual
        block only (frames are clip-major: ``N = B * T``)."""
        audio_in = audio
        src, spatial_shapes, level_start_index = flatten_levels(levels)
        pos = self.encoder.positions(levels)
        if self.early_fusion is not None:
            src = self.early_fusion(src, audio, query_pos=pos)
        memory = self.encoder(src, pos, levels, spatial_shapes, level_start_index)

        # back to maps (stride 8, 16, 32; the stride-64 level serves the decoder only)
        maps = []
        for (h, w), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
            maps.append(rearrange(memory[:, start : start + h * w], "n (h w) c -> n c h w", h=h, w=w))
        if isinstance(self.dual, R2VOSDualBlock):
            maps[self.dual_level], audio = self.dual(
                maps[self.dual_level], audio, num_frames=num_frames, frame_valid=frame_valid
            )
        elif self.dual is not None:
            maps[self.dual_level], audio = self.dual(maps[self.dual_level], audio)
        top = maps[2]
        y16 = self.out16(maps[1] + F.interpolate(top, size=maps[1].shape[-2:], mode="nearest"))
        y8 = self.out8(maps[0] + F.interpolate(y16, size=maps[0].shape[-2:], mode="nearest"))
        y4 = self.lateral4(res2) + F.interpolate(self.reduce8(y8), size=res2.shape[-2:], mode="nearest")
        stride4 = self.out4(y4)
        mask_features = self.mask_proj(stride4)
        similarity = None
        if self.similarity is not None:
            similarity = self.similarity(stride4, audio_in)
            mask_features = torch.cat((mask_features, similarity), dim=1)
        return {
            "similarity": similarity,
            "memory": memory,
            "memory_pos": pos,
            "spatial_shapes": spatial_shapes,
            "level_start_index": level_start_index,
            "mask_features": mask_features,
            "audio": audio,
        }
