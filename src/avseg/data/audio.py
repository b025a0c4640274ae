"""WAV reading and the VGGish log-mel front end (docs/AVSBENCH.md section 4).

`log_mel_examples` reproduces torchvggish's `vggish_input.waveform_to_examples` /
`mel_features.log_mel_spectrogram`: 16 kHz mono, 25 ms periodic-Hann frames every 10 ms (no
centring, no padding), |rfft| with a 512-point FFT, the HTK-style VGGish mel matrix (64 bands,
125-7500 Hz, DC bin zeroed), log(mel + 0.01), then non-overlapping 96-frame examples with any
incomplete last example dropped. The one deliberate difference: non-16 kHz input is resampled with
torchaudio (torchvggish uses resampy).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch

from avseg.data.layout import FitMode  # the fit modes are a layout fact
from avseg.errors import DataError

VGGISH_SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms at 16 kHz
HOP_SAMPLES = 160  # 10 ms at 16 kHz
FFT_LENGTH = 512  # next power of two above the window
NUM_MEL_BANDS = 64
MEL_LOW_HZ = 125.0
MEL_HIGH_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s examples, non-overlapping


# ---------------------------------------------------------------------------------------------
# WAV reading


def _wav_data_layout(path: Path, handle: BinaryIO, file_size: int) -> tuple[int, int]:
    """Walk the RIFF chunks; return (data bytes declared, block_align). Raises on bad structure.

    soundfile happily reads a truncated file (it returns the frames that are there), so the
    declared data-chunk size is checked against the bytes actually present.
    """
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise DataError(path, "bad header: not a RIFF/WAVE file")
    riff_size = struct.unpack_from("<I", head, 4)[0]
    # One byte of slack: some writers count a final pad byte they never write.
    if riff_size + 8 > file_size + 1:
        raise DataError(path, f"truncated: RIFF header declares {riff_size + 8} bytes, file has {file_size}")
    offset = 12
    block_align = None
    while offset + 8 <= file_size:
        handle.seek(offset)
        chunk_header = handle.read(8)
        chunk_id = chunk_header[:4]
        chunk_size = struct.unpack_from("<I", chunk_header, 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = handle.read(16)
            if chunk_size < 16 or len(fmt) < 16:
                raise DataError(path, "bad header: 'fmt ' chunk too short")
            block_align = struct.unpack_from("<H", fmt, 12)[0]
            if block_align == 0:
                raise DataError(path, "bad header: block align is 0")
        elif chunk_id == b"data":
            if block_align is None:
                raise DataError(path, "bad header: 'data' chunk before 'fmt ' chunk")
            available = file_size - body
            if chunk_size > available:
                raise DataError(
                    path,
                    f"truncated: data chunk declares {chunk_size} bytes, only {available} present",
                )
            return chunk_size, block_align
        offset = body + chunk_size + (chunk_size & 1)  # chunks are word aligned
    raise DataError(path, "bad header: no 'data' chunk found")


SAMPLE_RATE_RANGE = (1000, 768000)
# torchaudio's sinc resampler builds a kernel of about (16 kHz/g) x (rate/g) taps, g = gcd(rate, 16 kHz):
# a corrupted header's odd rate (e.g. 44101 Hz) would need gigabytes. Every common rate has rate/g <= 441.
MAX_REDUCED_RATE = 1000


def check_sample_rate(path: str | os.PathLike, sample_rate: int) -> None:
    """Refuse a sample rate no audio file has, or one the resampler cannot reach 16 kHz from cheaply."""
    low, high = SAMPLE_RATE_RANGE
    if not low <= sample_rate <= high:
        raise DataError(path, f"sample rate {sample_rate} Hz is outside {low}..{high} Hz (AVSBench WAVs are 16 kHz)")
    reduced = sample_rate // math.gcd(sample_rate, VGGISH_SAMPLE_RATE)
    if reduced > MAX_REDUCED_RATE:
        raise DataError(
            path,
            f"sample rate {sample_rate} Hz has no small ratio to 16 kHz (resampling would need a "
            f"{VGGISH_SAMPLE_RATE // (sample_rate // reduced)}x{reduced}-tap kernel); convert the file to 16 kHz",
        )


def load_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV file as mono float32 [n] (channels averaged) and its sample rate.

    Integer PCM is scaled to [-1, 1) as soundfile does (int16 / 32768, the same as torchvggish's
    `wavfile_to_examples`). Raises DataError naming the file when it is missing, empty, has a bad
    header, is truncated, holds no samples or holds non-finite samples.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    file_size = path.stat().st_size
    if file_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    with open(path, "rb") as handle:  # only chunk headers are read here
        data_bytes, block_align = _wav_data_layout(path, handle, file_size)
    try:
        samples, sample_rate = sf.read(os.fspath(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise DataError(path, f"unreadable WAV: {err}") from err
    expected_frames = data_bytes // block_align
    if samples.shape[0] != expected_frames:
        raise DataError(
            path,
            f"truncated: header declares {expected_frames} frames, decoded {samples.shape[0]}",
        )
    if samples.shape[0] == 0:
        raise DataError(path, "no audio samples")
    if not np.isfinite(samples).all():
        raise DataError(path, "non-finite sample values")
    check_sample_rate(path, int(sample_rate))
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), int(sample_rate)


# ---------------------------------------------------------------------------------------------
# VGGish log-mel front end


def _hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, as VGGish defines it."""
    return 1127.0 * np.log1p(np.asarray(hertz, dtype=np.float64) / 700.0)


