"""SynthAVS: a generated audio-visual segmentation dataset in the exact AVSBench layouts.

Every clip shows 1-4 objects of `num_classes` classes on a textured background, moving smoothly.
Each class has a visual identity (shape, colour, texture) and a sound identity (pitch, timbre,
amplitude pattern). Per second some objects sound and the rest are silent distractors of classes
that sound in other clips, so the picture alone does not say which object to segment: a model
that ignores the audio cannot solve it (docs/SYNTHAVS.md, SYNTHETIC.md).

Layouts (AVSBENCH.md): `s4` (one sounding object, the same all clip long), `ms3` (two or three
sources, status changing per second), `avss` (class-colour masks; clip kinds v1s / v1m / v2).
The sidecar `<root>/synth_sources.json` records, per clip and second, which objects sound.

Deterministic: every clip draws from its own numpy Generator seeded by (seed, subset, split,
clip index); images are PNG/JPEG written by PIL with fixed parameters; no file holds a time.

Command line:
    python -m avseg.data.synth out=PATH subset=s4|ms3|avss [key=value ...]
    python -m avseg.data.synth            # all three subsets into the cache folder, printed
"""

from __future__ import annotations

import colorsys
import csv
import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import socket
import sys
import tempfile
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avseg.data.palette import AVSS_CLASSES, NUM_AVSS_CLASSES, label2idx_json, voc_colormap
from avseg.errors import ConfigError, DataError

# Bump whenever the generated content changes for the same options: old cached trees are rebuilt.
GENERATOR_VERSION = 1

SAMPLE_RATE = 16000
SUBSETS: tuple[str, ...] = ("s4", "ms3", "avss")
SPLITS: tuple[str, ...] = ("train", "val", "test")
AVSS_KINDS: tuple[str, ...] = ("v1s", "v1m", "v2")
KIND_FRAMES: dict[str, int] = {"v1s": 5, "v1m": 5, "v2": 10}
SIDECAR_NAME = "synth_sources.json"
COMPLETE_MARKER = ".synth_complete"

DEFAULT_CLIPS: dict[str, dict[str, int]] = {
    "s4": {"train": 160, "val": 32, "test": 32},
    "ms3": {"train": 160, "val": 32, "test": 32},
    # AVSS clips cycle v1s, v1m, v2: 48 of each kind in train, 10 or 11 in val and test.
    "avss": {"train": 144, "val": 32, "test": 32},
}

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "ring", "cross", "star", "hexagon", "ellipse",
    "crescent",
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "rings")
TIMBRES: tuple[str, ...] = ("harmonic", "square", "noise_band", "vibrato")
AMPLITUDES: tuple[str, ...] = ("steady", "pulsed", "tremolo")

_MIN_F0_HZ = 200.0
_MAX_F0_HZ = 3200.0
_SOURCE_RMS = 0.25  # final clip loudness before int16 quantisation
_RAMP_SAMPLES = 160  # 10 ms fades where a source starts or stops, so a switch is not a click
_MIN_VISIBLE_FRACTION = 0.3  # of an object's own area, in every frame (else the layout is redrawn)
_PNG_COMPRESS_LEVEL = 1  # fast; any fixed level gives identical bytes run to run


# ---------------------------------------------------------------------------------------------
# Options


_OPTION_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "image_size": 96,
    "num_classes": 8,
    "clips_per_split": None,  # None: DEFAULT_CLIPS[subset]
    "snr_db": (10.0, 20.0),
    "write_pkl": False,
    "max_objects": 4,
    "distractor_prob": 0.85,
    "jpeg_quality": 95,
}


