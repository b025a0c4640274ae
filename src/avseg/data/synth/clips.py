"""SynthAVS clip composition: which classes appear, which of them sound in which second, where they
move, and the clip's frames, instance maps and audio (a ClipPlan), from the clip's own seed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from avseg.data.layout import LAYOUTS
from avseg.data.synth.backgrounds import background_rng, real_background
from avseg.data.synth.options import AVSS_KINDS, GENERATOR_VERSION, KIND_FRAMES, SAMPLE_RATE, SPLITS, SUBSETS
from avseg.data.synth.pictures import _background, _render, _sample_layout
from avseg.data.synth.real import RealClassSpec, paint_sprite, real_signal, realistic_layout
from avseg.data.synth.sounds import _mix_audio
from avseg.errors import ConfigError

_MIN_VISIBLE_FRACTION = 0.3  # of an object's own area, in every frame (else the layout is redrawn)


@dataclass
class ClipPlan:
    """What one clip shows and plays. Objects are listed back to front."""

    clip_id: str
    split: str
    kind: str  # "s4", "ms3", or an AVSS label: "v1s" / "v1m" / "v2"
    classes: list[Any]  # ClassSpec, or real.RealClassSpec with assets=real
    sounding: np.ndarray  # bool [n_objects, T]
    snr_db: float
    frames: np.ndarray  # uint8 [T, H, W, 3]
    instances: np.ndarray  # uint8 [T, H, W]
    audio: np.ndarray  # int16 [T * SR]
    # assets=real only: each object's sound before the final scaling, float32 [n_objects, T * SR]
    # (zeros for silent objects), and what each sounding object played (the sidecar's `sound`).
    stems: np.ndarray | None = None
    sources: list[dict[str, Any] | None] | None = None
    background: dict[str, Any] | None = None  # assets=real: what the background is (backgrounds.py)

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
    catalogue: Sequence[Any],
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
    if subset in ("s4", "ms3"):
        kind, num_frames = subset, LAYOUTS[subset].num_frames
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

    real = options.get("assets") == "real"
    if any(isinstance(spec, RealClassSpec) != real for spec in catalogue):
        raise ConfigError(
            f"plan_clip: the options say assets={options.get('assets', 'synthetic')} but the catalogue holds "
            "other classes; build it with avseg.data.synth.catalogue_for(options)"
        )
    size = options["image_size"]
    background_record = None
    if real:  # its own stream: the backgrounds= choice changes nothing else in the clip
        background, background_record = real_background(
            options["backgrounds"], background_rng(options, subset_code, split_code, index), size, options["assets_dir"]
        )
    else:
        background = _background(rng, size)
    brightness = rng.uniform(0.9, 1.1, size=len(classes))
    for _attempt in range(20):
        layout = _sample_layout(rng, len(classes), num_frames, size)
        if real:
            frames, instances, areas = _render(realistic_layout(layout), classes, brightness, background, paint_sprite)
        else:
            frames, instances, areas = _render(layout, classes, brightness, background)
        visible = np.stack([(instances == j + 1).sum(axis=(1, 2)) for j in range(len(classes))])
        if np.all(visible >= _MIN_VISIBLE_FRACTION * np.maximum(areas, 1.0)):
            break
    snr_low, snr_high = options["snr_db"]
    snr_db = float(rng.uniform(snr_low, snr_high))
    stems = sources = None
    if real:
        stems = np.zeros((len(classes), num_frames * SAMPLE_RATE))
        log: list[dict[str, Any]] = []

        def signal(spec: Any, generator: np.random.Generator, num_samples: int) -> np.ndarray:
            return real_signal(spec, generator, num_samples, log)

        audio = _mix_audio(rng, classes, sounding, snr_db, signal=signal, stems=stems)
        played = iter(log)  # one entry per sounding object, in object order
        sources = [next(played) if sounding[j].any() else None for j in range(len(classes))]
        stems = stems.astype(np.float32)
    else:
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
        stems=stems,
        sources=sources,
        background=background_record,
    )
