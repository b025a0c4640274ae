"""SynthAVS sounds: each class's signal, per-second gating with short ramps, background noise, the
clip mix at a given SNR, and the WAV encoding."""

from __future__ import annotations

import io
import wave
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from avseg.data.synth.classes import ClassSpec
from avseg.data.synth.options import SAMPLE_RATE

_SOURCE_RMS = 0.25  # final clip loudness before int16 quantisation
_RAMP_SAMPLES = 160  # 10 ms fades where a source starts or stops, so a switch is not a click


def _class_signal(spec: ClassSpec, rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """One instance's sound over the whole clip, RMS 1: float64 [num_samples]."""
    t = np.arange(num_samples) / SAMPLE_RATE
    f0 = spec.f0_hz * (1.0 + rng.uniform(-0.02, 0.02))
    nyquist_guard = 7400.0  # inside the VGGish mel range (125-7500 Hz)
    if spec.timbre == "harmonic":
        signal = np.zeros(num_samples)
        for k in range(1, 5):
            if k * f0 < nyquist_guard:
                signal += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k**1.5
    elif spec.timbre == "square":
        signal = np.zeros(num_samples)
        for k in range(1, 10, 2):
            if k * f0 < nyquist_guard:
                signal += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
    elif spec.timbre == "noise_band":
        spectrum = np.fft.rfft(rng.standard_normal(num_samples))
        freqs = np.fft.rfftfreq(num_samples, 1.0 / SAMPLE_RATE)
        centre = min(f0, 6000.0)
        band = np.abs(np.log2(np.maximum(freqs, 1.0) / centre)) <= 0.25  # half an octave wide
        signal = np.fft.irfft(spectrum * band, n=num_samples)
    elif spec.timbre == "vibrato":
        phase = 2 * np.pi * f0 * t + (0.03 * f0 / 6.0) * np.sin(2 * np.pi * 6.0 * t)
        signal = np.sin(phase) + 0.5 * np.sin(2.0 * phase + rng.uniform(0, 2 * np.pi))
    else:
        raise ValueError(f"unknown timbre {spec.timbre!r}")
    if spec.amplitude == "pulsed":
        envelope = 0.5 * (1.0 + np.tanh(6.0 * np.sin(2 * np.pi * spec.pulse_hz * t + rng.uniform(0, 2 * np.pi))))
        envelope = 0.05 + 0.95 * envelope
    elif spec.amplitude == "tremolo":
        envelope = 0.55 + 0.45 * np.sin(2 * np.pi * (spec.pulse_hz + 5.0) * t + rng.uniform(0, 2 * np.pi))
    else:
        envelope = np.ones(num_samples)
    signal = signal * envelope
    return signal / max(float(np.sqrt(np.mean(signal**2))), 1e-9)


def _gate(sounding_seconds: np.ndarray) -> np.ndarray:
    """Per-second on/off [T] -> a gain [T * SR] with 10 ms ramps at the switches."""
    gain = np.repeat(sounding_seconds.astype(np.float64), SAMPLE_RATE)
    # Moving average over _RAMP_SAMPLES (edges held): linear ramps centred on each switch.
    half = _RAMP_SAMPLES // 2
    padded = np.concatenate([np.full(half, gain[0]), gain, np.full(_RAMP_SAMPLES - half, gain[-1])])
    running = np.concatenate([[0.0], np.cumsum(padded)])
    return (running[_RAMP_SAMPLES:] - running[:-_RAMP_SAMPLES])[: gain.shape[0]] / _RAMP_SAMPLES


def _background_noise(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Coloured noise 1/f^alpha with a random alpha in [0, 1.5], RMS 1."""
    alpha = rng.uniform(0.0, 1.5)
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.maximum(np.fft.rfftfreq(num_samples, 1.0 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum / freqs ** (alpha / 2.0), n=num_samples)
    return noise / max(float(np.sqrt(np.mean(noise**2))), 1e-9)


def _mix_audio(
    rng: np.random.Generator,
    classes: Sequence[Any],
    sounding: np.ndarray,
    snr_db: float,
    signal: Callable[[Any, np.random.Generator, int], np.ndarray] = _class_signal,
    stems: np.ndarray | None = None,
) -> np.ndarray:
    """The clip's audio: sounding objects' sounds + background noise at `snr_db`.

    `sounding` bool [n_objects, T]; `signal(spec, rng, num_samples)` gives one instance's sound
    (RMS 1). If `stems` float [n_objects, T * SR] is given, each object's gated sound (before the
    clip's final scaling) is written into it. Returns int16 [T * SR].
    """
    num_objects, num_frames = sounding.shape
    num_samples = num_frames * SAMPLE_RATE
    mix = np.zeros(num_samples)
    for j, spec in enumerate(classes):
        if sounding[j].any():
            gain = 10.0 ** (rng.uniform(-3.0, 3.0) / 20.0)  # instance loudness, +-3 dB
            stem = gain * signal(spec, rng, num_samples) * _gate(sounding[j])
            mix += stem
            if stems is not None:
                stems[j] = stem
    noise = _background_noise(rng, num_samples)
    signal_rms = float(np.sqrt(np.mean(mix**2)))
    if signal_rms > 0.0:
        mix += noise * signal_rms / 10.0 ** (snr_db / 20.0)
    else:  # a silent clip is noise only
        mix = noise
    peak = float(np.max(np.abs(mix)))
    scale = min(_SOURCE_RMS / max(float(np.sqrt(np.mean(mix**2))), 1e-9), 0.95 / max(peak, 1e-9))
    return np.clip(np.rint(mix * scale * 32767.0), -32768, 32767).astype("<i2")


def _wav_bytes(samples: np.ndarray) -> bytes:
    """16 kHz mono 16-bit PCM WAV with the plain 44-byte header."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLE_RATE)
        handle.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()
