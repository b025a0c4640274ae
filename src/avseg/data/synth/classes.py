"""SynthAVS classes: each class's visual identity (shape, texture, colour) and sound identity
(pitch, timbre, amplitude pattern), named after AVSS classes."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

from avseg.data.palette import AVSS_CLASSES, NUM_AVSS_CLASSES

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "ring",
    "cross",
    "star",
    "hexagon",
    "ellipse",
    "crescent",
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "rings")
TIMBRES: tuple[str, ...] = ("harmonic", "square", "noise_band", "vibrato")
AMPLITUDES: tuple[str, ...] = ("steady", "pulsed", "tremolo")

_MIN_F0_HZ = 200.0
_MAX_F0_HZ = 3200.0


@dataclass(frozen=True)
class ClassIdentity:
    """What every SynthAVS class has (synthetic or real): `index` counts SynthAVS classes,
    `avss_index` is its AVSS class. Subclasses add what they are made of in `details()`."""

    index: int
    name: str
    avss_index: int

    def details(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        """The sidecar's record of the class."""
        return {"index": self.index, "name": self.name, "avss_index": self.avss_index, **self.details()}


@dataclass(frozen=True)
class ClassSpec(ClassIdentity):
    """One synthetic class: its visual identity (shape, texture, colours) and sound identity."""

    shape: str
    texture: str
    colour: tuple[int, int, int]
    colour_dark: tuple[int, int, int]
    f0_hz: float
    timbre: str
    amplitude: str
    pulse_hz: float

    def details(self) -> dict[str, Any]:
        return {
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
