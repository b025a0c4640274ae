"""SynthAVS pictures: shapes, textures, backgrounds, object motion and the renderer that draws a
clip's frames and its per-pixel instance maps (after occlusion)."""

from __future__ import annotations

import colorsys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from avseg.data.synth.classes import ClassSpec


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
        shade += 0.05 * np.sin(2.0 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase).astype(
            np.float32
        )
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


def _paint_shape(spec: ClassSpec, u: np.ndarray, v: np.ndarray, brightness: float) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic object at local coordinates (u, v): (inside bool, colour float32 [..., 3])."""
    inside = _shape_mask(spec.shape, u, v)
    bright = _texture_mask(spec.texture, u, v)
    shade = (1.0 - 0.18 * np.minimum(u * u + v * v, 1.0)) * brightness
    colour = (
        np.where(
            bright[..., None],
            np.asarray(spec.colour, dtype=np.float32) / 255.0,
            np.asarray(spec.colour_dark, dtype=np.float32) / 255.0,
        )
        * shade[..., None]
    )
    return inside, colour


Painter = Callable[[Any, np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]


def _render(
    layout: _Layout,
    classes: Sequence[Any],
    brightness: np.ndarray,
    background: np.ndarray,
    paint: Painter = _paint_shape,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw the clip, objects back to front (object 0 furthest back); `paint` gives each object's
    inside-test and colours at its local coordinates (shapes, or real drawings).

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
            inside, colour = paint(spec, u, v, brightness[j])
            areas[j, t] = inside.sum()
            patch = canvas[y0:y1, x0:x1]
            patch[inside] = colour[inside]
            instances[t, y0:y1, x0:x1][inside] = j + 1
        frames[t] = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return frames, instances, areas