def resolve_options(subset: str, **options: Any) -> dict[str, Any]:
    """All generation options with defaults filled in, validated, as plain JSON-able values.

    Accepts plain Python values as well as OmegaConf containers (any Mapping / Sequence).
    Raises ConfigError naming the key and the allowed values.
    """
    if subset not in SUBSETS:
        raise ConfigError(f"subset: {subset!r} is not one of {list(SUBSETS)}")
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"synth options: unknown key(s) {unknown}; allowed: {sorted(_OPTION_DEFAULTS)}"
        )
    merged = {**_OPTION_DEFAULTS, **options}

    def as_int(key: str, low: int, high: int | None = None) -> int:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key}: {value} is out of range; allowed: {bound}")
        return int(value)

    seed = as_int("seed", 0)
    image_size = as_int("image_size", 32, 4096)
    num_classes = as_int("num_classes", 2, NUM_AVSS_CLASSES - 1)
    max_objects = as_int("max_objects", 1, 4)
    jpeg_quality = as_int("jpeg_quality", 1, 100)

    clips = merged["clips_per_split"]
    if clips is None:
        clips = DEFAULT_CLIPS[subset]
    if not isinstance(clips, Mapping) or set(clips) != set(SPLITS):
        raise ConfigError(
            f"clips_per_split: expected a mapping with exactly the keys {list(SPLITS)}, got {clips!r}"
        )
    clips_resolved: dict[str, int] = {}
    for split in SPLITS:
        count = clips[split]
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ConfigError(f"clips_per_split.{split}: expected an integer >= 0, got {count!r}")
        clips_resolved[split] = int(count)

    snr = merged["snr_db"]
    if isinstance(snr, (str, bytes)) or not isinstance(snr, Sequence) or len(snr) != 2:
        raise ConfigError(f"snr_db: expected [low, high] in dB, got {snr!r}")
    try:
        snr_low, snr_high = float(snr[0]), float(snr[1])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"snr_db: expected two numbers [low, high], got {snr!r}") from err
    if not (math.isfinite(snr_low) and math.isfinite(snr_high)) or snr_low > snr_high:
        raise ConfigError(f"snr_db: expected finite [low, high] with low <= high, got {snr!r}")

    write_pkl = merged["write_pkl"]
    if not isinstance(write_pkl, bool):
        raise ConfigError(f"write_pkl: expected true or false, got {write_pkl!r}")
    if write_pkl and subset == "avss":
        raise ConfigError("write_pkl: AVSS ships no pickled log-mel (AVSBENCH.md 4); allowed: false")

    distractor_prob = merged["distractor_prob"]
    if isinstance(distractor_prob, bool) or not isinstance(distractor_prob, (int, float)):
        raise ConfigError(f"distractor_prob: expected a number in [0, 1], got {distractor_prob!r}")
    if not 0.0 <= float(distractor_prob) <= 1.0:
        raise ConfigError(f"distractor_prob: {distractor_prob} is out of range; allowed: [0, 1]")

    multi_source = subset in ("ms3", "avss")
    if multi_source and max_objects < 2:
        raise ConfigError(f"max_objects: {subset} clips mix 2-3 sources; allowed: 2..4")
    return {
        "seed": seed,
        "image_size": image_size,
        "num_classes": num_classes,
        "clips_per_split": clips_resolved,
        "snr_db": [snr_low, snr_high],
        "write_pkl": write_pkl,
        "max_objects": max_objects,
        "distractor_prob": float(distractor_prob),
        "jpeg_quality": jpeg_quality,
    }


