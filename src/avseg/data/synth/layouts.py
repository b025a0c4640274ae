"""SynthAVS layouts: writing a clip's frames, masks, audio (and pickle) in the official AVSBench
layouts (s4, ms3, avss), the metadata CSV / JSON files and the sidecar of true sources."""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avseg.data.layout import LAYOUTS, SubsetLayout
from avseg.data.palette import label2idx_json, voc_colormap
from avseg.data.synth.classes import class_catalogue
from avseg.data.synth.clips import ClipPlan, plan_clip
from avseg.data.synth.options import GENERATOR_VERSION, SAMPLE_RATE, SIDECAR_NAME, SPLITS, SUBSETS
from avseg.data.synth.sounds import _wav_bytes

_PNG_COMPRESS_LEVEL = 1  # fast; any fixed level gives identical bytes run to run


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


def _pickle_log_mel(samples: np.ndarray, layout: SubsetLayout) -> bytes:
    """The official `.pkl`: a pickled float tensor [T, 1, 96, 64] saved with requires_grad, as
    the official preprocessing left it (docs/DATA.md), from the quantised WAV samples."""
    import torch  # only when pickles are wanted

    from avseg.data.audio import fit_examples, log_mel_examples

    waveform = samples.astype(np.float32) / 32768.0
    # These tensors are tiny: intra-op threads only add overhead (6x slower measured on a busy
    # 2-core machine), so this runs single-threaded and restores the caller's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        examples = fit_examples(log_mel_examples(waveform, SAMPLE_RATE), layout.num_frames, layout.fit_mode)
    finally:
        torch.set_num_threads(threads)
    return pickle.dumps(examples.clone().requires_grad_(True), protocol=pickle.DEFAULT_PROTOCOL)


def _binary_mask(plan: ClipPlan, t: int) -> bytes:
    return _png_bytes(np.where(plan.sounding_mask(t), 255, 0).astype(np.uint8), "L")


def _s4_category(plan: ClipPlan) -> str:
    """An S4 clip's category: the class of its (single) source sounding in the first second."""
    return plan.classes[int(np.flatnonzero(plan.sounding[:, 0])[0])].name


def _layout_row(subset: str, plan: ClipPlan) -> dict[str, str]:
    """The CSV columns `SubsetLayout.clip_files` reads, for one planned clip."""
    if subset == "s4":
        return {"name": plan.clip_id, "category": _s4_category(plan), "split": plan.split}
    if subset == "ms3":
        return {"name": plan.clip_id, "split": plan.split}
    return {"uid": avss_uid(plan.clip_id), "label": plan.kind, "split": plan.split}


def _write_clip(root: Path, subset: str, plan: ClipPlan, options: Mapping[str, Any]) -> None:
    """Write one clip's frames, masks, audio (and pickle) in the subset's official layout
    (`avseg.data.layout`)."""
    layout = LAYOUTS[subset]
    files = layout.clip_files(_layout_row(subset, plan), with_pkl=bool(options["write_pkl"]))
    assert len(files.frames) == plan.num_frames, (subset, plan.kind, plan.num_frames)
    if layout.semantic:
        colours = voc_colormap(layout.num_mask_classes)
        for t, rel in enumerate(files.frames):
            _write(root / rel, _jpeg_bytes(plan.frames[t], options["jpeg_quality"]))
        for t, (rgb_rel, index_rel) in enumerate(zip(files.masks, files.semantic_masks)):
            if rgb_rel is None or index_rel is None:
                continue
            semantic = plan.semantic_mask(t)
            _write(root / rgb_rel, _png_bytes(colours[semantic], "RGB"))
            _write(root / index_rel, _png_bytes(semantic, "L"))
    else:
        for t, rel in enumerate(files.frames):
            _write(root / rel, _png_bytes(plan.frames[t], "RGB"))
        for t, mask_rel in enumerate(files.masks):
            if mask_rel is not None:
                _write(root / mask_rel, _binary_mask(plan, t))
    _write(root / files.wav, _wav_bytes(plan.audio))
    if files.pkl is not None:
        _write(root / files.pkl, _pickle_log_mel(plan.audio, layout))


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
    objects = [
        {"instance": j, "class": spec.name, "class_index": spec.index, "avss_index": spec.avss_index}
        for j, spec in enumerate(plan.classes)
    ]
    if plan.sources is not None:  # assets=real: what each sounding object played, None if silent
        for entry, source in zip(objects, plan.sources):
            entry["sound"] = source
    entry = {
        "split": plan.split,
        "kind": plan.kind,
        "num_frames": plan.num_frames,
        "snr_db": round(plan.snr_db, 4),
        "objects": objects,
        "sounding": seconds,
    }
    if plan.background is not None:
        entry["background"] = plan.background
    return entry