@functools.lru_cache(maxsize=4)
def vggish_mel_matrix(
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = VGGISH_SAMPLE_RATE,
    num_mel_bands: int = NUM_MEL_BANDS,
    low_hz: float = MEL_LOW_HZ,
    high_hz: float = MEL_HIGH_HZ,
) -> torch.Tensor:
    """The VGGish triangular mel weights: float64 [num_spectrogram_bins, num_mel_bands].

    Triangles are linear in mel between equally spaced mel edges; the DC bin gets weight 0 (HTK).
    """
    bins_mel = torch.from_numpy(_hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins)))
    edges = torch.linspace(
        float(_hertz_to_mel(low_hz)),
        float(_hertz_to_mel(high_hz)),
        num_mel_bands + 2,
        dtype=torch.float64,
    )
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - bins_mel[:, None]) / (upper - centre)[None, :]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)
    weights[0, :] = 0.0
    return weights


@functools.lru_cache(maxsize=2)
def _periodic_hann(length: int) -> torch.Tensor:
    return torch.hann_window(length, periodic=True, dtype=torch.float64)


def log_mel_spectrogram(waveform_16k: torch.Tensor) -> torch.Tensor:
    """log(mel + 0.01) of a 16 kHz mono waveform [n]: float64 [num_frames, 64].

    Frames start every 160 samples and are 400 samples long; only complete frames are kept.
    """
    signal = waveform_16k.to(torch.float64)
    if signal.shape[0] < WINDOW_SAMPLES:
        return signal.new_zeros((0, NUM_MEL_BANDS))
    frames = signal.unfold(0, WINDOW_SAMPLES, HOP_SAMPLES)  # [num_frames, 400]
    magnitude = torch.fft.rfft(frames * _periodic_hann(WINDOW_SAMPLES), n=FFT_LENGTH).abs()
    mel = magnitude @ vggish_mel_matrix().to(magnitude.device)
    return torch.log(mel + LOG_OFFSET)


def log_mel_examples(wav: np.ndarray, sample_rate: int) -> torch.Tensor:
    """VGGish input examples of a mono waveform: float32 [n_examples, 1, 96, 64].

    One example per 0.96 s; audio shorter than one example gives [0, 1, 96, 64].
    """
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"log_mel_examples expects a mono waveform [n], got shape {wav.shape}")
    if sample_rate <= 0:
        raise ValueError(f"log_mel_examples: sample_rate must be positive, got {sample_rate}")
    reduced = int(sample_rate) // math.gcd(int(sample_rate), VGGISH_SAMPLE_RATE)
    if reduced > MAX_REDUCED_RATE:
        raise ValueError(
            f"log_mel_examples: sample rate {sample_rate} Hz has no small ratio to 16 kHz; resample it first"
        )
    signal = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float64))
    if not torch.isfinite(signal).all():
        raise ValueError("log_mel_examples: waveform holds non-finite values")
    if sample_rate != VGGISH_SAMPLE_RATE:
        import torchaudio.functional as audio_functional  # imported lazily: heavy module

        signal = audio_functional.resample(signal, int(sample_rate), VGGISH_SAMPLE_RATE)
    log_mel = log_mel_spectrogram(signal)
    num_examples = log_mel.shape[0] // EXAMPLE_FRAMES
    examples = log_mel[: num_examples * EXAMPLE_FRAMES].reshape(num_examples, 1, EXAMPLE_FRAMES, NUM_MEL_BANDS)
    return examples.to(torch.float32).contiguous()


def fit_examples(examples: torch.Tensor, num_frames: int, mode: FitMode) -> torch.Tensor:
    """Match the example count to the clip's frame count: [n, 1, 96, 64] -> [num_frames, 1, 96, 64].

    Extra examples are dropped. Missing ones are filled per docs/AVSBENCH.md section 4:
    `repeat_last` (S4 / MS3 official preprocessing) repeats the last example; `zero_pad` (AVSS
    official model code) appends all-zero examples.
    """
    if examples.ndim != 4 or tuple(examples.shape[1:]) != (1, EXAMPLE_FRAMES, NUM_MEL_BANDS):
        raise ValueError(f"fit_examples expects [n, 1, 96, 64], got {tuple(examples.shape)}")
    if num_frames <= 0:
        raise ValueError(f"fit_examples: num_frames must be positive, got {num_frames}")
    count = examples.shape[0]
    if count >= num_frames:
        return examples[:num_frames]
    missing = num_frames - count
    if mode == "repeat_last":
        if count == 0:
            raise ValueError("fit_examples: no example to repeat (audio shorter than 0.96 s)")
        filler = examples[-1:].expand(missing, -1, -1, -1)
    elif mode == "zero_pad":
        filler = examples.new_zeros((missing, *examples.shape[1:]))
    else:
        raise ValueError(f"fit_examples: mode must be 'repeat_last' or 'zero_pad', got {mode!r}")
    return torch.cat((examples, filler), dim=0)