def cache_key(subset: str, resolved: Mapping[str, Any]) -> str:
    """Hash of the generator version, the subset and every (resolved) option."""
    payload = json.dumps(
        {"generator_version": GENERATOR_VERSION, "subset": subset, "options": dict(resolved)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where generated trees live: `$AVSEG_CACHE/synth`, else `~/.cache/avseg/synth` (the same
    folder as the `synth_*` data configs' `${paths.cache_dir}/synth`). Never in a data tree."""
    if os.environ.get("AVSEG_CACHE"):
        return Path(os.environ["AVSEG_CACHE"]) / "synth"
    return Path(os.path.expanduser("~")) / ".cache" / "avseg" / "synth"


# ---------------------------------------------------------------------------------------------
# Classes: visual and sound identities


@dataclass(frozen=True)
class ClassSpec:
    """One SynthAVS class. `index` counts SynthAVS classes; `avss_index` is its AVSS class."""

    index: int
    name: str
    avss_index: int
    shape: str
    texture: str
    colour: tuple[int, int, int]
    colour_dark: tuple[int, int, int]
    f0_hz: float
    timbre: str
    amplitude: str
    pulse_hz: float

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "avss_index": self.avss_index,
            "shape": self.shape,
            "texture": self.texture,
            "colour": list(self.colour),
            "colour_dark": list(self.colour_dark),
            "f0_hz": round(self.f0_hz, 3),
            "timbre": self.timbre,
            "amplitude": self.amplitude,
            "pulse_hz": self.pulse_hz,
        }


def class_catalogue(num_classes: int) -> list[ClassSpec]:
    """The classes for `num_classes` (independent of the seed: the seed picks clips, not classes).

    Names: AVSS classes at evenly spaced positions of AVSS_CLASSES[1:]. Pitches: log-spaced
    200-3200 Hz. Shapes, textures, hues, timbres and amplitude patterns cycle with different
    periods so any two classes differ in several cues.
    """
    specs = []
    for c in range(num_classes):
        avss_index = 1 + (c * (NUM_AVSS_CLASSES - 1)) // num_classes
        hue = (c / num_classes + 0.03) % 1.0
        bright = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        dark = colorsys.hsv_to_rgb(hue, 0.6, 0.45)
        f0 = _MIN_F0_HZ * (_MAX_F0_HZ / _MIN_F0_HZ) ** (c / (num_classes - 1))
        specs.append(
            ClassSpec(
                index=c,
                name=AVSS_CLASSES[avss_index],
                avss_index=avss_index,
                shape=SHAPES[c % len(SHAPES)],
                texture=TEXTURES[c % len(TEXTURES)],
                colour=tuple(int(round(255 * x)) for x in bright),
                colour_dark=tuple(int(round(255 * x)) for x in dark),
                f0_hz=f0,
                timbre=TIMBRES[c % len(TIMBRES)],
                amplitude=AMPLITUDES[(c + c // len(TIMBRES)) % len(AMPLITUDES)],
                pulse_hz=float(3 + c % 3),
            )
        )
    return specs


# ---------------------------------------------------------------------------------------------
# Drawing


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-radius shape at local coordinates (u, v) (v points down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # apex up; inscribed-circle radius 0.5
        angles = np.deg2rad([90.0, 210.0, 330.0])
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) <= 0.5
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.3)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    if shape == "star":
        rho = np.sqrt(u * u + v * v)
        return rho <= 0.6 + 0.4 * np.cos(5.0 * np.arctan2(v, u))
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(0.0, 360.0, 60.0))
        return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) <= 0.87
    if shape == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where the bright colour shows, in object coordinates (the texture moves with it)."""
    if texture == "solid":
        return np.ones(u.shape, dtype=bool)
    if texture == "stripes":
        return np.sin(3.0 * np.pi * u) > -0.2
    if texture == "checker":
        return (np.floor(2.0 * u + 8.0) + np.floor(2.0 * v + 8.0)) % 2 == 0
    if texture == "dots":
        fu, fv = (2.5 * u) % 1.0 - 0.5, (2.5 * v) % 1.0 - 0.5
        return fu * fu + fv * fv > 0.07
    if texture == "rings":
        return np.sin(4.0 * np.pi * np.sqrt(u * u + v * v)) > -0.2
    raise ValueError(f"unknown texture {texture!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-saturation textured background: float32 [H, W, 3] in [0, 1]."""
    hue = rng.random()
    base = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.05, 0.25), rng.uniform(0.4, 0.7)))
    coords = np.arange(size, dtype=np.float32) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    shade = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        angle = rng.uniform(0.0, np.pi)
        freq = rng.uniform(2.0, 9.0)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        shade += 0.05 * np.sin(
            2.0 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase
        ).astype(np.float32)
    # Fine grain, constant over the clip (a static textured surface).
    shade += rng.uniform(-0.03, 0.03, size=(size, size)).astype(np.float32)
    tint = rng.uniform(-0.04, 0.04, size=3)
    image = base[None, None, :] + tint[None, None, :] + shade[:, :, None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


@dataclass
class _Layout:
    """Per object j and frame t: centre (x, y) [n, T, 2], radius [n, T], angle [n, T] (pixels)."""

    centre: np.ndarray
    radius: np.ndarray
    angle: np.ndarray


def _reflect(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Fold positions into [low, high] as a ball bouncing off the walls would move."""
    span = np.maximum(high - low, 1e-6)
    y = np.mod(x - low, 2.0 * span)
    return low + np.where(y > span, 2.0 * span - y, y)


def _sample_layout(rng: np.random.Generator, num_objects: int, num_frames: int, size: int) -> _Layout:
    t = np.arange(num_frames, dtype=np.float64)[None, :]
    radius0 = rng.uniform(0.11, 0.2, size=(num_objects, 1)) * size
    start = rng.uniform(0.0, 1.0, size=(num_objects, 2)) * (size - 2 * radius0) + radius0
    speed = rng.uniform(0.02, 0.07, size=(num_objects, 1)) * size
    heading = rng.uniform(0.0, 2.0 * np.pi, size=(num_objects, 1))
    margin = radius0 * 0.9  # objects may touch the border, never leave the frame
    x = _reflect(start[:, :1] + speed * np.cos(heading) * t, margin, size - margin)
    y = _reflect(start[:, 1:] + speed * np.sin(heading) * t, margin, size - margin)
    pulse = 1.0 + 0.06 * np.sin(rng.uniform(0.3, 0.9, (num_objects, 1)) * t + rng.uniform(0, 6.3, (num_objects, 1)))
    angle = rng.uniform(0.0, 2.0 * np.pi, (num_objects, 1)) + rng.uniform(-0.25, 0.25, (num_objects, 1)) * t
    return _Layout(centre=np.stack([x, y], axis=-1), radius=radius0 * pulse, angle=angle)


def _render(
    layout: _Layout,
    classes: list[ClassSpec],
    brightness: np.ndarray,
    background: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the clip, objects back to front (object 0 furthest back).

    Returns frames uint8 [T, H, W, 3], instance maps uint8 [T, H, W] (0 background, j + 1 object j,
    after occlusion) and each object's own area in pixels float [n, T].
    """
    num_objects, num_frames = layout.radius.shape
    size = background.shape[0]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    instances = np.zeros((num_frames, size, size), dtype=np.uint8)
    areas = np.zeros((num_objects, num_frames))
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    for t in range(num_frames):
        canvas = background.copy()
        for j, spec in enumerate(classes):
            cx, cy = layout.centre[j, t]
            r = layout.radius[j, t]
            # Only the bounding box of the object is evaluated: cost ~ object area, not image area.
            x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)
            y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)
            if x0 >= x1 or y0 >= y1:
                continue
            dx = grid[None, x0:x1] - cx
            dy = grid[y0:y1, None] - cy
            cos_a, sin_a = np.cos(layout.angle[j, t]), np.sin(layout.angle[j, t])
            u = (dx * cos_a + dy * sin_a) / r
            v = (-dx * sin_a + dy * cos_a) / r
            inside = _shape_mask(spec.shape, u, v)
            areas[j, t] = inside.sum()
            bright = _texture_mask(spec.texture, u, v)
            shade = (1.0 - 0.18 * np.minimum(u * u + v * v, 1.0)) * brightness[j]
            colour = np.where(
                bright[..., None],
                np.asarray(spec.colour, dtype=np.float32) / 255.0,
                np.asarray(spec.colour_dark, dtype=np.float32) / 255.0,
            ) * shade[..., None]
            patch = canvas[y0:y1, x0:x1]
            patch[inside] = colour[inside]
            instances[t, y0:y1, x0:x1][inside] = j + 1
        frames[t] = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return frames, instances, areas


