"""R2VOS's dual cross-modal block, with audio tokens in the role of its text prompts.

R2VOS (``models/segmentation.py``: ``DualCrossModalFPNDecoder`` with ``DualVisionLanguageBlock``,
``--fpn_type dual``) works on the top FPN level of a clip:

1. clip-level visual self-attention over all ``T * h * w`` tokens of the clip (post-norm);
2. visual -> prompt cross-attention (visual queries read the prompts) and, computed from the same
   visual tokens, prompt -> visual cross-attention (prompt queries ``proj_q(prompts)`` read keys and
   values ``proj_kv(visual)``); each side then adds, normalises and runs its own FFN;
3. the updated prompts are average-pooled to ``pool_size`` tokens, each turned into a per-channel
   filter (``filter_proj``) that modulates a 1x1 conv + GN + ReLU of the visual map; the
   ``pool_size`` modulated maps are concatenated and fused by a 1x1 conv + GN + ReLU, added to the
   visual map, and the sum goes through the level's 3x3 conv + GN + ReLU.

Audio in place of text: the prompts are the K audio tokens of every frame of the clip (``T * K``
tokens, each carrying a sine code of its frame index where R2VOS's words carry their position),
and the pooling in step 3 is per frame over the frame's own K updated tokens, because audio,
unlike a sentence, changes from frame to frame. Padded frames (``frame_valid`` false) are masked
out as keys on both sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from avseg.models.layers.mlp import FeedForward
from avseg.models.layers.position import sine_position_1d, sine_position_2d


def _conv_gn_relu(in_ch: int, out_ch: int, kernel_size: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(num_groups, out_ch),
        nn.ReLU(inplace=True),
    )


class PromptDualAttention(nn.Module):
    """Steps 1-2 (R2VOS's ``DualVisionLanguageBlock``, post-norm).

    ``forward(visual [B, S, C], prompts [B, P, C], visual_pos [B or 1, S, C], prompt_pos [B or 1, P, C],
    visual_pad [B, S] bool | None, prompt_pad [B, P] bool | None)`` -> ``(visual, prompts)``.
    """

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.v2v_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.p2v_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.v2p_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.proj_prompt_q = nn.Linear(dim, dim)
        self.proj_visual_kv = nn.Linear(dim, 2 * dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.visual_ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout)
        self.prompt_norm1 = nn.LayerNorm(dim)
        self.prompt_norm2 = nn.LayerNorm(dim)
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_ffn = FeedForward(dim=dim, hidden_dim=ffn_dim, dropout=dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        visual: torch.Tensor,
        prompts: torch.Tensor,
        visual_pos: torch.Tensor,
        prompt_pos: torch.Tensor,
        visual_pad: torch.Tensor | None = None,
        prompt_pad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = visual + visual_pos
        attn, _ = self.v2v_attn(q, q, visual, key_padding_mask=visual_pad, need_weights=False)
        visual = self.norm1(visual + self.dropout1(attn))
        # both cross-attentions read the visual tokens after self-attention (as R2VOS)
        to_prompts, _ = self.p2v_attn(
            visual + visual_pos, prompts + prompt_pos, prompts, key_padding_mask=prompt_pad, need_weights=False
        )
        keys, values = self.proj_visual_kv(visual).chunk(2, dim=-1)
        to_visual, _ = self.v2p_attn(
            self.proj_prompt_q(prompts) + prompt_pos,
            keys + visual_pos,
            values,
            key_padding_mask=visual_pad,
            need_weights=False,
        )
        visual = self.norm2(visual + self.dropout2(to_prompts))
        visual = self.norm3(visual + self.visual_ffn(visual))
        prompts = self.prompt_norm1(prompts + self.prompt_dropout(to_visual))
        prompts = self.prompt_norm2(prompts + self.prompt_ffn(prompts))
        return visual, prompts


class R2VOSDualBlock(nn.Module):
    """Steps 1-3 on one FPN level of every clip (see the module docstring).

    ``forward(visual [B*T, C, h, w], audio [B*T, K, C], num_frames=T, frame_valid [B, T] bool | None)``
    -> ``(visual [B*T, C, h, w], audio [B*T, K, C])``.
    """

    def __init__(
        self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float, pool_size: int = 3, num_groups: int = 8
    ) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.attention = PromptDualAttention(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout)
        self.filter_proj = nn.Linear(dim, dim)
        self.dyn_conv = _conv_gn_relu(dim, dim, 1, num_groups)
        self.pool_conv = _conv_gn_relu(pool_size * dim, dim, 1, num_groups)
        self.out_conv = _conv_gn_relu(dim, dim, 3, num_groups)

    def forward(
        self,
        visual: torch.Tensor,
        audio: torch.Tensor,
        *,
        num_frames: int = 1,
        frame_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = visual.shape
        k = audio.shape[1]
        batch = n // num_frames
        if batch * num_frames != n:
            raise ValueError(f"R2VOSDualBlock: {n} frames do not split into clips of {num_frames}")
        tokens = rearrange(visual, "(b t) c h w -> b (t h w) c", t=num_frames)
        pos2d = rearrange(sine_position_2d(h, w, c, device=visual.device, dtype=visual.dtype), "c h w -> (h w) c")
        visual_pos = repeat(pos2d, "s c -> 1 (t s) c", t=num_frames)
        time = sine_position_1d(num_frames, c, device=visual.device, dtype=visual.dtype)  # [T, C]
        prompt_pos = repeat(time, "t c -> 1 (t k) c", k=k)
        prompts = rearrange(audio, "(b t) k c -> b (t k) c", t=num_frames)
        visual_pad = prompt_pad = None
        if frame_valid is not None:
            padded = ~frame_valid.to(device=visual.device, dtype=torch.bool)  # [B, T]
            if bool(padded.any()):
                visual_pad = repeat(padded, "b t -> b (t s)", s=h * w)
                prompt_pad = repeat(padded, "b t -> b (t k)", k=k)
        tokens, prompts = self.attention(tokens, prompts, visual_pos, prompt_pos, visual_pad, prompt_pad)
        fpn = rearrange(tokens, "b (t h w) c -> (b t) c h w", t=num_frames, h=h, w=w)
        audio = rearrange(prompts, "b (t k) c -> (b t) k c", t=num_frames)
        # per-frame dynamic filters from the frame's pooled audio tokens
        pooled = F.adaptive_avg_pool1d(rearrange(audio, "n k c -> n c k"), self.pool_size)  # [N, C, pool]
        filters = self.filter_proj(rearrange(pooled, "n c j -> n j c"))  # [N, pool, C]
        modulated = self.dyn_conv(fpn)[:, None] * filters[..., None, None]  # [N, pool, C, h, w]
        fused = self.pool_conv(rearrange(modulated, "n j c h w -> n (j c) h w"))
        return self.out_conv(fpn + fused), audio
