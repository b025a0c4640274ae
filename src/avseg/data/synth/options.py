"""SynthAVS options: the subsets, splits and clip counts, option defaults and validation, the cache
key of a set of options and the default cache folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avseg.data.layout import LAYOUTS
from avseg.data.layout import SPLITS as LAYOUT_SPLITS
from avseg.data.layout import SUBSETS as LAYOUT_SUBSETS
from avseg.data.palette import NUM_AVSS_CLASSES
from avseg.errors import ConfigError

# Bump whenever the generated content changes for the same options: old cached trees are rebuilt.
GENERATOR_VERSION = 1

SAMPLE_RATE = 16000
# The subsets, splits and AVSS clip kinds are those of avseg.data.layout (their order seeds the clips).
SUBSETS: tuple[str, ...] = LAYOUT_SUBSETS
SPLITS: tuple[str, ...] = LAYOUT_SPLITS
AVSS_KINDS: tuple[str, ...] = tuple(LAYOUTS["avss"].clip_kinds)
KIND_FRAMES: dict[str, int] = dict(LAYOUTS["avss"].clip_kinds)
SIDECAR_NAME = "synth_sources.json"
COMPLETE_MARKER = ".synth_complete"

DEFAULT_CLIPS: dict[str, dict[str, int]] = {
    "s4": {"train": 160, "val": 32, "test": 32},
    "ms3": {"train": 160, "val": 32, "test": 32},
    # AVSS clips cycle v1s, v1m, v2: 48 of each kind in train, 10 or 11 in val and test.
    "avss": {"train": 144, "val": 32, "test": 32},
}


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
    "assets": "synthetic",  # synthetic | real (drawings and sounds from Debian packages, real.py)
    "soundfont": None,  # real: a .sf2 for the melodies (None: fluid-soundfont-gm's FluidR3_GM)
    "assets_dir": None,  # real: a folder of extracted packages (None: the installed ones, `/`)
    "backgrounds": None,  # real: photo | painting | texture | plain (None: photo)
    "instrument_sounds": None,  # real: melody | recording | mixed (None: melody)
}
ASSET_MODES: tuple[str, ...] = ("synthetic", "real")
#: Choices of the real mode's options (the first is the default); synthetic trees take none of them.
REAL_CHOICES: dict[str, tuple[str, ...]] = {
    "backgrounds": ("photo", "painting", "texture", "plain"),
    "instrument_sounds": ("melody", "recording", "mixed"),
}
MAX_REAL_CLASSES = 22  # len(real.REAL_CLASSES) (checked by the tests)


def resolve_options(subset: str, **options: Any) -> dict[str, Any]:
    """All generation options with defaults filled in, validated, as plain JSON-able values.

    Accepts plain Python values as well as OmegaConf containers (any Mapping / Sequence).
    Raises ConfigError naming the key and the allowed values.
    """
    if subset not in SUBSETS:
        raise ConfigError(f"subset: {subset!r} is not one of {list(SUBSETS)}")
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"synth options: unknown key(s) {unknown}; allowed: {sorted(_OPTION_DEFAULTS)}")
    merged = {**_OPTION_DEFAULTS, **options}

    def as_int(key: str, low: int, high: int | None = None) -> int:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key}: {value} is out of range; allowed: {bound}")
        return int(value)

    assets = merged["assets"]
    if assets not in ASSET_MODES:
        raise ConfigError(f"assets: {assets!r} is not one of {list(ASSET_MODES)}")
    real_only: dict[str, str | None] = {}
    for key in ("soundfont", "assets_dir"):
        value = merged[key]
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{key}: expected a path or null, got {value!r}")
        if value is not None and assets != "real":
            raise ConfigError(f"{key}: only used with assets=real (got assets={assets})")
        real_only[key] = None if value is None else os.fspath(value)
    for key, choices in REAL_CHOICES.items():
        value = merged[key]
        if value is not None and assets != "real":
            raise ConfigError(f"{key}: only used with assets=real (got assets={assets})")
        if value is not None and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        real_only[key] = choices[0] if value is None else str(value)

    seed = as_int("seed", 0)
    image_size = as_int("image_size", 32, 4096)
    num_classes = as_int("num_classes", 2, MAX_REAL_CLASSES if assets == "real" else NUM_AVSS_CLASSES - 1)
    max_objects = as_int("max_objects", 1, 4)
    jpeg_quality = as_int("jpeg_quality", 1, 100)

    clips = merged["clips_per_split"]
    if clips is None:
        clips = DEFAULT_CLIPS[subset]
    if not isinstance(clips, Mapping) or set(clips) != set(SPLITS):
        raise ConfigError(f"clips_per_split: expected a mapping with exactly the keys {list(SPLITS)}, got {clips!r}")
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
        raise ConfigError("write_pkl: AVSS ships no pickled log-mel (docs/DATA.md); allowed: false")

    distractor_prob = merged["distractor_prob"]
    if isinstance(distractor_prob, bool) or not isinstance(distractor_prob, (int, float)):
        raise ConfigError(f"distractor_prob: expected a number in [0, 1], got {distractor_prob!r}")
    if not 0.0 <= float(distractor_prob) <= 1.0:
        raise ConfigError(f"distractor_prob: {distractor_prob} is out of range; allowed: [0, 1]")

    multi_source = subset in ("ms3", "avss")
    if multi_source and max_objects < 2:
        raise ConfigError(f"max_objects: {subset} clips mix 2-3 sources; allowed: 2..4")
    resolved = {
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
    if assets == "real":  # synthetic trees keep exactly their former options (and cache keys)
        resolved.update(assets=assets, **real_only)
    return resolved


def cache_key(subset: str, resolved: Mapping[str, Any]) -> str:
    """Hash of the generator version, the subset and every (resolved) option (real assets: also the
    package versions and the soundfont file)."""
    content: dict[str, Any] = {"generator_version": GENERATOR_VERSION, "subset": subset, "options": dict(resolved)}
    if resolved.get("assets") == "real":  # a new package version or soundfont gives a new tree
        from avseg.data.synth.real import asset_versions

        content["assets"] = asset_versions(resolved)
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Where generated trees live: `$AVSEG_CACHE/synth`, else `~/.cache/avseg/synth` (the same
    folder as the `synth_*` data configs' `${paths.cache_dir}/synth`). Never in a data tree."""
    if os.environ.get("AVSEG_CACHE"):
        return Path(os.environ["AVSEG_CACHE"]) / "synth"
    return Path(os.path.expanduser("~")) / ".cache" / "avseg" / "synth"
