"""QDFormer: backbone + audio encoder + decomposition + audio-visual fusion/encoder + decoder."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from avseg.models.backbone import VisualBackbone
from avseg.models.decoder import SemanticGuidedDecoder
from avseg.models.fusion import AudioVisualFusion
from avseg.models.neck import MultiLevelProjection


class QDFormer(nn.Module):
    """The whole network. Built by ``avseg.models.build.build_qdformer`` from the ``model`` config.

    ``forward(frames [B, T, 3, H, W], audio [B, T, 1, 96, 64] or [B, T, 128], frame_valid [B, T]
    bool | None) -> dict``:

    - ``pred_masks`` [B, T, Nq, H/4, W/4] mask logits, ``pred_logits`` [B, T, Nq, num_classes]
      class logits (sigmoid, no background), ``pred_boxes`` [B, T, Nq, 4] (cxcywh in [0, 1]);
    - ``aux_outputs``: one dict with those three keys per earlier decoder layer (first to last);
    - ``quant``: the decomposition dict (``global_codes``, ``local_codes``, ``vq_loss``,
      ``distill_loss``, ``perplexity``, ``usage``, ``dead_codes``, indices);
    - ``pred_similarity`` [B, T, 1, H/4, W/4], only with ``model.fusion.audio_similarity_dim`` on: the
      audio-visual similarity map (a per-pixel "sounding" logit; ``model.loss.weight_similarity``);
    - ``pred_sources`` [B, T, K, num_classes + 1], only with a ``source_head`` (built when
      ``model.loss.weight_source`` > 0): each sub-space code's class-or-"none" logits.

    All B*T frames go through the backbone, fusion, encoder and decoder as one batch; the
    decomposition and (with ``model.fusion.dual_form: r2vos``) the dual block see the clip (where
    frames interact), and padded frames (``frame_valid`` false) are excluded from them and from
    the audio tokens, and get no audio: their codes are zero.
    """

    def __init__(
        self,
        *,
        backbone: VisualBackbone,
        audio_encoder: nn.Module,
        decomposition: nn.Module,
        neck: MultiLevelProjection,
        fusion: AudioVisualFusion,
        decoder: SemanticGuidedDecoder,
        num_classes: int,
        aux_loss: bool = True,
        source_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.audio_encoder = audio_encoder
        self.decomposition = decomposition
        self.neck = neck
        self.fusion = fusion
        self.decoder = decoder
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.source_head = source_head

    def forward(self, frames: torch.Tensor, audio: torch.Tensor, frame_valid: torch.Tensor | None = None) -> dict:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"QDFormer expects frames [B, T, 3, H, W], got {tuple(frames.shape)}")
        batch, length = frames.shape[:2]
        if frame_valid is not None:
            frame_valid = frame_valid.to(device=frames.device, dtype=torch.bool)

        features = self.backbone(rearrange(frames, "b t c h w -> (b t) c h w"))
        audio_tokens = self.audio_encoder(audio, frame_valid)  # [B, T, C]
        quant = self.decomposition(audio_tokens, frame_valid)
        codes = rearrange(quant["local_codes"], "b t k c -> (b t) k c")
        if frame_valid is not None:  # a padded frame hears nothing: zero codes, not its clip's global codes
            codes = codes * rearrange(frame_valid, "b t -> (b t) 1 1").to(codes.dtype)

        levels = self.neck(features[1:])
        fused = self.fusion(levels, features[0], codes, num_frames=length, frame_valid=frame_valid)
        decoded = self.decoder(
            codes, fused["memory"], fused["spatial_shapes"], fused["level_start_index"], fused["mask_features"]
        )
        if self.fusion.similarity_to_masks:
            # mask logit = the query's own + the pixel's audio-visual similarity (both log-odds): a
            # pixel is foreground only where the query's shape and the sound agree (not in the paper)
            decoded["masks"] = decoded["masks"] + fused["similarity"].unsqueeze(0)  # [L, N, Q, h, w] + [1, N, 1, h, w]

        def frame_major(x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, "(b t) ... -> b t ...", b=batch, t=length)

        per_layer = [
            {
                "pred_logits": frame_major(decoded["logits"][i]),
                "pred_boxes": frame_major(decoded["boxes"][i]),
                "pred_masks": frame_major(decoded["masks"][i]),
            }
            for i in range(decoded["logits"].shape[0])
        ]
        out = dict(per_layer[-1])
        out["aux_outputs"] = per_layer[:-1] if self.aux_loss else []
        out["quant"] = quant
        if self.source_head is not None:
            out["pred_sources"] = self.source_head(quant["local_codes"])  # [B, T, K, num_classes + 1]
        if fused["similarity"] is not None:
            out["pred_similarity"] = frame_major(fused["similarity"])  # [B, T, 1, H/4, W/4]
        return out
