"""Audio perturbations for evaluation: does the model listen, and how well under noise?

Three perturbations (``python -m avseg.eval perturb=...``, docs/EVALUATION.md):

- ``mute``: the audio is replaced by silence. For log-mel audio that is the log-mel of an all-zero
  waveform (``log(0 + 0.01)`` in every bin, from `avseg.data.audio.log_mel_examples` and
  `fit_examples`, exactly what a silent WAV would give); for precomputed embeddings, zeros.
  Padded frames (``frame_valid`` false) stay zero, as the loaders leave them.
- ``swap``: every clip gets the audio of another clip of the same length (same T and the same
  ``frame_valid`` pattern), by a seeded derangement within each length group: no clip keeps its own
  audio. A length group with a single clip has no partner and raises.
- ``noise``: white Gaussian noise added to the WAVEFORM, before the log-mel, at ``snr_db`` relative
  to the clip's own mean power (``mean(wav**2)``), through the loaders' ``audio_transform(wav,
  sample_rate, index)`` hook; the noise of clip ``index`` is drawn from a generator seeded by
  ``(seed, index)``, so a run is reproducible whatever the batch order or the worker. WAV audio
  only: precomputed log-mels / embeddings have no waveform to add noise to (`ConfigError`).

Everything here is plain torch / numpy (no Lightning), so it can be tested on hand-made tensors.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from avseg.data.audio import VGGISH_SAMPLE_RATE, fit_examples, log_mel_examples
from avseg.errors import ConfigError, DataError

__all__ = [
    "PERTURBATIONS",
    "WhiteNoise",
    "derangement",
    "silent_log_mel",
    "mute_audio",
    "clip_signature",
    "PerturbedDataset",
    "check_perturbation",
]

PERTURBATIONS: tuple[str, ...] = ("none", "mute", "swap", "noise")
LOG_MEL_TAIL: tuple[int, int, int] = (1, 96, 64)


def check_perturbation(perturb: str, *, audio_source: str, snr_db: float | None = None) -> None:
    """Validate a perturbation request before any data is read; raises `ConfigError`."""
    if perturb not in PERTURBATIONS:
        raise ConfigError(f"perturb={perturb!r}: allowed values are {' | '.join(PERTURBATIONS)}")
    if perturb == "noise":
        if audio_source != "wav":
            raise ConfigError(
                f"perturb=noise adds white noise to the waveform and needs data.audio_source=wav; "
                f"got data.audio_source={audio_source!r} "
                f"({'precomputed log-mel pickles' if audio_source == 'pkl' else 'precomputed embeddings'} "
                "have no waveform). Evaluate with WAV audio, or use perturb=mute|swap"
            )
        if (
            snr_db is None
            or isinstance(snr_db, bool)
            or not isinstance(snr_db, (int, float))
            or not math.isfinite(snr_db)
        ):
            raise ConfigError(f"perturb_snr_db={snr_db!r}: a finite number (dB) is required for perturb=noise")


# ---------------------------------------------------------------------------------------------
# noise


class WhiteNoise:
    """``audio_transform`` adding white Gaussian noise at ``snr_db`` to a mono waveform.

    ``__call__(wav [n] float32, sample_rate, index) -> wav + noise`` with noise power
    ``mean(wav**2) / 10**(snr_db / 10)``; a silent clip (power 0) is returned unchanged (there is no
    signal power to be relative to). The noise depends only on ``(seed, index, n)``. A plain class
    (not a closure) so that DataLoader workers can pickle it.
    """

    def __init__(self, *, snr_db: float, seed: int = 0) -> None:
        if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float)) or not math.isfinite(float(snr_db)):
            raise ConfigError(f"perturb_snr_db={snr_db!r}: a finite number (dB) is required")
        self.snr_db = float(snr_db)
        self.seed = int(seed)

    def noise(self, num_samples: int, index: int) -> np.ndarray:
        """Unit-variance noise float64 [num_samples] of clip ``index``."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(index)])
        return rng.standard_normal(num_samples)

    def __call__(self, wav: np.ndarray, sample_rate: int, index: int) -> np.ndarray:
        wav = np.asarray(wav)
        if wav.ndim != 1:
            raise ValueError(f"WhiteNoise expects a mono waveform [n], got shape {wav.shape}")
        signal = wav.astype(np.float64)
        power = float(np.mean(signal**2)) if signal.size else 0.0
        if power == 0.0:
            return wav.astype(np.float32, copy=True)
        noise_power = power / (10.0 ** (self.snr_db / 10.0))
        noisy = signal + math.sqrt(noise_power) * self.noise(signal.shape[0], index)
        return noisy.astype(np.float32)

    def __repr__(self) -> str:
        return f"WhiteNoise(snr_db={self.snr_db}, seed={self.seed})"


# ---------------------------------------------------------------------------------------------
# mute


def silent_log_mel(num_frames: int, fit_mode: str = "repeat_last") -> torch.Tensor:
    """The VGGish log-mel of ``num_frames`` seconds of an all-zero 16 kHz waveform:
    float32 [num_frames, 1, 96, 64] (every bin ``log(0.01)``)."""
    silence = np.zeros(int(num_frames) * VGGISH_SAMPLE_RATE, dtype=np.float32)
    return fit_examples(log_mel_examples(silence, VGGISH_SAMPLE_RATE), int(num_frames), fit_mode)  # type: ignore[arg-type]


