"""Product-quantised audio decomposition with global-to-local calibration (QDFormer, docs/METHOD.md 1.3-1.4).

Variants (config group ``model/decomposition``):

- ``pq``: K learnable prototype queries attend over the clip's T audio tokens (a small pre-norm
  transformer decoder: self-attention among the prototypes, cross-attention to the audio tokens
  with padded frames masked out, FFN), giving K clip-level sub-space features g_1..g_K, each
  quantised against ONE shared codebook of N codewords of width C.
- ``pq_split``: the textbook product quantiser: the clip's valid audio tokens are mean-pooled to
  one C-d vector, projected (Linear + LayerNorm), split into K chunks of C/K channels, each chunk
  quantised against one shared codebook of N codewords of width C/K, and each quantised chunk
  projected back to C (one shared Linear) to give K tokens.
- ``vq``: one global code: as ``pq`` with K = 1 whatever ``num_subspaces`` says.
- ``none``: the ``pq`` prototype features without a quantiser (ablation baseline): zero VQ and
  distillation losses, indices -1.

Readings of the prototype decoder (switches, default off = the reading measured before issue 13;
docs/MODEL.md "Decomposition readings"): ``prototype_role`` "content" (the prototypes are the
queries' starting content) or "position" (DETR style: content starts at zero, the prototypes are
added to the queries at every attention); ``competition`` "none" or "slots" (softmax over the K
prototypes for each audio token); ``subspace_values`` (one value / output projection per
sub-space in the cross-attention); ``distill_gate`` "none" or "attention" (the distillation pulls
l_{t,i} only in the seconds g_i's attention read, `avseg.models.layers.distill_gate`).

Local calibration (global-to-local): the SAME prototypes and decoder attend, for every frame t,
to the audio tokens of frames t-w..t+w (``local_window`` = w, invalid frames masked), giving
l_{t,1..K}; these are quantised with the same codebook, detached in this branch (the codebook is
learnt from the global branch only; the commitment term still pulls the local features), and a
distillation loss pulls each l_{t,i} toward sg(VQ(g_i)). For ``pq_split`` the local feature of
frame t is the split projection of the mean of its window's valid tokens. Padded frames
(``frame_valid`` false) take no part in the clip-level features, no part in the losses, and get
the clip's global codes as their local codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from avseg.models.layers.distill_gate import DISTILL_GATES, attention_gate
from avseg.models.layers.subspace_attention import COMPETITIONS, SubspaceCrossAttention
from avseg.models.options import Problem, at_least, below_one, boolean, choice, is_int, positive, present, raise_first
from avseg.models.quantizer import QuantizerOptions, VectorQuantizer

__all__ = [
    "AudioDecomposition",
    "PrototypeDecoder",
    "PrototypeDecoderLayer",
    "PrototypeLayerSpec",
    "frame_windows",
    "VARIANTS",
]

VARIANTS = ("pq", "pq_split", "vq", "none")
PROTOTYPE_ROLES = ("content", "position")
DISTILL_LOSSES = ("mse", "ce")
_KEY = "model.decomposition"


@dataclass(frozen=True)
class PrototypeLayerSpec:
    """The sizes and switches of a `PrototypeDecoderLayer`: width C, heads, FFN width, dropout, the
    K queries and the cross-attention readings (``competition``, ``subspace_values``)."""

    dim: int
    num_heads: int
    ffn_dim: int
    dropout: float
    num_queries: int
    competition: str
    subspace_values: bool

    def stack(self, num_layers: int) -> nn.ModuleList:
        """``num_layers`` layers ``PrototypeDecoderLayer(spec=self)``, built one after the other."""
        return nn.ModuleList(PrototypeDecoderLayer(spec=self) for _ in range(num_layers))


class PrototypeDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention among queries, cross-attention, FFN."""

    def __init__(self, *, spec: PrototypeLayerSpec) -> None:
        super().__init__()
        dim, dropout = spec.dim, spec.dropout
        self.self_attn = nn.MultiheadAttention(dim, spec.num_heads, dropout=dropout, batch_first=True)
        # the default keeps torch's attention (and its state-dict keys); the switches need the own block
        self.custom_cross = spec.competition != "none" or bool(spec.subspace_values)
        if self.custom_cross:
            self.cross_attn = SubspaceCrossAttention(
                dim=dim,
                num_heads=spec.num_heads,
                num_queries=spec.num_queries,
                competition=spec.competition,
                subspace_values=spec.subspace_values,
            )
        else:
            self.cross_attn = nn.MultiheadAttention(dim, spec.num_heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, spec.ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(spec.ffn_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        query_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries [N, K, C], memory [N, S, C], memory_padding_mask [N, S] (True = ignore),
        query_pos [N, K, C] | None (added to the queries and self-attention keys, DETR style).

        Returns the updated queries [N, K, C] and, with ``need_weights``, the head-averaged
        cross-attention weights [N, K, S].
        """
        q = self.norm_self(queries)
        qk = q if query_pos is None else q + query_pos
        queries = queries + self.dropout(self.self_attn(qk, qk, q, need_weights=False)[0])
        q = self.norm_cross(queries)
        qc = q if query_pos is None else q + query_pos
        if self.custom_cross:
            attended, weights = self.cross_attn(qc, memory, memory_padding_mask)
            weights = weights if need_weights else None
        else:
            attended, weights = self.cross_attn(
                qc, memory, memory, key_padding_mask=memory_padding_mask, need_weights=need_weights
            )
        queries = queries + self.dropout(attended)
        queries = queries + self.dropout(self.ffn(self.norm_ffn(queries)))
        return queries, weights


class PrototypeDecoder(nn.Module):
    """A stack of ``num_layers`` :class:`PrototypeDecoderLayer` of one ``spec`` and a final
    LayerNorm (unit-scale outputs)."""

    def __init__(self, *, num_layers: int, spec: PrototypeLayerSpec) -> None:
        super().__init__()
        self.layers = spec.stack(num_layers)
        self.norm = nn.LayerNorm(spec.dim)

    def forward(self, queries: torch.Tensor, *inputs: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries [N, K, C] through every layer, each given ``inputs`` and ``options`` as
        `PrototypeDecoderLayer.forward` takes them (memory [N, S, C], its padding mask,
        ``need_weights``, ``query_pos``) -> ([N, K, C], the last layer's weights [N, K, S] | None)."""
        weights = None
        for layer in self.layers:
            queries, weights = layer(queries, *inputs, **options)
        return self.norm(queries), weights


def frame_windows(tokens: torch.Tensor, frame_valid: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of frames t-radius..t+radius for every frame t.

    tokens [B, T, C], frame_valid [B, T] -> windows [B, T, 2*radius+1, C] and window_valid
    [B, T, 2*radius+1] (false outside the clip and at padded frames).
    """
    width = 2 * radius + 1
    padded = F.pad(tokens, (0, 0, radius, radius))  # [B, T + 2r, C]
    padded_valid = F.pad(frame_valid, (radius, radius), value=False)  # [B, T + 2r]
    windows = rearrange(padded.unfold(1, width, 1), "b t c w -> b t w c")
    window_valid = padded_valid.unfold(1, width, 1)  # [B, T, W]
    return windows, window_valid


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [...] where ``weights`` [...] is 1; 0 when no position is valid."""
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class AudioDecomposition(nn.Module):
    """Decompose a clip's audio tokens into K quantised sub-space codes (global and per frame).

    ``forward(audio_tokens [B, T, C], frame_valid [B, T] bool | None)`` returns a dict:

    - ``global_codes`` [B, K, C]: quantised clip-level codes (straight-through gradient),
    - ``local_codes`` [B, T, K, C]: quantised frame-level codes (the decoder's content queries);
      the global codes broadcast over T when local calibration is off, and at padded frames,
    - ``vq_loss`` scalar: the global quantiser loss (``vq_loss_form`` "vqvae": codebook + beta *
      commitment; "taming_legacy": commitment + beta * codebook) plus the local commitment term
      (weighted beta in "vqvae", 1 in "taming_legacy"; the local branch does not train the codebook),
    - ``distill_loss`` scalar: local-to-global distillation (0 without local calibration),
    - ``perplexity`` scalar, ``usage`` float [N] (global code counts this batch),
      ``dead_codes`` long scalar (codes whose usage EMA is below threshold),
    - ``global_indices`` long [B, K], ``local_indices`` long [B, T, K].

    K is ``self.num_tokens`` (``num_subspaces``, or 1 for ``vq``). Every variant accepts every key;
    the keys a variant does not use are ignored (so one Hydra sweep can cross variants).

    ``quantizer_options``: the codebook's recipe (`QuantizerOptions`), given to the quantiser of
    ``codebook_size`` codes (none for ``none``): `avseg.models.build.build_decomposition` makes it
    with `QuantizerOptions.from_config` from the config's codebook keys (``beta``, ``vq_loss_form``,
    ..., `avseg.models.quantizer.QUANTIZER_KEYS`), which `check_options` checks with the others.
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any], *, dim: int | None) -> list[Problem]:
        """The problems of the ``model.decomposition`` options ``options`` holds (absent ones are
        not checked); ``dim``: the model width C (None: not known, the checks on it are skipped)."""
        variant, k = options.get("variant"), options.get("num_subspaces")
        problems = present(
            options,
            {"variant": choice(VARIANTS), "num_subspaces": at_least(1)},
            f"{_KEY}.",
        )
        variant_ok = "variant" not in options or variant in VARIANTS
        k_ok = is_int(k) and k >= 1
        num_tokens = 1 if variant == "vq" else k
        codebook = options.get("codebook_size")
        if "codebook_size" in options and (not is_int(codebook) or codebook < 1):
            allowed = f"an integer >= num_subspaces (K = {num_tokens if k_ok else '?'})"
            problems.append(Problem(f"{_KEY}.codebook_size", codebook, allowed))
        elif "codebook_size" in options and k_ok and codebook < num_tokens:
            allowed = f"an integer >= K = {num_tokens}, or a lower num_subspaces"
            reason = f"must be >= num_subspaces ({num_tokens})"
            problems.append(Problem(f"{_KEY}.codebook_size", codebook, allowed, reason=reason))
        dim_ok = is_int(dim) and dim >= 1
        if variant_ok and variant == "pq_split" and k_ok and dim_ok and dim % k != 0:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0]
            allowed = f"a divisor of model.dim={dim} for pq_split (dim is split into K equal chunks): {divisors}"
            problems.append(Problem(f"{_KEY}.num_subspaces", k, allowed))
        if variant_ok and variant != "pq_split":
            heads = options.get("num_heads")
            if "num_heads" in options and dim_ok and (not is_int(heads) or heads < 1 or dim % heads):
                problems.append(Problem(f"{_KEY}.num_heads", heads, f"a positive divisor of model.dim={dim}"))
            problems += present(options, {"num_layers": at_least(1)}, f"{_KEY}.")
        checks = {
            "distill_loss": choice(DISTILL_LOSSES),
            "local_window": at_least(0, note=" (frames each side of t)"),
            "distill_temperature": positive,
            "dropout": below_one,
            "prototype_init_std": positive,
            "local_calibration": boolean,
            "prototype_role": choice(PROTOTYPE_ROLES),
            "competition": choice(COMPETITIONS),
            "subspace_values": boolean,
            "distill_gate": choice(DISTILL_GATES),
        }
        problems += present(options, checks, f"{_KEY}.")
        gate = options.get("distill_gate", "none")
        if variant_ok and variant == "pq_split" and gate not in ("none", None) and gate in DISTILL_GATES:
            allowed = "none for pq_split (the attention gate reads the prototypes' attention; pq_split has none)"
            problems.append(Problem(f"{_KEY}.distill_gate", gate, allowed))
        quantizer = {name: value for name, value in options.items() if name not in ("codebook_size",)}
        return problems + VectorQuantizer.check_options(quantizer, prefix=f"{_KEY}.")

    def __init__(
        self,
        *,
        dim: int,
        variant: str = "pq",
        num_subspaces: int = 4,
        codebook_size: int = 512,
        quantizer_options: QuantizerOptions = QuantizerOptions(),
        local_calibration: bool = True,
        local_window: int = 1,
        distill_loss: str = "mse",
        distill_temperature: float = 0.1,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        prototype_init_std: float = 1.0,
        prototype_role: str = "content",
        competition: str = "none",
        subspace_values: bool = False,
        distill_gate: str = "none",
    ) -> None:
        super().__init__()
        options = {
            name: value
            for name, value in locals().items()
            if name not in ("self", "dim", "quantizer_options", "__class__")
        }
        if not is_int(dim) or dim < 1:
            raise Problem(f"{_KEY}.dim", dim, "an integer >= 1").error()
        raise_first(self.check_options(options, dim=dim))
        num_tokens = 1 if variant == "vq" else num_subspaces

        self.dim = dim
        self.variant = variant
        self.num_tokens = num_tokens
        self.codebook_size = codebook_size
        self.local_calibration = bool(local_calibration)
        self.local_window = local_window
        self.distill_loss_kind = distill_loss
        self.distill_temperature = float(distill_temperature)
        self.prototype_role = prototype_role
        self.distill_gate = distill_gate

        if variant == "pq_split":
            self.chunk_dim = dim // num_tokens
            self.split_in = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
            self.split_out = nn.Linear(self.chunk_dim, dim)
            self.prototypes = None
            self.decoder = None
            code_dim = self.chunk_dim
        else:
            # Learnable prototype queries, N(0, prototype_init_std^2). The pre-norm layers normalise
            # them before attending, so the scale does not change what they attend to; it sets how
            # much of the residual stream (and so of g_i) is the prototype itself rather than
            # audio. N(0, 1) lets the prototype dominate: each sub-space then maps to one fixed
            # code whatever the audio (measured on the demo, docs/MODEL.md "Codebook collapse").
            self.prototypes = nn.Parameter(torch.randn(num_tokens, dim) * prototype_init_std)
            spec = PrototypeLayerSpec(
                dim=dim,
                num_heads=num_heads,
                ffn_dim=ffn_dim if ffn_dim is not None else 4 * dim,
                dropout=dropout,
                num_queries=num_tokens,
                competition=competition,
                subspace_values=subspace_values,
            )
            self.decoder = PrototypeDecoder(num_layers=num_layers, spec=spec)
            code_dim = dim
        if variant == "none":
            self.quantizer = None
        else:
            self.quantizer = VectorQuantizer(num_codes=codebook_size, code_dim=code_dim, options=quantizer_options)

    # ------------------------------------------------------------------ encoders
    def _check_inputs(self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor | None) -> torch.Tensor:
        if audio_tokens.dim() not in (3, 4) or audio_tokens.shape[-1] != self.dim:
            raise ValueError(
                f"AudioDecomposition: audio_tokens must be [B, T, {self.dim}] or [B, T, M, {self.dim}], "
                f"got {tuple(audio_tokens.shape)}"
            )
        batch, frames = audio_tokens.shape[:2]
        if frame_valid is None:
            return torch.ones(batch, frames, dtype=torch.bool, device=audio_tokens.device)
        if frame_valid.shape != (batch, frames):
            raise ValueError(
                f"AudioDecomposition: frame_valid must be [{batch}, {frames}], got {tuple(frame_valid.shape)}"
            )
        frame_valid = frame_valid.to(torch.bool)
        has_frame = frame_valid.any(dim=1)
        if not bool(has_frame.all()):
            empty = torch.nonzero(~has_frame).flatten().tolist()
            raise ValueError(f"AudioDecomposition: clip(s) at batch position {empty} have no valid frame")
        return frame_valid

    def _prototype_features(
        self, memory: torch.Tensor, memory_valid: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prototypes attend over memory [N, S, C] (valid [N, S]) -> ([N, K, C], weights)."""
        prototypes = repeat(self.prototypes, "k c -> n k c", n=memory.shape[0]).to(memory.dtype)
        padding = ~memory_valid
        # A row with no valid key (a padded frame far from any real frame) would give NaN (also in
        # backward, through the softmax); let it attend everywhere, its output is replaced later.
        padding = padding & ~padding.all(dim=-1, keepdim=True)
        if self.prototype_role == "position":
            # DETR reading: the prototypes are query positions added at every attention; the
            # content starts at zero, so g_i holds only what the attention read from the audio
            return self.decoder(
                torch.zeros_like(prototypes), memory, padding, need_weights=need_weights, query_pos=prototypes
            )
        return self.decoder(prototypes, memory, padding, need_weights=need_weights)

    def _global_features(self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """[B, T, C] or [B, T, M, C] -> clip-level features [B, K, C] (pq_split: K chunks [B, K, C/K]).

        With M tokens per second (frequency bands) the prototypes attend over all T * M of them."""
        return self._global_pass(audio_tokens, frame_valid, need_weights=False)[0]

    def _global_pass(
        self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `_global_features`, plus (with ``need_weights``, not for pq_split) the last layer's
        head-averaged attention mass of each sub-space per second [B, K, T] (bands summed)."""
        per_second = audio_tokens.shape[2] if audio_tokens.dim() == 4 else 1
        tokens = audio_tokens.flatten(1, 2) if audio_tokens.dim() == 4 else audio_tokens  # [B, T*M, C]
        valid = frame_valid.repeat_interleave(per_second, dim=1)  # [B, T*M]
        if self.variant == "pq_split":
            return self._split_features(tokens, valid), None
        features, weights = self._prototype_features(tokens, valid, need_weights=need_weights)
        if weights is not None:
            weights = rearrange(weights, "b k (t m) -> b k t m", m=per_second).sum(-1)
        return features, weights

    def _local_features(self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """[B, T, C] or [B, T, M, C] -> frame-level features [B, T, K, C] (pq_split: [B, T, K, C/K])."""
        batch = audio_tokens.shape[0]
        per_second = audio_tokens.shape[2] if audio_tokens.dim() == 4 else 1
        flat = audio_tokens.flatten(2) if audio_tokens.dim() == 4 else audio_tokens  # [B, T, M*C]
        windows, window_valid = frame_windows(flat, frame_valid, self.local_window)  # [B, T, W, M*C]
        windows = rearrange(windows, "b t w (m c) -> b t (w m) c", m=per_second)
        window_valid = window_valid.repeat_interleave(per_second, dim=2)  # [B, T, W*M]
        if self.variant == "pq_split":
            return self._split_features(windows, window_valid)
        memory = rearrange(windows, "b t w c -> (b t) w c")
        memory_valid = rearrange(window_valid, "b t w -> (b t) w")
        features, _ = self._prototype_features(memory, memory_valid)
        return rearrange(features, "(b t) k c -> b t k c", b=batch)

    def _split_features(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """pq_split: the mean of the valid tokens [..., S, C] (valid [..., S]), projected and split
        into K chunks -> [..., K, C/K]."""
        weights = valid.to(tokens.dtype)[..., None]
        pooled = (tokens * weights).sum(-2) / weights.sum(-2).clamp_min(1.0)  # [..., C]
        return rearrange(self.split_in(pooled), "... (k d) -> ... k d", k=self.num_tokens)

    def _to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised features -> model-width tokens (pq_split projects each chunk back to C)."""
        return self.split_out(codes) if self.variant == "pq_split" else codes

    # ------------------------------------------------------------------ forward
    def forward(self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        frame_valid = self._check_inputs(audio_tokens, frame_valid)
        batch, frames = audio_tokens.shape[:2]
        k = self.num_tokens
        zero = audio_tokens.new_zeros((), dtype=torch.float32)

        gated = self.distill_gate != "none" and self.local_calibration and self.quantizer is not None
        global_features, frame_attention = self._global_pass(audio_tokens, frame_valid, need_weights=gated)
        local_features = self._local_features(audio_tokens, frame_valid) if self.local_calibration else None
        frame_mask = frame_valid[:, :, None]  # [B, T, 1]

        if self.quantizer is None:  # variant "none": unquantised prototype features
            global_q = None
            global_codes = global_features
            global_indices = torch.full((batch, k), -1, dtype=torch.long, device=audio_tokens.device)
            vq_loss = zero
        else:
            global_q = self.quantizer(global_features, update_stats=True)
            global_codes = self._to_tokens(global_q["quantized"])  # [B, K, C]
            global_indices = global_q["indices"]  # [B, K]
            vq_loss = global_q["loss"]
        broadcast_codes = repeat(global_codes, "b k c -> b t k c", t=frames)
        broadcast_indices = repeat(global_indices, "b k -> b t k", t=frames)

        if local_features is None:
            local_codes, local_indices, distill = broadcast_codes, broadcast_indices, zero
        elif global_q is None:
            local_codes = torch.where(frame_mask[..., None], local_features, broadcast_codes)
            local_indices, distill = broadcast_indices, zero
        else:
            local_valid = repeat(frame_valid, "b t -> b t k", k=k)
            local_q = self.quantizer(local_features, valid_mask=local_valid, detach_codebook=True, update_stats=False)
            vq_loss = vq_loss + local_q["loss"]  # the commitment term only: the codebook is detached
            local_codes = torch.where(frame_mask[..., None], self._to_tokens(local_q["quantized"]), broadcast_codes)
            local_indices = torch.where(frame_mask, local_q["indices"], broadcast_indices)
            if gated:  # distil only where the sub-space's own clip-level attention listened
                local_valid = local_valid & attention_gate(frame_attention, frame_valid)
            distill = self._distillation(local_features, local_q["distances"], global_q, local_valid)

        if global_q is None:
            perplexity, usage = zero, torch.zeros(self.codebook_size, device=audio_tokens.device)
            dead_codes = torch.zeros((), dtype=torch.long, device=audio_tokens.device)
        else:
            perplexity, usage, dead_codes = global_q["perplexity"], global_q["counts"], global_q["dead_codes"]
        return {
            "global_codes": global_codes,
            "local_codes": local_codes,
            "vq_loss": vq_loss,
            "distill_loss": distill,
            "perplexity": perplexity,
            "usage": usage,
            "dead_codes": dead_codes,
            "global_indices": global_indices,
            "local_indices": local_indices,
        }

    def _distillation(
        self,
        local_features: torch.Tensor,
        local_distances: torch.Tensor,
        global_q: dict[str, torch.Tensor],
        local_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Pull each local feature l_{t,i} toward sg(VQ(g_i)); mean over valid (b, t, i).

        mse: mean over channels of (l - sg(VQ(g)))^2. ce: cross-entropy of
        softmax(-||l - e_n||^2 / (D * tau)) over the (detached) codebook against the global code's
        index; dividing by the code width D makes tau independent of C (and of pq_split's C/K).
        """
        frames = local_features.shape[1]
        if self.distill_loss_kind == "mse":
            target = repeat(global_q["quantized"].detach(), "b k d -> b t k d", t=frames)
            per_token = (local_features.float() - target.float()).pow(2).mean(-1)  # [B, T, K]
        else:
            code_dim = local_features.shape[-1]
            logits = -local_distances / (code_dim * self.distill_temperature)  # [B, T, K, N]
            target_index = repeat(global_q["indices"], "b k -> b t k", t=frames)
            per_token = F.cross_entropy(
                rearrange(logits, "b t k n -> (b t k) n"), target_index.reshape(-1), reduction="none"
            ).reshape(target_index.shape)
        return _masked_mean(per_token, local_valid)

    @torch.no_grad()
    def attention_maps(self, audio_tokens: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Head-averaged last-layer cross-attention of each prototype over the clip's frames.

        audio_tokens [B, T, C] -> [B, K, T] (zero at padded frames), for inspecting which frames
        each sub-space listens to. Not defined for ``pq_split`` (it has no attention).
        """
        if self.decoder is None:
            raise ValueError(f"AudioDecomposition.attention_maps: variant {self.variant!r} has no prototype attention")
        frame_valid = self._check_inputs(audio_tokens, frame_valid)
        # band tokens: the attention of each frame summed over its bands
        return self._global_pass(audio_tokens, frame_valid, need_weights=True)[1]