def catalogue_for(options: Mapping[str, Any]) -> Sequence[Any]:
    """The classes of a tree: synthetic shapes and tones, or real drawings and sounds."""
    if options.get("assets") == "real":
        from avseg.data.synth.real import real_catalogue

        return real_catalogue(
            options["num_classes"], options["assets_dir"], options["soundfont"], options["instrument_sounds"]
        )
    return class_catalogue(options["num_classes"])


def _write_tree(root: Path, subset: str, options: Mapping[str, Any]) -> None:
    """Generate every clip into `root` (a fresh folder), then the CSV/JSON metadata."""
    catalogue = catalogue_for(options)
    rows: list[list[Any]] = []
    clips: dict[str, Any] = {}
    backgrounds: list[dict[str, Any]] = []
    for split in SPLITS:
        for index in range(options["clips_per_split"][split]):
            plan = plan_clip(options=options, catalogue=catalogue, subset=subset, split=split, index=index)
            _write_clip(root, subset, plan, options)
            if plan.background is not None:
                backgrounds.append(plan.background)
            # Metadata draws from its own stream so it never shifts the clip's content.
            meta_rng = np.random.default_rng([options["seed"], SUBSETS.index(subset), SPLITS.index(split), index, 7919])
            if subset == "s4":
                rows.append([plan.clip_id, int(meta_rng.integers(0, 300)), _s4_category(plan), split])
                clips[plan.clip_id] = _sidecar_entry(plan)
            elif subset == "ms3":
                rows.append([plan.clip_id, split])
                clips[plan.clip_id] = _sidecar_entry(plan)
            else:
                uid = avss_uid(plan.clip_id)
                heard = sorted({plan.classes[j].name for j in np.flatnonzero(plan.sounding.any(axis=1))})
                rows.append(
                    [
                        plan.clip_id,
                        uid,
                        int(meta_rng.integers(0, 10)),
                        int(meta_rng.integers(0, 60)),
                        "_".join(heard),
                        split,
                        plan.kind,
                    ]
                )
                clips[uid] = _sidecar_entry(plan)
    layout = LAYOUTS[subset]
    _write(root / layout.metadata_csv, _csv_bytes(layout.csv_header, rows))
    if layout.label_file is not None:
        _write(root / layout.label_file, _json_bytes(label2idx_json()))
    sidecar = {
        "generator": "avseg.data.synth",
        "generator_version": GENERATOR_VERSION,
        "subset": subset,
        "options": dict(options),
        "sample_rate": SAMPLE_RATE,
        "classes": [spec.describe() for spec in catalogue],
        "clips": clips,
    }
    if options.get("assets") == "real":
        from avseg.data.synth.backgrounds import background_sources
        from avseg.data.synth.real import asset_versions

        sidecar["assets"] = asset_versions(options)
        sidecar["backgrounds"] = background_sources(options["backgrounds"], options["assets_dir"], backgrounds)
        sidecar = {**{k: v for k, v in sidecar.items() if k != "clips"}, "clips": clips}  # clips last
    _write(root / SIDECAR_NAME, _json_bytes(sidecar))