def mute_audio(
    audio: torch.Tensor, frame_valid: torch.Tensor | None = None, *, fit_mode: str = "repeat_last"
) -> torch.Tensor:
    """Silence in place of ``audio`` (a clip [T, ...] or a batch [B, T, ...]).

    Log-mel ``[..., T, 1, 96, 64]``: the log-mel of a zero waveform on real frames; embeddings
    ``[..., T, 128]``: zeros. Frames with ``frame_valid`` false are zero either way.
    """
    is_log_mel = audio.ndim >= 4 and tuple(audio.shape[-3:]) == LOG_MEL_TAIL
    if not is_log_mel and audio.ndim not in (2, 3):
        raise ValueError(
            "mute_audio: expected [T,1,96,64] / [B,T,1,96,64] log-mel or [T,128] / [B,T,128] embeddings, got "
            f"{tuple(audio.shape)}"
        )
    if not is_log_mel:
        return torch.zeros_like(audio)
    time_dim = audio.ndim - 4
    num_frames = audio.shape[time_dim]
    silence = silent_log_mel(num_frames, fit_mode).to(dtype=audio.dtype, device=audio.device)
    muted = silence.expand_as(audio).clone()
    if frame_valid is not None:
        valid = frame_valid.to(device=audio.device, dtype=torch.bool)
        if tuple(valid.shape) != tuple(audio.shape[: time_dim + 1]):
            raise ValueError(f"mute_audio: frame_valid {tuple(valid.shape)} does not fit audio {tuple(audio.shape)}")
        muted = muted * valid[..., None, None, None].to(audio.dtype)
    return muted


# ---------------------------------------------------------------------------------------------
# swap


def derangement(groups: Sequence[Hashable], *, seed: int = 0, names: Sequence[str] | None = None) -> list[int]:
    """A seeded permutation ``p`` with ``p[i] != i`` and ``groups[p[i]] == groups[i]`` for every i.

    Each group's members are shuffled (seeded) and each takes the next member's position in that
    shuffled cycle, so the result is a derangement inside every group. A group with a single member
    raises ValueError naming it (and the clip, when ``names`` are given).
    """
    members: dict[Hashable, list[int]] = {}
    for position, key in enumerate(groups):
        members.setdefault(key, []).append(position)
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFF)
    permutation = list(range(len(groups)))
    for key, positions in members.items():
        if len(positions) == 1:
            who = f"clip {names[positions[0]]!r}" if names is not None else f"item {positions[0]}"
            raise ValueError(
                f"{who} is the only clip of its length group {key!r}: it has no other clip to take audio from"
            )
        cycle = [positions[i] for i in rng.permutation(len(positions))]
        for here, partner in zip(cycle, cycle[1:] + cycle[:1]):
            permutation[here] = partner
    return permutation


def clip_signature(dataset: Any, index: int) -> tuple[int, int]:
    """(T, number of real frames) of clip ``index``, without decoding it when the dataset keeps
    records (the AVSBench loaders); otherwise from the item's ``frame_valid``. Real frames come
    first in every AVSBench clip, so this pair is the ``frame_valid`` pattern."""
    records = getattr(dataset, "records", None)
    num_frames = getattr(dataset, "num_frames", None)
    if records is not None and num_frames is not None:
        return int(num_frames), len(records[index].frame_paths)
    frame_valid = dataset[index]["frame_valid"]
    pattern = frame_valid.to(torch.bool)
    num_real = int(pattern.sum())
    if not bool(pattern[:num_real].all()):
        raise ValueError(f"clip {index}: frame_valid {pattern.tolist()} has a padded frame before a real one")
    return int(pattern.shape[0]), num_real


class PerturbedDataset(Dataset):
    """Wraps an evaluation dataset and perturbs each item's ``audio`` (``mute`` or ``swap``).

    ``noise`` is not done here: it acts on the waveform, through the dataset's ``audio_transform``
    (pass a `WhiteNoise` when building the dataset). Items are otherwise unchanged (frames, masks,
    ``video_id``, ``index``), so metrics and saved masks are those of the clip itself.

    ``swap``: item i carries the audio of item ``partner[i]`` (`derangement` over `clip_signature`
    groups, seeded); the partner's audio is that clip's own, already with padded frames zeroed.
    """

    def __init__(self, dataset: Dataset, *, mode: str, seed: int = 0, fit_mode: str | None = None) -> None:
        if mode not in ("mute", "swap"):
            raise ConfigError(
                f"PerturbedDataset mode={mode!r}: allowed values are mute | swap (noise goes through audio_transform)"
            )
        self.dataset = dataset
        self.mode = mode
        self.seed = int(seed)
        self.fit_mode = fit_mode or getattr(dataset, "log_mel_fit", "repeat_last")
        self.partner: list[int] | None = None
        if mode == "swap":
            size = len(dataset)  # type: ignore[arg-type]
            signatures = [clip_signature(dataset, i) for i in range(size)]
            names = [str(v) for v in getattr(dataset, "video_ids", [])] or None
            try:
                self.partner = derangement(signatures, seed=self.seed, names=names)
            except ValueError as error:
                where = getattr(dataset, "root", "evaluation dataset")
                raise DataError(where, f"perturb=swap: {error} (T, real frames)") from error

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # records, root, video_ids, num_frames, ... of the wrapped dataset (mask writers use them)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        item = dict(self.dataset[index])
        if self.mode == "mute":
            item["audio"] = mute_audio(item["audio"], item.get("frame_valid"), fit_mode=self.fit_mode)
        else:
            assert self.partner is not None
            partner_item = self.dataset[self.partner[index]]
            if partner_item["audio"].shape != item["audio"].shape:
                raise DataError(
                    getattr(self.dataset, "root", "evaluation dataset"),
                    f"perturb=swap: clip {index} audio {tuple(item['audio'].shape)} and its partner "
                    f"{self.partner[index]} audio {tuple(partner_item['audio'].shape)} differ in shape",
                )
            item["audio"] = partner_item["audio"]
        return item

    def __repr__(self) -> str:
        return f"PerturbedDataset(mode={self.mode!r}, seed={self.seed}, dataset={self.dataset!r})"
