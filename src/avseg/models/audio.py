"""Audio side of QDFormer: the VGGish network, a small trainable log-mel CNN, and the audio encoder
giving F_a [B, T, C]."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from avseg.errors import CheckpointError, ConfigError
from avseg.models.layers.position import sine_position_1d
from avseg.models.options import Problem, boolean, choice, is_int, present, raise_first

VGGISH_EMBEDDING_DIM = 128
_VGGISH_FEATURE_PLAN: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")
_PCA_QUANTIZE_MIN = -2.0
_PCA_QUANTIZE_MAX = 2.0


def _vggish_features() -> nn.Sequential:
    """conv3x3+ReLU / max-pool stack; module indices match torchvggish's `features.N.*` keys."""
    layers: list[nn.Module] = []
    in_channels = 1
    for step in _VGGISH_FEATURE_PLAN:
        if step == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(step), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(step)
    return nn.Sequential(*layers)


def _load_weights_file(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(path, f"cannot load with weights_only=True: {err}") from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(path, f"expected a state dict of tensors, got {type(loaded).__name__}")
    return loaded


class VGGish(nn.Module):
    """torchvggish's `VGG` network: log-mel examples [N, 1, 96, 64] -> embeddings [N, 128].

    State-dict keys are exactly torchvggish's (`features.{0,3,6,8,11,13}.*`,
    `embeddings.{0,2,4}.*`). The optional PCA + 8-bit quantisation postprocessing (AudioSet's
    released embeddings) is off by default; its parameters are buffers outside the state dict,
    loaded with `load_pca_params`. ``channels_last`` runs the convolutions in NHWC memory format
    (the same numbers; about 15% less CPU time, docs/BENCHMARKS.md); loading a state dict copies
    into those tensors and keeps the format.
    """

    def __init__(self, *, postprocess: bool = False, channels_last: bool = True):
        super().__init__()
        self.features = _vggish_features()
        self.channels_last = channels_last
        if channels_last:
            self.features.to(memory_format=torch.channels_last)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, VGGISH_EMBEDDING_DIM),
            nn.ReLU(inplace=True),
        )
        self.postprocess = postprocess
        self.register_buffer("pca_eigen_vectors", torch.empty(0), persistent=False)
        self.register_buffer("pca_means", torch.empty(0), persistent=False)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """[N, 1, 96, 64] -> [N, 128] (PCA-quantised values in 0..255 when `postprocess`)."""
        if examples.ndim != 4 or tuple(examples.shape[1:]) != (1, 96, 64):
            raise ValueError(f"VGGish expects [N, 1, 96, 64], got {tuple(examples.shape)}")
        if self.channels_last:
            examples = examples.contiguous(memory_format=torch.channels_last)
        feature_map = self.features(examples)  # [N, 512, 6, 4]
        # torchvggish flattens channels-last ([N, 6, 4, 512]) to match the TF weights.
        embedding = self.embeddings(rearrange(feature_map, "n c h w -> n (h w c)"))
        if self.postprocess:
            embedding = self.apply_pca(embedding)
        return embedding

    def apply_pca(self, embedding: torch.Tensor) -> torch.Tensor:
        """AudioSet postprocessing: PCA (with whitening), clip to [-2, 2], quantise to 0..255."""
        if self.pca_eigen_vectors.numel() == 0:
            raise RuntimeError("VGGish postprocess is on but no PCA parameters were loaded")
        projected = (embedding - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = projected.clamp(_PCA_QUANTIZE_MIN, _PCA_QUANTIZE_MAX)
        scale = 255.0 / (_PCA_QUANTIZE_MAX - _PCA_QUANTIZE_MIN)
        return torch.round((clipped - _PCA_QUANTIZE_MIN) * scale)

    def load_pca_params(self, path: str | os.PathLike) -> None:
        """Load torchvggish's PCA file (keys `pca_eigen_vectors` [128, 128], `pca_means` [128])."""
        params = _load_weights_file(path)
        missing = sorted({"pca_eigen_vectors", "pca_means"} - set(params))
        if missing:
            raise CheckpointError(path, f"missing PCA keys {missing}")
        vectors = torch.as_tensor(params["pca_eigen_vectors"], dtype=torch.float32)
        means = torch.as_tensor(params["pca_means"], dtype=torch.float32).reshape(-1)
        dim = VGGISH_EMBEDDING_DIM
        if tuple(vectors.shape) != (dim, dim) or tuple(means.shape) != (dim,):
            raise CheckpointError(
                path,
                f"bad PCA shapes {tuple(vectors.shape)} / {tuple(means.shape)}, expected ({dim}, {dim}) / ({dim},)",
            )
        device = self.features[0].weight.device
        self.pca_eigen_vectors = vectors.to(device)
        self.pca_means = means.to(device)

    @classmethod
    def from_state_dict_file(
        cls,
        path: str | os.PathLike,
        *,
        postprocess: bool = False,
        pca_params: str | os.PathLike | None = None,
        channels_last: bool = True,
    ) -> VGGish:
        """Build a VGGish and load a torchvggish-format state dict (e.g. `vggish-10086976.pth`).

        Loaded with `weights_only=True`, strictly: missing, unexpected or mis-shaped keys raise
        CheckpointError naming the file and listing them.
        """
        if postprocess and pca_params is None:
            raise ConfigError("VGGish: postprocess=True needs pca_params (path to the PCA file)")
        state = _load_weights_file(path)  # first: a bad path fails before a 72M-parameter build
        model = cls(postprocess=postprocess, channels_last=channels_last)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
            for key in set(state) & set(expected)
            if state[key].shape != expected[key].shape
        )
        if missing or unexpected or mis_shaped:
            raise CheckpointError(
                path,
                f"not a torchvggish VGG state dict: missing keys {missing}, unexpected keys "
                f"{unexpected}, shape mismatches {mis_shaped}",
            )
        model.load_state_dict(state, strict=True)
        if pca_params is not None:
            model.load_pca_params(pca_params)
        return model


