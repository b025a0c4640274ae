"""SynthAVS `assets=real`: classes whose pictures are real drawings and whose sounds are real.

Each class is an AVSS class that Debian's gcompris-qt-data draws (SVG, rasterised by rsvg-convert:
the drawing's alpha is the object's exact mask) and either plays (musical instruments: a new melody
per instance, rendered note by note from a General MIDI program of a soundfont by fluidsynth) or
records (animals and the drum kit: cuts of the package's .ogg recording, pitch-shifted by up to two
semitones, time-shifted and looped with short gaps). The generator, layouts, sidecar, determinism,
cache and checker are those of the synthetic mode; only the painting and the class signals change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from avseg.data.palette import AVSS_CLASSES
from avseg.data.synth import assets
from avseg.data.synth.options import SAMPLE_RATE

_INSTRUMENTS = ("instruments.rcc", "gcompris/src/activities/instruments/resource/")
_ANIMALS = ("explore_farm_animals.rcc", "gcompris/src/activities/explore_farm_animals/resource/animals/")

#: (AVSS class, bundle, drawing, sound): sound is ("melody", GM program, lowest, highest MIDI pitch)
#: or ("recording", file in the same bundle). Instruments and animals alternate, so any first
#: `num_classes` entries mix both kinds; the first eight look unlike each other (the cello, the
#: violin's look-alike at random scales, comes later).
REAL_CLASSES: tuple[tuple[str, tuple[str, str], str, tuple[Any, ...]], ...] = (
    ("violin", _INSTRUMENTS, "violin.svg", ("melody", 40, 55, 79)),
    ("dog", _ANIMALS, "dog.svg", ("recording", "dog.ogg")),
    ("trumpet", _INSTRUMENTS, "trumpet.svg", ("melody", 56, 55, 79)),
    ("cat", _ANIMALS, "cat.svg", ("recording", "cat.ogg")),
    ("piano", _INSTRUMENTS, "piano.svg", ("melody", 0, 48, 72)),
    ("duck", _ANIMALS, "duck.svg", ("recording", "duck.ogg")),
    ("accordion", _INSTRUMENTS, "accordion.svg", ("melody", 21, 53, 77)),
    ("sheep", _ANIMALS, "sheep.svg", ("recording", "sheep.ogg")),
    ("flute", _INSTRUMENTS, "flute_traversiere.svg", ("melody", 73, 67, 91)),
    ("horse", _ANIMALS, "horse.svg", ("recording", "horse.ogg")),
    ("guitar", _INSTRUMENTS, "guitar.svg", ("melody", 24, 45, 69)),
    ("pig", _ANIMALS, "pig.svg", ("recording", "pig.ogg")),
    ("saxophone", _INSTRUMENTS, "saxophone.svg", ("melody", 65, 52, 76)),
    ("hen", _ANIMALS, "chicken.svg", ("recording", "chickens.ogg")),
    ("clarinet", _INSTRUMENTS, "clarinet.svg", ("melody", 71, 52, 76)),
    ("bird", _ANIMALS, "owl.svg", ("recording", "owl.ogg")),
    ("trombone", _INSTRUMENTS, "trombone.svg", ("melody", 57, 40, 64)),
    ("drum", _INSTRUMENTS, "drum_kit.svg", ("recording", "drum_kit.ogg")),
    ("tuba", _INSTRUMENTS, "tuba.svg", ("melody", 58, 33, 57)),
    ("harp", _INSTRUMENTS, "harp.svg", ("melody", 46, 48, 72)),
    ("cello", _INSTRUMENTS, "cello.svg", ("melody", 42, 36, 60)),
    ("harmonica", _INSTRUMENTS, "harmonica.svg", ("melody", 22, 60, 84)),
)
PACKAGES: tuple[str, ...] = ("gcompris-qt-data", "fluid-soundfont-gm", "fluidsynth", "librsvg2-bin")
#: Bump when real-asset trees change for the same options and packages (part of their cache key;
#: GENERATOR_VERSION also seeds the clips, so bumping it would change the synthetic trees too).
REAL_ASSETS_VERSION = 2

SPRITE_SIZE = 128  # drawings are rasterised once per class at this size
SPRITE_EXTENT = 0.7  # the drawing's square spans [-0.7, 0.7] of the object radius: it fits any tilt
RADIUS_SCALE = 1.8  # real objects are drawn 1.8x the synthetic radius (drawings do not fill their box)
MAX_TILT = 0.35  # radians; drawings lean by at most ~20 degrees (never upside down)
_ALPHA_THRESHOLD = 128  # mask = rasterised alpha >= 128 (the same pixels are painted)
_PENTATONIC = (0, 2, 4, 7, 9, 12, 14, 16)
_NOTE_LENGTHS = (0.2, 0.25, 0.3, 0.4, 0.5)
_NOTE_FADE = 0.04  # seconds of fade-out at each melody note's end


@dataclass(frozen=True, eq=False)
class RealClassSpec:
    """One real-asset class. `index` counts SynthAVS classes; `avss_index` is its AVSS class."""

    index: int
    name: str
    avss_index: int
    drawing: dict[str, Any]  # bundle, member, licence
    sound: dict[str, Any]  # kind, program/range or recording, licence
    sprite: np.ndarray = field(repr=False)  # uint8 [S, S, 4]
    recording: np.ndarray | None = field(repr=False, default=None)  # float64 [N] at SAMPLE_RATE
    notes: dict[int, np.ndarray] | None = field(repr=False, default=None)  # pitch -> float64 [M]

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "avss_index": self.avss_index,
            "drawing": self.drawing,
            "sound": self.sound,
        }


@lru_cache(maxsize=4)
def real_catalogue(num_classes: int, assets_dir: str | None, soundfont: str | None) -> tuple[RealClassSpec, ...]:
    """The first `num_classes` REAL_CLASSES, loaded from the packages (cached per process)."""
    root = assets.asset_root(assets_dir)
    chosen = REAL_CLASSES[:num_classes]
    melodic = [
        (spec[3][1], pitch) for spec in chosen if spec[3][0] == "melody" for pitch in range(spec[3][2], spec[3][3] + 1)
    ]
    assets.require_all(root, soundfont=soundfont, melodies=bool(melodic))
    font = assets.resolve_soundfont(root, soundfont) if melodic else None
    bank = assets.render_notes(font, melodic) if melodic else {}
    out = []
    for c, (name, (bundle, prefix), drawing, sound) in enumerate(chosen):
        archive = assets.rcc(assets.require_file(root, f"{assets.RCC_DIR}/{bundle}"))
        member = prefix + drawing
        source_path = member.removeprefix("gcompris/")
        sprite = assets.rasterise_svg(archive.read(member), SPRITE_SIZE, source=f"{archive.path}:{member}")
        drawing_info = {
            "bundle": str(archive.path),
            "member": member,
            **assets.licence_of("gcompris-qt-data", source_path, root).describe(),
        }
        if sound[0] == "melody":
            _, program, low, high = sound
            sound_info = {
                "kind": "melody",
                "gm_program": program,
                "pitch_range": [low, high],
                "soundfont": str(font),
                "renderer": "fluidsynth",
                **soundfont_licence(root, font, soundfont),
            }
            notes = {pitch: bank[(program, pitch)] for pitch in range(low, high + 1)}
            recording = None
        else:
            record_member = prefix + sound[1]
            recording = assets.decode_recording(archive.read(record_member), source=f"{archive.path}:{record_member}")
            sound_info = {
                "kind": "recording",
                "bundle": str(archive.path),
                "member": record_member,
                "seconds": round(len(recording) / SAMPLE_RATE, 3),
                **assets.licence_of("gcompris-qt-data", record_member.removeprefix("gcompris/"), root).describe(),
            }
            notes = None
        out.append(
            RealClassSpec(
                index=c,
                name=name,
                avss_index=AVSS_CLASSES.index(name),
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


def asset_versions(assets_dir: str | None, soundfont: str | None) -> dict[str, Any]:
    """Package versions (and the soundfont file) that a real tree is made from: part of its cache key."""
    root = assets.asset_root(assets_dir)
    assets.require_all(root, soundfont=soundfont)
    versions = {package: assets.package_version(package, root) for package in PACKAGES}
    font = assets.resolve_soundfont(root, soundfont)
    package = _soundfont_package(root, font, soundfont)
    if package is not None and package not in versions:
        versions[package] = assets.package_version(package, root)
    return {
        "real_assets_version": REAL_ASSETS_VERSION,
        "packages": versions,
        "soundfont": {**assets.describe_file(font), "package": package},
    }


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
    """One instance's sound over the whole clip, RMS 1: float64 [num_samples]. What was played
    (melody notes, or recording cut) is appended to `log`."""
    signal = np.zeros(num_samples)
    if spec.notes is not None:
        low, high = spec.sound["pitch_range"]
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
        log.append({"kind": "melody", "gm_program": spec.sound["gm_program"], "notes": played})
    else:
        recording = spec.recording
        semitones = float(rng.uniform(-2.0, 2.0))
        factor = 2.0 ** (semitones / 12.0)
        positions = np.arange(0.0, len(recording) - 1, factor)
        shifted = np.interp(positions, np.arange(len(recording)), recording)
        offset = int(rng.integers(0, len(shifted)))
        pieces, total = [shifted[offset:]], len(shifted) - offset
        while total < num_samples:
            gap = np.zeros(int(rng.uniform(0.02, 0.15) * SAMPLE_RATE))
            pieces += [gap, shifted]
            total += len(gap) + len(shifted)
        signal = np.concatenate(pieces)[:num_samples]
        log.append(
            {
                "kind": "recording",
                "member": spec.sound["member"],
                "pitch_semitones": round(semitones, 4),
                "offset_s": round(offset / SAMPLE_RATE, 4),
            }
        )
    return signal / max(float(np.sqrt(np.mean(signal**2))), 1e-9)


def realistic_layout(layout: Any) -> Any:
    """The synthetic layout with drawings 1.8x larger and tilted by at most ~20 degrees."""
    return type(layout)(
        centre=layout.centre, radius=layout.radius * RADIUS_SCALE, angle=MAX_TILT * np.sin(layout.angle)
    )
