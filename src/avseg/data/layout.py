"""The AVSBench layouts, once: one `SubsetLayout` per subset (S4, MS3, AVSS).

Everything that reads or writes an AVSBench-format tree takes its facts from here: the loader
(`avseg.data.avsbench`), the checker (`avseg.data.check`), SynthAVS's writer
(`avseg.data.synth.layouts`), the embeddings command, predict and the config validation. The
layouts themselves are described in docs/AVSBENCH.md; this module is their executable form:

- where each clip's files live (`SubsetLayout.clip_files`: frames, masks per frame or None for an
  unlabelled one, WAV, pickle), as POSIX paths relative to the tree root (the folder of the CSV);
- the metadata CSV: its name, the header SynthAVS writes, the columns read (by name, else at the
  official position) and the row rules (`parse_rows`: split in train/val/test, a usable clip name,
  an AVSS clip kind, no duplicate clip), shared so the checker and the loader accept the same rows;
- the clip length T and the audio fit mode (`repeat_last` for S4/MS3, `zero_pad` for AVSS), the
  number of mask classes (2, or the 71 of `label2idx.json`) and which frames of which split have masks.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from avseg.data.palette import AVSS_CLASSES, NUM_AVSS_CLASSES
from avseg.errors import ConfigError, DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
FitMode = Literal["repeat_last", "zero_pad"]
LABEL2IDX = "label2idx.json"
AVSS_KINDS: dict[str, int] = {"v1s": 5, "v1m": 5, "v2": 10}  # AVSS clip kind (CSV `label`) -> frames
AVSS_MASK_DIRS: dict[str, str] = {"rgb": "labels_rgb", "semantic": "labels_semantic"}


@dataclass(frozen=True)
class ClipFiles:
    """One clip's files, relative POSIX paths from the tree root.

    `masks[t]` is None for a frame without a label file; `semantic_masks` (AVSS only) are the
    `labels_semantic/` index PNGs beside the `labels_rgb/` colour masks in `masks`."""

    video_id: str
    frames: tuple[str, ...]
    masks: tuple[str | None, ...]
    wav: str
    pkl: str | None
    semantic_masks: tuple[str | None, ...] = ()
    folders: tuple[str, ...] = ()  # the clip's own folders (for the checker's walk)


@dataclass(frozen=True)
class SubsetLayout:
    """The facts of one AVSBench subset."""

    name: str  # "s4", "ms3", "avss"
    metadata_csv: str
    csv_header: tuple[str, ...]  # the official header (SynthAVS writes it)
    columns: dict[str, int | None]  # column -> official position (None: must be named in the header)
    key: str  # the column naming a clip: "name" (S4/MS3) or "uid" (AVSS)
    num_frames: int  # T: frames (seconds) per clip; AVSS v1s/v1m clips are padded to it
    fit_mode: FitMode  # how log-mel examples are fitted to T (avseg.data.audio.fit_examples)
    semantic: bool
    num_mask_classes: int  # classes in the masks, background included
    data_dirs: tuple[str, ...]  # top-level folders holding the clips
    label_file: str | None = None  # AVSS: label2idx.json beside the CSV
    has_pkl: bool = True  # ships official log-mel pickles (audio_log_mel/)
    clip_kinds: dict[str, int] = field(default_factory=dict)  # AVSS kind -> frames

    @property
    def object_classes(self) -> int:
        """Logits of the class head (no background logit): 1 (binary) or 70."""
        return self.num_mask_classes - 1

    def labelled_frames(self, split: str, kind: str | None = None) -> int:
        """How many leading frames of a clip have a mask file: S4 train 1, AVSS v1s train 1, else all."""
        frames = self.clip_kinds[kind] if kind is not None else self.num_frames
        if split == "train" and (self.name == "s4" or kind == "v1s"):
            return 1
        return frames

    def clip_files(self, row: dict[str, str], *, with_pkl: bool = False, mask_source: str = "rgb") -> ClipFiles:
        """The files of the clip of one parsed CSV row (`parse_rows`)."""
        split = row["split"]
        if self.name == "s4":
            name, category = row["name"], row["category"]
            frames_dir = f"s4_data/visual_frames/{split}/{category}/{name}"
            masks_dir = f"s4_data/gt_masks/{split}/{category}/{name}"
            labelled = self.labelled_frames(split)
            return ClipFiles(
                video_id=name,
                frames=tuple(f"{frames_dir}/{name}_{k}.png" for k in range(1, 6)),
                masks=tuple(f"{masks_dir}/{name}_{k}.png" if k <= labelled else None for k in range(1, 6)),
                wav=f"s4_data/audio_wav/{split}/{category}/{name}.wav",
                pkl=f"s4_data/audio_log_mel/{split}/{category}/{name}.pkl" if with_pkl else None,
                folders=(frames_dir, masks_dir),
            )
        if self.name == "ms3":
            name = row["name"]
            frames_dir, masks_dir = f"ms3_data/visual_frames/{name}", f"ms3_data/gt_masks/{split}/{name}"
            return ClipFiles(
                video_id=name,
                frames=tuple(f"{frames_dir}/{name}.mp4_{k}.png" for k in range(1, 6)),
                masks=tuple(f"{masks_dir}/{name}_{k}.png" for k in range(1, 6)),
                wav=f"ms3_data/audio_wav/{split}/{name}.wav",
                pkl=f"ms3_data/audio_log_mel/{split}/{name}.pkl" if with_pkl else None,
                folders=(frames_dir, masks_dir),
            )
        uid, kind = row["uid"], row["label"]
        folder = f"{kind}/{uid}"
        count, labelled = self.clip_kinds[kind], self.labelled_frames(split, kind)

        def masks(source: str) -> tuple[str | None, ...]:
            return tuple(f"{folder}/{AVSS_MASK_DIRS[source]}/{i}.png" if i < labelled else None for i in range(count))

        return ClipFiles(
            video_id=uid,
            frames=tuple(f"{folder}/frames/{i}.jpg" for i in range(count)),
            masks=masks(mask_source),
            wav=f"{folder}/audio.wav",
            pkl=None,
            semantic_masks=masks("semantic"),
            folders=(folder,),
        )


def _binary_layout(
    name: str, *, metadata_csv: str, csv_header: tuple[str, ...], columns: dict[str, int | None]
) -> SubsetLayout:
    """S4 and MS3: binary masks, clips named by the `name` column under `<name>_data/`, T = 5 seconds
    with the last log-mel example repeated to fit."""
    return SubsetLayout(
        name=name,
        metadata_csv=metadata_csv,
        csv_header=csv_header,
        columns=columns,
        key="name",
        num_frames=5,
        fit_mode="repeat_last",
        semantic=False,
        num_mask_classes=2,
        data_dirs=(f"{name}_data",),
    )


LAYOUTS: dict[str, SubsetLayout] = {
    "s4": _binary_layout(
        "s4",
        metadata_csv="s4_meta_data.csv",
        csv_header=("name", "start", "category", "split"),
        columns={"name": 0, "category": 2, "split": 3},
    ),
    "ms3": _binary_layout(
        "ms3", metadata_csv="ms3_meta_data.csv", csv_header=("video_id", "split"), columns={"name": 0, "split": 1}
    ),
    "avss": SubsetLayout(
        name="avss",
        metadata_csv="metadata.csv",
        csv_header=("vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"),
        columns={"uid": None, "split": None, "label": None},
        key="uid",
        num_frames=10,
        fit_mode="zero_pad",
        semantic=True,
        num_mask_classes=NUM_AVSS_CLASSES,
        data_dirs=tuple(AVSS_KINDS),
        label_file=LABEL2IDX,
        has_pkl=False,
        clip_kinds=dict(AVSS_KINDS),
    ),
}
SUBSETS: tuple[str, ...] = tuple(LAYOUTS)
# the subsets a data config names and the AVSBench trees each reads: every subset alone, and "avs"
# (S4 and MS3 trained together, a binary task like S4)
SUBSET_MEMBERS: dict[str, tuple[str, ...]] = {**{name: (name,) for name in LAYOUTS}, "avs": ("s4", "ms3")}


def get_layout(subset: str) -> SubsetLayout:
    """`LAYOUTS[subset]` with a clear error for an unknown subset."""
    if subset not in LAYOUTS:
        raise ConfigError(f"subset must be one of {list(LAYOUTS)}, got {subset!r}")
    return LAYOUTS[subset]


def model_layout(semantic: bool) -> SubsetLayout:
    """The layout whose clip length and audio fit mode a model was trained with, from its task:
    AVSS for a semantic model, else S4 (MS3 has the same T and fit mode)."""
    return LAYOUTS["avss"] if semantic else LAYOUTS["s4"]


# ----------------------------------------------------------------------------------------------
# Metadata files: readers shared by the loader and the checker


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a metadata CSV, cells stripped; blank lines skipped."""
    if not path.is_file():
        raise DataError(path, "missing metadata CSV")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = [
                (line, [cell.strip() for cell in row])
                for line, row in enumerate(csv.reader(handle), start=1)
                if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(path, f"cannot read metadata CSV ({type(error).__name__}: {error})") from error
    if not table:
        raise DataError(path, "metadata CSV is empty (no header row)")
    return table[0][1], table[1:]


def _safe_name(value: str) -> bool:
    """A CSV value used as a path component: non-empty, no separators, not '.' or '..'."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\\\0")


def parse_rows(layout: SubsetLayout, path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The clips of a metadata CSV as dicts of the layout's columns (plus "line"), in row order,
    and the problems ("line N: ..."). A header without a needed column raises DataError; a bad row
    (too short, unusable name, unknown split or AVSS kind, duplicate clip) is a problem and skipped.
    Columns are found by name (case-insensitive), else at their official position."""
    header, table = read_csv_rows(path)
    lowered = [h.lower() for h in header]
    positions: dict[str, int] = {}
    missing = []
    for column, official in layout.columns.items():
        if column in lowered:
            positions[column] = lowered.index(column)
        elif official is not None and official < len(header):
            positions[column] = official
        else:
            missing.append(repr(column) if official is None else f"{column!r} (or position {official})")
    if missing:
        raise DataError(path, f"header {header} has no column {', '.join(missing)}")
    width = max(positions.values()) + 1
    rows: list[dict[str, str]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for line, cells in table:
        if len(cells) < width:
            problems.append(f"line {line}: {len(cells)} columns, expected at least {width}")
            continue
        row = {column: cells[index] for column, index in positions.items()}
        bad = [c for c in ("name", "category", "uid", "label") if c in row and not _safe_name(row[c])]
        if bad:
            problems.append(f"line {line}: unusable {bad[0]} {row[bad[0]]!r}")
        elif row["split"] not in SPLITS:
            problems.append(f"line {line}: split {row['split']!r} is not one of {list(SPLITS)}")
        elif layout.clip_kinds and row["label"] not in layout.clip_kinds:
            problems.append(f"line {line}: label {row['label']!r} is not one of {list(layout.clip_kinds)}")
        elif row[layout.key] in seen:
            problems.append(f"line {line}: duplicate clip {row[layout.key]!r} (first on line {seen[row[layout.key]]})")
        else:
            seen[row[layout.key]] = line
            rows.append({**row, "line": str(line)})
    return rows, problems


def read_label2idx(path: Path) -> tuple[str, ...]:
    """Class names in the KEY ORDER of `label2idx.json`; must be the 71 AVSS classes in order."""
    if not path.is_file():
        raise DataError(path, f"missing {LABEL2IDX}")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise DataError(path, f"duplicate keys {duplicated}")
        return dict(pairs)

    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle, object_pairs_hook=no_duplicates)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        # RecursionError: absurdly nested JSON ("[[[[..."); still a bad file, not a crash
        raise DataError(path, f"cannot read {LABEL2IDX} ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise DataError(path, f"{LABEL2IDX} must be a JSON object of class name -> index")
    classes = tuple(content.keys())
    if classes != AVSS_CLASSES:
        for position, (found, expected) in enumerate(zip(classes, AVSS_CLASSES)):
            if found != expected:
                raise DataError(
                    path,
                    f"key {position} is {found!r}, expected {expected!r} (class order is the key order; "
                    f"the AVSS classes are listed in avseg.data.palette.AVSS_CLASSES)",
                )
        raise DataError(path, f"expected the {len(AVSS_CLASSES)} AVSS classes as keys, found {len(classes)}")
    return classes
