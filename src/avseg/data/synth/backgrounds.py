"""SynthAVS backgrounds of `assets=real`: a crop of a real picture (`photo`: the photographs of
gcompris-qt-data's "details" activity; `painting`: its paintings), the procedural texture of the
synthetic mode (`texture`) or one flat colour (`plain`).

Pictures are read from the installed package (or `assets_dir`) when a tree is generated, never
copied into the repository. Each clip draws its background from its own stream (seeded by the
clip, not by the clip's layout or sound stream): trees that differ only in `backgrounds=` have the
same objects, masks and audio.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from avseg.data.synth import assets
from avseg.data.synth.pictures import _background
from avseg.errors import DataError

BUNDLE = "details.rcc"
PREFIX = "gcompris/src/activities/details/resource/image/"
SUFFIX = "_background.webp"  # the whole picture (the activity's other files are cut-out details)
#: The pictures of the bundle that are paintings (Vincent van Gogh); every other one is a photograph.
PAINTINGS: frozenset[str] = frozenset(
    {
        "Eglise_dAuvers-sur-Oise",
        "Gogh4",
        "PortraitOfPereTanguy",
        "Van_Gogh_The_Night_Cafe",
        "VincentVanGogh0012",
        "VincentVanGogh0013",
        "VincentVanGogh0019",
        "VincentVanGoghBridge",
    }
)
MIN_CROP = 0.5  # a crop's side is 50-100 % of the picture's shorter side
_STREAM = 104729  # the background stream's last seed word (apart from the clip's other streams)


@dataclass(frozen=True, eq=False)
class Picture:
    """One background picture of the package: `pixels` uint8 [H, W, 3]."""

    name: str
    kind: str  # photo | painting
    member: str
    source: dict[str, Any] = field(repr=False)  # bundle, member, package, version, licence, copyright
    pixels: np.ndarray = field(repr=False)


@lru_cache(maxsize=2)
def pictures(assets_dir: str | None) -> tuple[Picture, ...]:
    """Every background picture of the package, decoded (cached per process)."""
    root = assets.asset_root(assets_dir)
    archive = assets.rcc(assets.require_file(root, f"{assets.RCC_DIR}/{BUNDLE}"))
    version = assets.package_version("gcompris-qt-data", root)
    out = []
    for member in archive.names():
        if not (member.startswith(PREFIX) and member.endswith(SUFFIX)):
            continue
        name = member[len(PREFIX) : -len(SUFFIX)]
        try:
            pixels = np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("RGB"))
        except OSError as err:
            raise DataError(f"{archive.path}:{member}", f"cannot decode the picture: {err}") from err
        licence = assets.licence_of("gcompris-qt-data", member.removeprefix("gcompris/"), root).describe()
        licence["version"] = version
        out.append(
            Picture(
                name=name,
                kind="painting" if name in PAINTINGS else "photo",
                member=member,
                source={"bundle": str(archive.path), "member": member, **licence},
                pixels=pixels,
            )
        )
    return tuple(out)


def pictures_of(kind: str, assets_dir: str | None) -> tuple[Picture, ...]:
    chosen = tuple(p for p in pictures(assets_dir) if p.kind == kind)
    if not chosen:
        root = assets.asset_root(assets_dir)
        raise assets.missing_error("gcompris-qt-data", f"{kind} pictures {PREFIX}*{SUFFIX} in {root / assets.RCC_DIR}")
    return chosen


def background_rng(options: dict[str, Any] | Any, subset_code: int, split_code: int, index: int) -> np.random.Generator:
    return np.random.default_rng([options["seed"], subset_code, split_code, index, _STREAM])


def real_background(
    kind: str, rng: np.random.Generator, size: int, assets_dir: str | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A clip's background of `kind` and what it is: float32 [size, size, 3] in [0, 1], and the
    sidecar's record (picture and crop box in its pixels, or the colour)."""
    if kind == "texture":
        return _background(rng, size), {"kind": kind}
    if kind == "plain":
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.75))
        colour = np.round(np.asarray(rgb) * 255.0) / 255.0
        image = np.broadcast_to(colour.astype(np.float32), (size, size, 3)).copy()
        return image, {"kind": kind, "colour": [int(round(255 * c)) for c in colour]}
    choices = pictures_of(kind, assets_dir)
    picture = choices[int(rng.integers(len(choices)))]
    height, width = picture.pixels.shape[:2]
    side = int(round(min(height, width) * rng.uniform(MIN_CROP, 1.0)))
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    flip = bool(rng.random() < 0.5)
    crop = Image.fromarray(picture.pixels[y0 : y0 + side, x0 : x0 + side])
    resized = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    if flip:
        resized = resized[:, ::-1]
    record = {"kind": kind, "picture": picture.name, "box": [x0, y0, x0 + side, y0 + side], "flipped": flip}
    return resized.astype(np.float32) / 255.0, record


def background_sources(kind: str, assets_dir: str | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The sidecar's `backgrounds`: the kind, its clip count and, for pictures, each picture's
    source (bundle, member, package, licence, copyright) with how many clips use it."""
    summary: dict[str, Any] = {"kind": kind, "clips": len(records)}
    if kind in ("photo", "painting"):
        used: dict[str, int] = {}
        for record in records:
            used[record["picture"]] = used.get(record["picture"], 0) + 1
        summary["pictures"] = [
            {"name": p.name, **p.source, "clips": used.get(p.name, 0)} for p in pictures_of(kind, assets_dir)
        ]
    return summary