AUDIO_INPUTS = ("log_mel", "embeddings")
LOG_MEL_NETWORKS = ("vggish", "log_mel_cnn")
LOG_MEL_CNN_CHANNELS = (16, 32, 64, 128)  # the default width of the four conv blocks


BAND_COUNTS = (4, 8, 16)
_BAND_TOKENS_ALLOWED = "false | true | 4 | 8 | 16"


def band_count(band_tokens: bool | int) -> int:
    """``audio_encoder.band_tokens`` -> number of band tokens per second (0 = one token per second):
    false -> 0, true -> 4 (the CNN's final map), or 4 / 8 / 16 (the last blocks then pool over time
    only, so each band spans 16 / 8 / 4 of the 64 mel bins)."""
    if band_tokens is False or band_tokens is None:
        return 0
    if band_tokens is True:
        return 4
    if isinstance(band_tokens, int) and band_tokens in BAND_COUNTS:
        return int(band_tokens)
    raise ConfigError(f"audio_encoder.band_tokens: got {band_tokens!r}; allowed: {_BAND_TOKENS_ALLOWED}")


class LogMelCNN(nn.Module):
    """A small log-mel CNN trained from scratch: examples [N, 1, 96, 64] -> embeddings [N, 128]
    (with ``band_tokens``: [N, 4, 128], one per frequency band of the final map).

    For CPU / synthetic runs, where a frozen random-init VGGish (72 M parameters) gives poor,
    nearly input-independent features: BatchNorm on the input log-mel, then four blocks of
    conv3x3 + BatchNorm + ReLU + 2x2 max-pool (channels `channels`), so [96 time, 64 mel] becomes
    [6, 4]; the map is pooled over time (mean and max, concatenated) keeping the 4 frequency
    bands (pitch is a sound's identity), flattened, projected by a Linear to 128 (the VGGish
    width, so the rest of the encoder is the same for both networks) and batch-normalised (so the
    embeddings of different sounds differ by more than a small perturbation of a shared vector).
    """

    def __init__(self, *, channels: tuple[int, ...] = LOG_MEL_CNN_CHANNELS, band_tokens: bool | int = False):
        super().__init__()
        bands = band_count(band_tokens)
        self.band_tokens = bands > 0
        if len(channels) != 4 or any(int(c) < 1 for c in channels):
            raise ConfigError(f"LogMelCNN channels: got {channels!r}; allowed: four positive integers")
        self.input_norm = nn.BatchNorm2d(1)
        blocks: list[nn.Module] = []
        in_channels = 1
        # 8 or 16 band tokens: the last one or two blocks pool over time only (finer frequency)
        time_only = {8: 1, 16: 2}.get(bands, 0)
        for index, out_channels in enumerate(channels):
            pool = (2, 1) if index >= len(channels) - time_only else (2, 2)
            blocks += [
                nn.Conv2d(in_channels, int(out_channels), kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(int(out_channels)),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=pool, stride=pool),
            ]
            in_channels = int(out_channels)
        self.features = nn.Sequential(*blocks)
        frequency_bands = 64 // 2 ** (len(channels) - time_only)
        self.num_bands = frequency_bands
        # band_tokens: one embedding per frequency band (shared Linear), so that sounds of different
        # pitch that play in the same second land in different tokens; else one per second
        in_features = 2 * in_channels * (1 if self.band_tokens else frequency_bands)
        self.embedding = nn.Linear(in_features, VGGISH_EMBEDDING_DIM)
        # Without this the embeddings share a large common component (post-ReLU features are all
        # positive), and after Linear + LayerNorm the audio tokens of different clips differed by
        # 2.5 % of their power at init and 0.3 % after training (measured on the demo): the codes
        # then carried no audio. Standardising each channel over the batch keeps them apart.
        self.output_norm = nn.BatchNorm1d(VGGISH_EMBEDDING_DIM)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """[N, 1, 96, 64] -> [N, 128]."""
        if examples.ndim != 4 or tuple(examples.shape[1:]) != (1, 96, 64):
            raise ValueError(f"LogMelCNN expects [N, 1, 96, 64], got {tuple(examples.shape)}")
        feature_map = self.features(self.input_norm(examples))  # [N, C, 6 time, M mel bands]
        pooled = torch.cat([feature_map.mean(dim=2), feature_map.amax(dim=2)], dim=1)  # [N, 2C, M]
        if self.band_tokens:  # [N, M, 128]: one token per frequency band
            tokens = self.embedding(rearrange(pooled, "n c f -> (n f) c"))
            return rearrange(self.output_norm(tokens), "(n f) d -> n f d", n=examples.shape[0])
        return self.output_norm(self.embedding(rearrange(pooled, "n c f -> n (c f)")))


