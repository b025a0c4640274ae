"""SynthAVS: a generated audio-visual segmentation dataset in the exact AVSBench layouts.

Every clip shows 1-4 objects of `num_classes` classes on a textured background, moving smoothly.
Each class has a visual identity (shape, colour, texture) and a sound identity (pitch, timbre,
amplitude pattern). Per second some objects sound and the rest are silent distractors of classes
that sound in other clips, so the picture alone does not say which object to segment: a model
that ignores the audio cannot solve it (docs/SYNTHAVS.md).

Layouts (docs/DATA.md): `s4` (one sounding object, the same all clip long), `ms3` (two or three
sources, status changing per second), `avss` (class-colour masks; clip kinds v1s / v1m / v2).
The sidecar `<root>/synth_sources.json` records, per clip and second, which objects sound.

Deterministic: every clip draws from its own numpy Generator seeded by (seed, subset, split,
clip index); images are PNG/JPEG written by PIL with fixed parameters; no file holds a time.

Command line:
    python -m avseg.data.synth out=PATH subset=s4|ms3|avss [key=value ...]
    python -m avseg.data.synth            # all three subsets into the cache folder, printed

Rooms: `options` (subsets, defaults, validation, cache key), `classes` (visual and sound
identities), `pictures` (shapes, textures, backgrounds, motion, rendering), `sounds` (class signals,
gating, noise, mixing), `clips` (what one clip shows and plays), `layouts` (the official file layouts,
metadata and sidecar), `tree` (all-or-nothing generation and the cache), `cli` (the command line);
`assets=real` (docs/SYNTHAVS.md "Real assets"): `real` (the classes made of real drawings and sounds),
`backgrounds` (crops of the package's photographs or paintings, or a texture or a flat colour),
`assets` (the Debian packages: versions, licences, rasterising, decoding, soundfont rendering) and
`rcc` (a reader of Qt resource bundles, where gcompris-qt-data keeps its files).
"""

from avseg.data.synth.classes import AMPLITUDES, SHAPES, TEXTURES, TIMBRES, ClassSpec, class_catalogue
from avseg.data.synth.cli import main
from avseg.data.synth.clips import ClipPlan, plan_clip
from avseg.data.synth.layouts import avss_uid, catalogue_for
from avseg.data.synth.options import (
    AVSS_KINDS,
    COMPLETE_MARKER,
    DEFAULT_CLIPS,
    GENERATOR_VERSION,
    KIND_FRAMES,
    SAMPLE_RATE,
    SIDECAR_NAME,
    SPLITS,
    SUBSETS,
    cache_key,
    default_cache_dir,
    resolve_options,
)
from avseg.data.synth.tree import ensure_synth_tree, generate, is_complete

__all__ = [
    "AMPLITUDES",
    "AVSS_KINDS",
    "COMPLETE_MARKER",
    "DEFAULT_CLIPS",
    "GENERATOR_VERSION",
    "KIND_FRAMES",
    "SAMPLE_RATE",
    "SHAPES",
    "SIDECAR_NAME",
    "SPLITS",
    "SUBSETS",
    "TEXTURES",
    "TIMBRES",
    "ClassSpec",
    "ClipPlan",
    "avss_uid",
    "cache_key",
    "catalogue_for",
    "class_catalogue",
    "default_cache_dir",
    "ensure_synth_tree",
    "generate",
    "is_complete",
    "main",
    "plan_clip",
    "resolve_options",
]