# ---------------------------------------------------------------------------------------------
# Sound


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
    classes: list[ClassSpec],
    sounding: np.ndarray,
    snr_db: float,
) -> np.ndarray:
    """The clip's audio: sounding objects' sounds + background noise at `snr_db`.

    `sounding` bool [n_objects, T]. Returns int16 [T * SR].
    """
    num_objects, num_frames = sounding.shape
    num_samples = num_frames * SAMPLE_RATE
    mix = np.zeros(num_samples)
    for j, spec in enumerate(classes):
        if sounding[j].any():
            gain = 10.0 ** (rng.uniform(-3.0, 3.0) / 20.0)  # instance loudness, +-3 dB
            mix += gain * _class_signal(spec, rng, num_samples) * _gate(sounding[j])
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


# ---------------------------------------------------------------------------------------------
# Clip plans


@dataclass
class ClipPlan:
    """What one clip shows and plays. Objects are listed back to front."""

    clip_id: str
    split: str
    kind: str  # "s4", "ms3", or an AVSS label: "v1s" / "v1m" / "v2"
    classes: list[ClassSpec]
    sounding: np.ndarray  # bool [n_objects, T]
    snr_db: float
    frames: np.ndarray  # uint8 [T, H, W, 3]
    instances: np.ndarray  # uint8 [T, H, W]
    audio: np.ndarray  # int16 [T * SR]

    @property
    def num_frames(self) -> int:
        return int(self.sounding.shape[1])

    def sounding_mask(self, t: int) -> np.ndarray:
        """bool [H, W]: pixels of the objects that sound in second t (after occlusion)."""
        ids = np.flatnonzero(self.sounding[:, t]) + 1
        return np.isin(self.instances[t], ids)

    def semantic_mask(self, t: int) -> np.ndarray:
        """uint8 [H, W]: AVSS class index of sounding pixels, 0 elsewhere."""
        lut = np.zeros(len(self.classes) + 1, dtype=np.uint8)
        for j, spec in enumerate(self.classes):
            if self.sounding[j, t]:
                lut[j + 1] = spec.avss_index
        return lut[self.instances[t]]