class AudioEncoder(nn.Module):
    """Audio tokens F_a [B, T, dim] from log-mel examples or precomputed VGGish embeddings.

    `input="log_mel"` with `network="vggish"` (default): VGGish (frozen by default) on
    [B, T, 1, 96, 64]; its weights come from `vggish_weights` (a torchvggish state dict), or
    random init only when `random_init=True`.
    `input="log_mel"` with `network="log_mel_cnn"`: the small `LogMelCNN`, trained from scratch
    with the model (needs `vggish_weights=None`, `random_init=True`, `freeze_vggish=False`; the
    CPU / SynthAVS setting).
    `input="embeddings"`: [B, T, 128] used as they are (`vggish_weights`, `network` not used).
    Then Linear(128 -> dim) + LayerNorm + dropout + a 1-D sine position code over T. Frames with
    `frame_valid` false are zeroed both before the projection (as the official AVSS code does to
    the audio features) and in the output.
    """

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.audio_encoder`` options ``options`` holds (absent ones are not checked)."""
        checks = {
            "input": choice(AUDIO_INPUTS),
            "network": choice(LOG_MEL_NETWORKS),
            "random_init": boolean,
            "band_tokens": lambda key, value: (
                None
                if value is None or isinstance(value, bool) or (is_int(value) and value in BAND_COUNTS)
                else Problem(key, value, _BAND_TOKENS_ALLOWED)
            ),
        }
        return present(options, checks, "model.audio_encoder.")

    def __init__(
        self,
        *,
        dim: int,
        input: Literal["log_mel", "embeddings"] = "log_mel",
        network: Literal["vggish", "log_mel_cnn"] = "vggish",
        vggish_weights: str | None = None,
        random_init: bool = False,
        freeze_vggish: bool = True,
        dropout: float = 0.1,
        band_tokens: bool | int = False,
        cnn_channels: Sequence[int] | None = None,
    ):
        super().__init__()
        options = {"input": input, "network": network, "random_init": random_init, "band_tokens": band_tokens}
        raise_first(self.check_options(options))
        if dim <= 0 or dim % 2:
            raise ConfigError(f"audio_encoder dim must be a positive even number (sine code), got {dim}")
        self.input = input
        self.freeze_vggish = freeze_vggish
        self.network = network
        if band_count(band_tokens) and (input != "log_mel" or network != "log_mel_cnn"):
            raise ConfigError(
                "audio_encoder.band_tokens=true needs input=log_mel and network=log_mel_cnn (VGGish and "
                "precomputed embeddings give one vector per second)"
            )
        if cnn_channels is not None and (input != "log_mel" or network != "log_mel_cnn"):
            raise ConfigError(
                "audio_encoder.cnn_channels sets the width of the log-mel CNN: it needs input=log_mel and "
                "network=log_mel_cnn (null otherwise)"
            )
        self.vggish: VGGish | None = None
        self.log_mel_cnn: LogMelCNN | None = None
        if input == "log_mel" and network == "log_mel_cnn":
            # Trained from scratch: a weights file, a "pretrained" claim or freezing would all be
            # meaningless, so they are errors rather than silently ignored.
            if vggish_weights is not None or not random_init or freeze_vggish:
                raise ConfigError(
                    "audio_encoder.network=log_mel_cnn is trained from scratch: it needs "
                    "vggish_weights=null, random_init=true and freeze_vggish=false (got "
                    f"vggish_weights={vggish_weights!r}, random_init={random_init}, "
                    f"freeze_vggish={freeze_vggish})"
                )
            widths = tuple(int(c) for c in cnn_channels) if cnn_channels is not None else LOG_MEL_CNN_CHANNELS
            self.log_mel_cnn = LogMelCNN(channels=widths, band_tokens=band_tokens)
        elif input == "log_mel":
            if random_init and vggish_weights is not None:
                raise ConfigError("audio_encoder: random_init=true and vggish_weights are both set; choose one")
            if random_init:
                self.vggish = VGGish()
            elif vggish_weights is None:
                raise ConfigError(
                    "audio_encoder.vggish_weights: a path to the torchvggish state dict "
                    "(vggish-10086976.pth) is required; set audio_encoder.random_init=true to "
                    "train from a random init instead"
                )
            else:
                self.vggish = VGGish.from_state_dict_file(vggish_weights)
            if freeze_vggish:
                self.vggish.requires_grad_(False)
                self.vggish.eval()
        self.band_tokens = band_count(band_tokens) > 0
        self.num_bands = self.log_mel_cnn.num_bands if self.band_tokens else 1
        # which band a token comes from (added like the time code; learnt)
        self.band_embed = nn.Parameter(torch.zeros(self.num_bands, dim)) if self.band_tokens else None
        if self.band_embed is not None:
            nn.init.normal_(self.band_embed, std=0.02)
        self.proj = nn.Linear(VGGISH_EMBEDDING_DIM, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dim = dim

    def train(self, mode: bool = True) -> AudioEncoder:
        super().train(mode)
        if self.vggish is not None and self.freeze_vggish:
            self.vggish.eval()  # a frozen VGGish stays in inference mode
        return self

    def embed(self, audio: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, T, 128] of `audio` ([B, T, 1, 96, 64], or [B, T, 128] as is).

        With `frame_valid`, the log-mel network runs on the valid frames only; padded frames get
        zeros.
        """
        if self.input == "embeddings":
            if audio.ndim != 3 or audio.shape[-1] != VGGISH_EMBEDDING_DIM:
                raise ValueError(f"AudioEncoder(input='embeddings') expects [B, T, 128], got {tuple(audio.shape)}")
            return audio
        if audio.ndim != 5:
            raise ValueError(f"AudioEncoder(input='log_mel') expects [B, T, 1, 96, 64], got {tuple(audio.shape)}")
        network = self.vggish if self.vggish is not None else self.log_mel_cnn
        if network is None:
            raise RuntimeError("AudioEncoder(input='log_mel') has no log-mel network")
        batch, length = audio.shape[:2]
        examples = rearrange(audio, "b t c h w -> (b t) c h w")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vggish):
            if frame_valid is None:
                embedding = network(examples)
            else:
                # Padded frames (e.g. AVSS v1 clips: 5 of 10) would be zeroed anyway: skip them.
                valid = rearrange(frame_valid, "b t -> (b t)").to(torch.bool)
                embedding = examples.new_zeros((batch * length, *self._embedding_shape()))
                if valid.any():
                    valid_embedding = network(examples[valid]).to(embedding.dtype)
                    embedding = embedding.index_put((valid,), valid_embedding)
        return rearrange(embedding, "(b t) ... -> b t ...", b=batch)

    def _embedding_shape(self) -> tuple[int, ...]:
        return (self.num_bands, VGGISH_EMBEDDING_DIM) if self.band_tokens else (VGGISH_EMBEDDING_DIM,)

    def forward(self, audio: torch.Tensor, frame_valid: torch.Tensor | None = None) -> torch.Tensor:
        """audio [B, T, 1, 96, 64] or [B, T, 128], frame_valid bool [B, T] -> F_a [B, T, dim]
        (with ``band_tokens``: [B, T, M, dim], M frequency-band tokens per second, each with the
        time code of its second plus a learnt band embedding)."""
        batch, length = audio.shape[:2]
        if frame_valid is not None and tuple(frame_valid.shape) != (batch, length):
            raise ValueError(f"frame_valid must be [B, T] = {(batch, length)}, got {tuple(frame_valid.shape)}")
        embedding = self.embed(audio, frame_valid).to(self.proj.weight.dtype)
        if frame_valid is not None:
            keep = frame_valid.to(embedding.dtype).reshape(batch, length, *([1] * (embedding.ndim - 2)))
            embedding = embedding * keep
        tokens = self.dropout(self.norm(self.proj(embedding)))
        position = sine_position_1d(length, self.dim, device=tokens.device, dtype=tokens.dtype)
        if self.band_embed is not None:
            tokens = tokens + position[None, :, None] + self.band_embed.to(tokens.dtype)
        else:
            tokens = tokens + position[None]
        if frame_valid is not None:
            tokens = tokens * keep
        return tokens
