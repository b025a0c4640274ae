"""SynthAVS `assets=real`: classes whose pictures are real drawings and whose sounds are real.

Each class is an AVSS class that Debian's gcompris-qt-data draws (SVG, rasterised by rsvg-convert:
the drawing's alpha is the object's exact mask) and either plays (musical instruments: a new melody
per instance, rendered note by note from a General MIDI program of a soundfont by fluidsynth) or
records (animals and the drum kit, and the instruments with `instrument_sounds=recording|mixed`:
cuts of the package's .ogg recording, pitch-shifted by up to two semitones, time-shifted, looped
with short gaps at random gains). The generator, layouts, sidecar, determinism, cache and checker
are those of the synthetic mode; only the painting, the backgrounds (backgrounds.py) and the class
signals change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from avseg.data.palette import AVSS_CLASSES
from avseg.data.synth import assets
from avseg.data.synth.classes import ClassIdentity
from avseg.data.synth.options import SAMPLE_RATE

_INSTRUMENTS = ("instruments.rcc", "gcompris/src/activities/instruments/resource/")
_FARM = ("explore_farm_animals.rcc", "gcompris/src/activities/explore_farm_animals/resource/animals/")
#: The classes in order. Instruments and animals alternate, so any first `num_classes` classes mix
#: both kinds; the first eight look unlike each other (the cello, the violin's look-alike at random
#: scales, comes later).
_ORDER = (
    "violin dog trumpet cat piano duck accordion sheep flute horse guitar pig saxophone hen clarinet bird "
    "trombone drum tuba harp cello harmonica"
).split()
_ANIMALS = frozenset("dog cat duck sheep horse pig hen bird".split())  # the rest are instruments
#: Files named other than `<class>.svg` / `<class>.ogg` (class -> file stem).
_DRAWINGS = {"flute": "flute_traversiere", "hen": "chicken", "bird": "owl", "drum": "drum_kit"}
_RECORDINGS = {**_DRAWINGS, "hen": "chickens"}
#: Melodic instruments: class, GM program, lowest MIDI pitch (melodies span two octaves from it).
_MELODIES = (
    "violin 40 55 trumpet 56 55 piano 0 48 accordion 21 53 flute 73 67 guitar 24 45 saxophone 65 52 "
    "clarinet 71 52 trombone 57 40 tuba 58 33 harp 46 48 cello 42 36 harmonica 22 60"
).split()
_MELODY_SPAN = 24


@dataclass(frozen=True)
class RealClassRow:
    """One line of the class table: where a class's drawing and recording are, and its melodies'
    GM program and pitch range (None: the class only plays its recording)."""

    name: str
    bundle: str
    prefix: str
    drawing: str
    recording: str
    melody: tuple[int, int, int] | None


def _class_rows() -> tuple[RealClassRow, ...]:
    melodies = {
        name: (int(program), int(low), int(low) + _MELODY_SPAN)
        for name, program, low in zip(_MELODIES[::3], _MELODIES[1::3], _MELODIES[2::3])
    }
    rows = []
    for name in _ORDER:
        bundle, prefix = _FARM if name in _ANIMALS else _INSTRUMENTS
        drawing, recording = _DRAWINGS.get(name, name), _RECORDINGS.get(name, name)
        rows.append(
            RealClassRow(
                name=name,
                bundle=bundle,
                prefix=prefix,
                drawing=f"{drawing}.svg",
                recording=f"{recording}.ogg",
                melody=melodies.get(name),
            )
        )
    return tuple(rows)


REAL_CLASSES: tuple[RealClassRow, ...] = _class_rows()
PACKAGES: tuple[str, ...] = ("gcompris-qt-data", "fluid-soundfont-gm", "fluidsynth", "librsvg2-bin")
#: Bump when real-asset trees change for the same options and packages (part of their cache key;
#: GENERATOR_VERSION also seeds the clips, so bumping it would change the synthetic trees too).
REAL_ASSETS_VERSION = 3

SPRITE_SIZE = 128  # drawings are rasterised once per class at this size
SPRITE_EXTENT = 0.7  # the drawing's square spans [-0.7, 0.7] of the object radius: it fits any tilt
RADIUS_SCALE = 1.8  # real objects are drawn 1.8x the synthetic radius (drawings do not fill their box)
MAX_TILT = 0.35  # radians; drawings lean by at most ~20 degrees (never upside down)
_ALPHA_THRESHOLD = 128  # mask = rasterised alpha >= 128 (the same pixels are painted)
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14, 16)
_NOTE_LENGTHS = (0.2, 0.25, 0.3, 0.4, 0.5)
_NOTE_FADE = 0.04  # seconds of fade-out at each melody note's end


@dataclass(frozen=True, eq=False)
class RealClassSpec(ClassIdentity):
    """One real-asset class (`index` counts SynthAVS classes; `avss_index` is its AVSS class): its
    drawing, and its melody notes and / or its recording (whichever `instrument_sounds` uses)."""

    drawing: dict[str, Any]  # bundle, member, licence
    sound: dict[str, Any]  # kind (melody | recording | mixed), and a "melody" and / or "recording" part
    sprite: np.ndarray = field(repr=False)  # uint8 [S, S, 4]
    recording: np.ndarray | None = field(repr=False, default=None)  # float64 [N] at SAMPLE_RATE
    notes: dict[int, np.ndarray] | None = field(repr=False, default=None)  # pitch -> float64 [M]

    def details(self) -> dict[str, Any]:
        return {"drawing": self.drawing, "sound": self.sound}


def _sound_kind(row: RealClassRow, instrument_sounds: str) -> str:
    """melody | recording | mixed: what a class plays (classes without a melody: their recording)."""
    return "recording" if row.melody is None else instrument_sounds


@lru_cache(maxsize=4)
def real_catalogue(
    num_classes: int, assets_dir: str | None, soundfont: str | None, instrument_sounds: str = "melody"
) -> tuple[RealClassSpec, ...]:
    """The first `num_classes` REAL_CLASSES, loaded from the packages (cached per process).
    `instrument_sounds`: melodic instruments play generated melodies (`melody`), cuts of their
    recording (`recording`) or either, drawn per instance (`mixed`)."""
    root = assets.asset_root(assets_dir)
    chosen = REAL_CLASSES[:num_classes]
    melodic = [
        (row.melody[0], pitch)
        for row in chosen
        if row.melody is not None and _sound_kind(row, instrument_sounds) != "recording"
        for pitch in range(row.melody[1], row.melody[2] + 1)
    ]
    assets.require_all(root, soundfont=soundfont, melodies=bool(melodic), pictures=False)
    font = assets.resolve_soundfont(root, soundfont) if melodic else None
    bank = assets.render_notes(font, melodic) if melodic else {}
    out = []
    for c, row in enumerate(chosen):
        archive = assets.rcc(assets.require_file(root, f"{assets.RCC_DIR}/{row.bundle}"))
        member = row.prefix + row.drawing
        sprite = assets.rasterise_svg(archive.read(member), SPRITE_SIZE, source=f"{archive.path}:{member}")
        drawing_info = {
            "bundle": str(archive.path),
            "member": member,
            **assets.licence_of("gcompris-qt-data", member.removeprefix("gcompris/"), root).describe(),
        }
        kind = _sound_kind(row, instrument_sounds)
        sound_info: dict[str, Any] = {"kind": kind}
        notes = recording = None
        if kind != "recording":
            program, low, high = row.melody
            sound_info["melody"] = {
                "gm_program": program,
                "pitch_range": [low, high],
                "soundfont": str(font),
                "renderer": "fluidsynth",
                **soundfont_licence(root, font, soundfont),
            }
            notes = {pitch: bank[(program, pitch)] for pitch in range(low, high + 1)}
        if kind != "melody":
            record_member = row.prefix + row.recording
            recording = assets.decode_recording(archive.read(record_member), source=f"{archive.path}:{record_member}")
            sound_info["recording"] = {
                "bundle": str(archive.path),
                "member": record_member,
                "seconds": round(len(recording) / SAMPLE_RATE, 3),
                **assets.licence_of("gcompris-qt-data", record_member.removeprefix("gcompris/"), root).describe(),
            }
        out.append(
            RealClassSpec(
                index=c,
                name=row.name,
                avss_index=AVSS_CLASSES.index(row.name),
                drawing=drawing_info,
                sound=sound_info,
                sprite=sprite,
                recording=recording,
                notes=notes,
            )
        )
    return tuple(out)


def _soundfont_package(root: Path, font: Path, soundfont: str | None) -> str | None:
    if soundfont is None:
        return "fluid-soundfont-gm"
    return assets.owning_package(font) if root == Path("/") else None


def soundfont_licence(root: Path, font: Path, soundfont: str | None) -> dict[str, str]:
    """Package, licence and copyright of the soundfont (from its package's copyright file)."""
    package = _soundfont_package(root, font, soundfont)
    if package is None:
        return {
            "package": "(not from a Debian package)",
            "file": str(font),
            "licence": "unknown: see the soundfont's own terms",
            "copyright": "unknown",
        }
    return assets.licence_of(package, font.name, root).describe()


def asset_versions(options: Mapping[str, Any]) -> dict[str, Any]:
    """Package versions (and the soundfont file) that a real tree with these resolved options is
    made from: part of its cache key."""
    root = assets.asset_root(options["assets_dir"])
    soundfont = options["soundfont"]
    melodies = options["instrument_sounds"] != "recording"
    assets.require_all(
        root, soundfont=soundfont, melodies=melodies, pictures=options["backgrounds"] in ("photo", "painting")
    )
    versions = {
        package: assets.package_version(package, root)
        for package in PACKAGES
        if melodies or package not in ("fluidsynth", "fluid-soundfont-gm")
    }
    out: dict[str, Any] = {"real_assets_version": REAL_ASSETS_VERSION, "packages": versions}
    if melodies:
        font = assets.resolve_soundfont(root, soundfont)
        package = _soundfont_package(root, font, soundfont)
        if package is not None and package not in versions:
            versions[package] = assets.package_version(package, root)
        out["soundfont"] = {**assets.describe_file(font), "package": package}
    return out


def paint_sprite(spec: RealClassSpec, u: np.ndarray, v: np.ndarray, brightness: float) -> tuple[np.ndarray, np.ndarray]:
    """Object-local coordinates (u, v) -> (inside bool, colour float32 [..., 3]): nearest pixel of
    the rasterised drawing; inside where its alpha >= 128."""
    size = spec.sprite.shape[0]
    col = np.floor((u / SPRITE_EXTENT + 1.0) * 0.5 * size).astype(np.int64)
    row = np.floor((v / SPRITE_EXTENT + 1.0) * 0.5 * size).astype(np.int64)
    valid = (col >= 0) & (col < size) & (row >= 0) & (row < size)
    texel = spec.sprite[np.clip(row, 0, size - 1), np.clip(col, 0, size - 1)]
    inside = valid & (texel[..., 3] >= _ALPHA_THRESHOLD)
    colour = texel[..., :3].astype(np.float32) / 255.0 * np.float32(brightness)
    return inside, colour


def real_signal(
    spec: RealClassSpec, rng: np.random.Generator, num_samples: int, log: list[dict[str, Any]]
) -> np.ndarray:
    """One instance's sound over the whole clip, RMS 1: float64 [num_samples]: a new melody, or
    cuts of the recording (class kind `mixed`: either, drawn per instance). What was played
    (melody notes, or recording cut) is appended to `log`."""
    use_melody = spec.notes is not None and (spec.recording is None or rng.random() < 0.5)
    signal = _melody(spec, rng, num_samples, log) if use_melody else _recording_cut(spec, rng, num_samples, log)
    return signal / max(float(np.sqrt(np.mean(signal**2))), 1e-9)


def _melody(spec: RealClassSpec, rng: np.random.Generator, num_samples: int, log: list[dict[str, Any]]) -> np.ndarray:
    """A pentatonic melody of the class's rendered notes, random lengths and velocities."""
    signal = np.zeros(num_samples)
    low, high = spec.sound["melody"]["pitch_range"]
    root = int(rng.integers(low, high - 16 + 1))
    degree = int(rng.integers(0, 4))
    played = []
    start = 0
    while start < num_samples:
        length = int(round(float(rng.choice(_NOTE_LENGTHS)) * SAMPLE_RATE))
        degree = int(np.clip(degree + rng.integers(-2, 3), 0, len(_PENTATONIC) - 1))
        pitch = root + _PENTATONIC[degree]
        note = spec.notes[pitch][:length].copy()
        fade = min(int(_NOTE_FADE * SAMPLE_RATE), len(note))
        note[len(note) - fade :] *= np.linspace(1.0, 0.0, fade)
        note *= rng.uniform(0.8, 1.0)
        end = min(start + len(note), num_samples)
        signal[start:end] += note[: end - start]
        played.append([pitch, round(start / SAMPLE_RATE, 4), round(length / SAMPLE_RATE, 4)])
        start += length
    log.append({"kind": "melody", "gm_program": spec.sound["melody"]["gm_program"], "notes": played})
    return signal


def _recording_cut(
    spec: RealClassSpec, rng: np.random.Generator, num_samples: int, log: list[dict[str, Any]]
) -> np.ndarray:
    """The recording pitch-shifted by up to two semitones (resampled), started at a random offset
    (time shift) and looped with short gaps, each repetition at its own gain (0 to -6 dB)."""
    recording = spec.recording
    semitones = float(rng.uniform(-2.0, 2.0))
    factor = 2.0 ** (semitones / 12.0)
    positions = np.arange(0.0, len(recording) - 1, factor)
    shifted = np.interp(positions, np.arange(len(recording)), recording)
    offset = int(rng.integers(0, len(shifted)))
    gains = [float(rng.uniform(-6.0, 0.0))]
    pieces, total = [shifted[offset:] * 10.0 ** (gains[0] / 20.0)], len(shifted) - offset
    while total < num_samples:
        gap = np.zeros(int(rng.uniform(0.02, 0.15) * SAMPLE_RATE))
        gains.append(float(rng.uniform(-6.0, 0.0)))
        pieces += [gap, shifted * 10.0 ** (gains[-1] / 20.0)]
        total += len(gap) + len(shifted)
    log.append(
        {
            "kind": "recording",
            "member": spec.sound["recording"]["member"],
            "pitch_semitones": round(semitones, 4),
            "offset_s": round(offset / SAMPLE_RATE, 4),
            "gains_db": [round(g, 3) for g in gains],
        }
    )
    return np.concatenate(pieces)[:num_samples]


def realistic_layout(layout: Any) -> Any:
    """The synthetic layout with drawings 1.8x larger and tilted by at most ~20 degrees."""
    return type(layout)(
        centre=layout.centre, radius=layout.radius * RADIUS_SCALE, angle=MAX_TILT * np.sin(layout.angle)
    )