def _pick_count(rng: np.random.Generator, values: Sequence[int], weights: Sequence[float], cap: int) -> int:
    """Draw from `values` with `weights`, restricted to values <= cap (cap >= min(values))."""
    allowed = [(v, w) for v, w in zip(values, weights) if v <= cap]
    probs = np.array([w for _, w in allowed], dtype=np.float64)
    return int(allowed[int(rng.choice(len(allowed), p=probs / probs.sum()))][0])


def _source_schedule(rng: np.random.Generator, num_sources: int, num_frames: int) -> np.ndarray:
    """bool [num_sources, T]: each source switches on/off per second (sticky Markov chain);
    at least one source sounds every second and every source sounds at least once."""
    status = np.zeros((num_sources, num_frames), dtype=bool)
    status[:, 0] = rng.random(num_sources) < 0.8
    for t in range(1, num_frames):
        flip = rng.random(num_sources) < 0.25
        status[:, t] = status[:, t - 1] ^ flip
    for t in range(num_frames):
        if not status[:, t].any():
            status[rng.integers(num_sources), t] = True
    for s in range(num_sources):
        if not status[s].any():
            status[s, rng.integers(num_frames)] = True
    return status


def plan_clip(
    *,
    options: Mapping[str, Any],
    catalogue: list[ClassSpec],
    subset: str,
    split: str,
    index: int,
) -> ClipPlan:
    """Everything about one clip, from its own seeded Generator (independent of other clips)."""
    split_code = SPLITS.index(split)
    subset_code = SUBSETS.index(subset)
    rng = np.random.default_rng([options["seed"], subset_code, split_code, index, GENERATOR_VERSION])
    num_classes = len(catalogue)
    max_objects = options["max_objects"]
    if subset == "s4":
        kind, num_frames = "s4", 5
    elif subset == "ms3":
        kind, num_frames = "ms3", 5
    else:
        kind = AVSS_KINDS[index % len(AVSS_KINDS)]
        num_frames = KIND_FRAMES[kind]

    # Sources: single-source kinds cycle through the classes so every class sounds equally often.
    if kind in ("s4", "v1s"):
        ordinal = index if kind == "s4" else index // len(AVSS_KINDS)  # position among its kind
        source_classes = [ordinal % num_classes]
        schedule = np.ones((1, num_frames), dtype=bool)
    else:
        cap = min(max_objects, num_classes)
        if kind == "v2":
            num_sources = _pick_count(rng, (1, 2, 3), (0.4, 0.4, 0.2), cap)
        else:
            num_sources = _pick_count(rng, (2, 3), (0.6, 0.4), cap)
        source_classes = [int(c) for c in rng.choice(num_classes, size=num_sources, replace=False)]
        schedule = _source_schedule(rng, num_sources, num_frames)
    # Silent distractors: other classes (which sound in other clips), so the picture alone
    # does not tell which object to segment.
    room = min(max_objects - len(source_classes), num_classes - len(source_classes))
    num_distractors = 0
    if room > 0 and rng.random() < options["distractor_prob"]:
        num_distractors = _pick_count(rng, (1, 2, 3), (0.5, 0.35, 0.15), room)
    others = [c for c in range(num_classes) if c not in source_classes]
    distractor_classes = [int(c) for c in rng.choice(others, size=num_distractors, replace=False)]

    object_classes = source_classes + distractor_classes
    sounding = np.zeros((len(object_classes), num_frames), dtype=bool)
    sounding[: len(source_classes)] = schedule
    order = rng.permutation(len(object_classes))  # depth order: sources anywhere in the stack
    classes = [catalogue[object_classes[k]] for k in order]
    sounding = sounding[order]

    size = options["image_size"]
    background = _background(rng, size)
    brightness = rng.uniform(0.9, 1.1, size=len(classes))
    for _attempt in range(20):
        layout = _sample_layout(rng, len(classes), num_frames, size)
        frames, instances, areas = _render(layout, classes, brightness, background)
        visible = np.stack([(instances == j + 1).sum(axis=(1, 2)) for j in range(len(classes))])
        if np.all(visible >= _MIN_VISIBLE_FRACTION * np.maximum(areas, 1.0)):
            break
    snr_low, snr_high = options["snr_db"]
    snr_db = float(rng.uniform(snr_low, snr_high))
    audio = _mix_audio(rng, classes, sounding, snr_db)

    clip_id = f"synth-{subset}-{split}-{index:05d}"
    return ClipPlan(
        clip_id=clip_id,
        split=split,
        kind=kind,
        classes=classes,
        sounding=sounding,
        snr_db=snr_db,
        frames=frames,
        instances=instances,
        audio=audio,
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(
        buffer, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False
    )
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pickle_log_mel(samples: np.ndarray, num_frames: int) -> bytes:
    """The official `.pkl`: a pickled float tensor [T, 1, 96, 64] saved with requires_grad, as
    the official preprocessing left it (AVSBENCH.md section 4), from the quantised WAV samples."""
    import torch  # only when pickles are wanted

    from avseg.data.audio import fit_examples, log_mel_examples

    waveform = samples.astype(np.float32) / 32768.0
    # These tensors are tiny: intra-op threads only add overhead (6x slower measured on a busy
    # 2-core machine), so this runs single-threaded and restores the caller's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        examples = fit_examples(log_mel_examples(waveform, SAMPLE_RATE), num_frames, "repeat_last")
    finally:
        torch.set_num_threads(threads)
    return pickle.dumps(examples.clone().requires_grad_(True), protocol=pickle.DEFAULT_PROTOCOL)


def _binary_mask(plan: ClipPlan, t: int) -> bytes:
    return _png_bytes(np.where(plan.sounding_mask(t), 255, 0).astype(np.uint8), "L")


def _write_clip(root: Path, subset: str, plan: ClipPlan, options: Mapping[str, Any]) -> None:
    """Write one clip's frames, masks, audio (and pickle) in the subset's official layout."""
    wav = _wav_bytes(plan.audio)
    if subset == "s4":
        category = plan.classes[int(np.flatnonzero(plan.sounding[:, 0])[0])].name
        name = plan.clip_id
        base = root / "s4_data"
        frame_dir = base / "visual_frames" / plan.split / category / name
        mask_dir = base / "gt_masks" / plan.split / category / name
        mask_frames = [0] if plan.split == "train" else list(range(plan.num_frames))
        for t in range(plan.num_frames):
            _write(frame_dir / f"{name}_{t + 1}.png", _png_bytes(plan.frames[t], "RGB"))
        for t in mask_frames:
            _write(mask_dir / f"{name}_{t + 1}.png", _binary_mask(plan, t))
        _write(base / "audio_wav" / plan.split / category / f"{name}.wav", wav)
        if options["write_pkl"]:
            _write(
                base / "audio_log_mel" / plan.split / category / f"{name}.pkl",
                _pickle_log_mel(plan.audio, plan.num_frames),
            )
    elif subset == "ms3":
        name = plan.clip_id
        base = root / "ms3_data"
        for t in range(plan.num_frames):
            _write(
                base / "visual_frames" / name / f"{name}.mp4_{t + 1}.png",
                _png_bytes(plan.frames[t], "RGB"),
            )
            _write(base / "gt_masks" / plan.split / name / f"{name}_{t + 1}.png", _binary_mask(plan, t))
        _write(base / "audio_wav" / plan.split / f"{name}.wav", wav)
        if options["write_pkl"]:
            _write(
                base / "audio_log_mel" / plan.split / f"{name}.pkl",
                _pickle_log_mel(plan.audio, plan.num_frames),
            )
    else:
        clip_dir = root / plan.kind / avss_uid(plan.clip_id)
        colours = voc_colormap(NUM_AVSS_CLASSES)
        labelled = [0] if (plan.kind == "v1s" and plan.split == "train") else range(plan.num_frames)
        for t in range(plan.num_frames):
            _write(clip_dir / "frames" / f"{t}.jpg", _jpeg_bytes(plan.frames[t], options["jpeg_quality"]))
        for t in labelled:
            semantic = plan.semantic_mask(t)
            _write(clip_dir / "labels_rgb" / f"{t}.png", _png_bytes(colours[semantic], "RGB"))
            _write(clip_dir / "labels_semantic" / f"{t}.png", _png_bytes(semantic, "L"))
        _write(clip_dir / "audio.wav", wav)


def avss_uid(clip_id: str) -> str:
    """AVSS folder name of a clip (`<vid>_<n>` like the official uids)."""
    return f"{clip_id}_1"


def _csv_bytes(header: Sequence[str], rows: list[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8")


def _sidecar_entry(plan: ClipPlan) -> dict[str, Any]:
    seconds = []
    for t in range(plan.num_frames):
        active = np.flatnonzero(plan.sounding[:, t])
        seconds.append([{"class": plan.classes[j].name, "instance": int(j)} for j in active])
    return {
        "split": plan.split,
        "kind": plan.kind,
        "num_frames": plan.num_frames,
        "snr_db": round(plan.snr_db, 4),
        "objects": [
            {"instance": j, "class": spec.name, "class_index": spec.index, "avss_index": spec.avss_index}
            for j, spec in enumerate(plan.classes)
        ],
        "sounding": seconds,
    }


def _write_tree(root: Path, subset: str, options: Mapping[str, Any]) -> None:
    """Generate every clip into `root` (a fresh folder), then the CSV/JSON metadata."""
    catalogue = class_catalogue(options["num_classes"])
    rows: list[list[Any]] = []
    clips: dict[str, Any] = {}
    for split in SPLITS:
        for index in range(options["clips_per_split"][split]):
            plan = plan_clip(options=options, catalogue=catalogue, subset=subset, split=split, index=index)
            _write_clip(root, subset, plan, options)
            # Metadata draws from its own stream so it never shifts the clip's content.
            meta_rng = np.random.default_rng([options["seed"], SUBSETS.index(subset), SPLITS.index(split), index, 7919])
            if subset == "s4":
                category = plan.classes[int(np.flatnonzero(plan.sounding[:, 0])[0])].name
                rows.append([plan.clip_id, int(meta_rng.integers(0, 300)), category, split])
                clips[plan.clip_id] = _sidecar_entry(plan)
            elif subset == "ms3":
                rows.append([plan.clip_id, split])
                clips[plan.clip_id] = _sidecar_entry(plan)
            else:
                uid = avss_uid(plan.clip_id)
                heard = sorted({plan.classes[j].name for j in np.flatnonzero(plan.sounding.any(axis=1))})
                rows.append([
                    plan.clip_id, uid, int(meta_rng.integers(0, 10)), int(meta_rng.integers(0, 60)),
                    "_".join(heard), split, plan.kind,
                ])
                clips[uid] = _sidecar_entry(plan)
    if subset == "s4":
        _write(root / "s4_meta_data.csv", _csv_bytes(("name", "start", "category", "split"), rows))
    elif subset == "ms3":
        _write(root / "ms3_meta_data.csv", _csv_bytes(("video_id", "split"), rows))
    else:
        _write(
            root / "metadata.csv",
            _csv_bytes(("vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"), rows),
        )
        _write(root / "label2idx.json", _json_bytes(label2idx_json()))
    sidecar = {
        "generator": "avseg.data.synth",
        "generator_version": GENERATOR_VERSION,
        "subset": subset,
        "options": dict(options),
        "sample_rate": SAMPLE_RATE,
        "classes": [spec.describe() for spec in catalogue],
        "clips": clips,
    }
    _write(root / SIDECAR_NAME, _json_bytes(sidecar))


def _marker_content(subset: str, resolved: Mapping[str, Any]) -> bytes:
    return _json_bytes(
        {"generator_version": GENERATOR_VERSION, "subset": subset, "key": cache_key(subset, resolved)}
    )


def _partial_prefix(root_name: str) -> str:
    return f".{root_name}.partial-{socket.gethostname()}-"


def generate(
    root: str | os.PathLike,
    subset: str,
    *,
    seed: int = 0,
    image_size: int = 96,
    num_classes: int = 8,
    clips_per_split: Mapping[str, int] | None = None,
    snr_db: Sequence[float] = (10.0, 20.0),
    write_pkl: bool = False,
    max_objects: int = 4,
    distractor_prob: float = 0.85,
    jpeg_quality: int = 95,
) -> Path:
    """Write a SynthAVS tree for `subset` at `root` (the folder that will hold the CSV).

    All-or-nothing: the tree is built in a hidden sibling folder, the completion marker is written
    last, and the folder is renamed to `root` in one step; on any error the partial folder is
    removed. `root` must not exist or be an empty folder (never writes into an existing tree).
    """
    resolved = resolve_options(
        subset, seed=seed, image_size=image_size, num_classes=num_classes,
        clips_per_split=clips_per_split, snr_db=snr_db, write_pkl=write_pkl,
        max_objects=max_objects, distractor_prob=distractor_prob, jpeg_quality=jpeg_quality,
    )
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(root, "already exists and is not empty; SynthAVS writes only into a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(root.name)}{os.getpid()}-", dir=root.parent))
    try:
        _write_tree(partial, subset, resolved)
        marker = partial / COMPLETE_MARKER
        with open(marker, "wb") as handle:  # last file written: its presence means complete
            handle.write(_marker_content(subset, resolved))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(partial, 0o755)  # mkdtemp makes it 0700
        try:
            os.replace(partial, root)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DataError(root, "appeared (written by another process) while generating") from err
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


# ---------------------------------------------------------------------------------------------
# Cache


def is_complete(root: str | os.PathLike, subset: str, resolved: Mapping[str, Any]) -> bool:
    """True if `root` holds a finished tree generated with exactly these options."""
    marker = Path(root) / COMPLETE_MARKER
    try:
        return marker.read_bytes() == _marker_content(subset, resolved)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(cache_dir: Path, root_name: str) -> None:
    """Delete partial folders for `root_name` left by processes on this host that died."""
    prefix = _partial_prefix(root_name)
    for entry in cache_dir.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def ensure_synth_tree(cache_dir: str | os.PathLike, subset: str, **options: Any) -> Path:
    """The tree for (subset, options) under `cache_dir/<subset>-<hash>/`, generated on first use.

    A folder without the right completion marker (interrupted, copied, older generator) is never
    used: it is deleted and rebuilt. Partial folders of dead local processes are cleaned up.
    """
    resolved = resolve_options(subset, **options)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"{subset}-{cache_key(subset, resolved)}"
    if is_complete(root, subset, resolved):
        return root
    _remove_dead_partials(cache_dir, root.name)
    if root.exists():
        shutil.rmtree(root)
    try:
        generate(root, subset, **resolved)
    except DataError:
        if is_complete(root, subset, resolved):  # another process finished it first
            return root
        raise
    return root


# ---------------------------------------------------------------------------------------------
# Command line


def _parse_value(key: str, text: str) -> Any:
    import yaml  # PyYAML comes with hydra-core / omegaconf

    if key == "snr_db" and "," in text and not text.strip().startswith("["):
        text = f"[{text}]"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {text!r}: {err}") from err


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected key=value")
        key, text = arg.split("=", 1)
        value = text if key in ("out", "cache", "subset") else _parse_value(key, text)
        if key.startswith("clips_per_split."):
            split = key.split(".", 1)[1]
            clips = parsed.setdefault("clips_per_split", {})
            if not isinstance(clips, dict):
                raise ConfigError("clips_per_split: give either the mapping or per-split keys")
            clips[split] = value
        else:
            parsed[key] = value
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m avseg.data.synth [out=PATH] [subset=s4|ms3|avss] [cache=PATH] [key=value ...]`."""
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        out = args.pop("out", None)
        cache = args.pop("cache", None)
        subset = args.pop("subset", None)
        subsets = list(SUBSETS) if subset is None else [subset]
        if out is not None and cache is not None:
            raise ConfigError("out and cache: give one of them")
        if subset is not None and subset not in SUBSETS:
            raise ConfigError(f"subset: {subset!r} is not one of {list(SUBSETS)}")
        if "clips_per_split" in args and isinstance(args["clips_per_split"], dict):
            # Per-split keys given on their own: fill the others from the subset's defaults.
            partial = args["clips_per_split"]
            per_subset = {s: {**DEFAULT_CLIPS[s], **partial} for s in subsets}
        else:
            per_subset = {s: args.get("clips_per_split") for s in subsets}
        for name in subsets:
            options = {**args, "clips_per_split": per_subset[name]}
            if out is not None:
                target = Path(out) if subset is not None else Path(out) / name
                root = generate(target, name, **options)
            else:
                root = ensure_synth_tree(Path(cache) if cache else default_cache_dir(), name, **options)
            print(f"{name}: {root}")
    except (ConfigError, DataError) as err:
        print(f"avseg.data.synth: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
