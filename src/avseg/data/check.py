"""Validate an AVSBench-format tree (real or SynthAVS) and list every problem with its path.

    python -m avseg.data.check root=PATH subset=s4|ms3|avss [image_size=224] [workers=8]

Checks, against the layouts in docs/AVSBENCH.md (their code: `avseg.data.layout`, which the loader
reads too, so a row or file the loader would reject is a problem here): the CSV (and AVSS
`label2idx.json`) parse; every CSV row has exactly its expected frames, masks, WAV (and pickle, when
the tree has `audio_log_mel/`), per clip kind and split; no extra files and no clip folders without
a CSV row inside the subset's data folders; every image is structurally whole (PNG chunks with valid
CRCs up to IEND, JPEG end marker: PIL decodes a PNG that lost its tail), decodes fully (PIL
`load()`), has the expected size (`image_size`) and matches its clip's frame size; binary masks hold
one foreground value at most; AVSS colour masks hold only class colours and agree with
`labels_semantic/`; WAVs decode fully at 16 kHz and are long enough for one log-mel example; pickles
are plain tensors [5, 1, 96, 64] loaded through the restricted unpickler. Each file is read once (the per-file
checks: `avseg.data.check_files`); clips are checked in parallel threads.
Entries at the root beside the CSV (e.g. another subset's folder, the SynthAVS sidecar) are not
inspected.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from avseg.data.check_files import EXPECTED_SAMPLE_RATE, MIN_AUDIO_SECONDS, check_file
from avseg.data.layout import AVSS_MASK_DIRS, LAYOUTS, SUBSETS, parse_rows, read_label2idx
from avseg.data.palette import NUM_AVSS_CLASSES
from avseg.errors import ConfigError, DataError

__all__ = ["EXPECTED_SAMPLE_RATE", "MIN_AUDIO_SECONDS", "Problem", "check_file", "check_tree", "main"]


@dataclass(frozen=True, order=True)
class Problem:
    """One problem found in a tree: the file or folder concerned and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class _Clip:
    """One CSV row: its files (relative POSIX paths -> kind) and the folders that hold them."""

    name: str
    files: dict[str, str] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)


@dataclass
class _Layout:
    """What the CSV says should exist, and where to look for extras."""

    clips: list[_Clip]
    scan_roots: list[str]  # relative folders walked for extra entries
    problems: list[Problem]
    num_classes: int = NUM_AVSS_CLASSES


_KIND_WORDS = {
    "frame": "frame",
    "binary_mask": "mask",
    "rgb_mask": "colour mask (labels_rgb)",
    "index_mask": "index mask (labels_semantic)",
    "wav": "audio WAV",
    "pkl": "log-mel pickle",
}


# ---------------------------------------------------------------------------------------------
# CSV -> expected files (paths and row rules from avseg.data.layout, as the loader reads them)


def _layout(root: Path, subset: str) -> _Layout:
    layout = LAYOUTS[subset]
    problems: list[Problem] = []
    num_classes = layout.num_mask_classes
    if layout.label_file is not None:
        try:
            num_classes = len(read_label2idx(root / layout.label_file))
        except DataError as err:
            problems.append(Problem(err.path, err.problem))
    csv_path = root / layout.metadata_csv
    try:
        rows, row_problems = parse_rows(layout, csv_path)
    except DataError as err:  # missing or unreadable CSV, or a header without a needed column
        problems.append(Problem(err.path, err.problem))
        scan_roots = [] if (layout.semantic or not csv_path.is_file()) else list(layout.data_dirs)
        return _Layout([], scan_roots, problems, num_classes)
    problems.extend(Problem(str(csv_path), message) for message in row_problems)
    with_pkl = layout.has_pkl and any((root / d / "audio_log_mel").is_dir() for d in layout.data_dirs)
    clips = []
    for row in rows:
        files = layout.clip_files(row, with_pkl=with_pkl)
        clip = _Clip(name=files.video_id, folders=list(files.folders))
        for rel in files.frames:
            clip.files[rel] = "frame"
        for rel in files.masks:
            if rel is not None:
                clip.files[rel] = "rgb_mask" if layout.semantic else "binary_mask"
        # optional: some AVSS trees also ship index masks, which must then be complete
        if layout.semantic and (root / files.folders[0] / AVSS_MASK_DIRS["semantic"]).is_dir():
            for rel in files.semantic_masks:
                if rel is not None:
                    clip.files[rel] = "index_mask"
        clip.files[files.wav] = "wav"
        if files.pkl is not None:
            clip.files[files.pkl] = "pkl"
        clips.append(clip)
    scan_roots = [d for d in layout.data_dirs if (root / d).is_dir()] if layout.semantic else list(layout.data_dirs)
    return _Layout(clips, scan_roots, problems, num_classes)


# ---------------------------------------------------------------------------------------------
# Walking for extras


def _row_depths(subset: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per data folder (`visual_frames`, `gt_masks`, `audio_wav`, `audio_log_mel`): the deepest
    folder level (in path parts) at which a folder still stands for clips (split, category, clip
    folder), and the level at which clip-level files (WAV, pickle) sit; from a sample clip of the
    subset's layout (S4: 5 and 4/5, MS3: 3, 4 and 3/4)."""
    layout = LAYOUTS[subset]
    sample = layout.clip_files({"name": "n", "category": "c", "split": "train"}, with_pkl=True)
    dirs = {PurePosixPath(folder).parts[1]: len(PurePosixPath(folder).parts) for folder in sample.folders}
    files: dict[str, int] = {}
    for rel in (sample.wav, sample.pkl):
        parts = PurePosixPath(rel).parts if rel is not None else ()
        if parts:
            dirs[parts[1]], files[parts[1]] = len(parts) - 1, len(parts)
    return dirs, files


_ROW_DEPTHS = {subset: _row_depths(subset) for subset in ("s4", "ms3")}  # AVSS: <label>/<uid>


def _row_level(subset: str, parts: tuple[str, ...], is_dir: bool) -> bool:
    """Whether a path (relative parts) sits where a clip's folder or file, or a folder grouping
    clips (split, category), would: such an entry that is not expected has no CSV row."""
    if subset == "avss":
        return is_dir and len(parts) == 2  # <label>/<uid>
    if len(parts) < 2:
        return False
    if is_dir:
        depth = _ROW_DEPTHS[subset][0].get(parts[1])
        return depth is not None and len(parts) <= depth
    return _ROW_DEPTHS[subset][1].get(parts[1]) == len(parts)


def _find_extras(root: Path, subset: str, layout: _Layout) -> tuple[set[str], list[Problem]]:
    """Walk the data folders once. Returns the relative paths of all files found and the extras."""
    expected_files = {path for clip in layout.clips for path in clip.files}
    allowed_dirs: set[str] = set()
    for clip in layout.clips:
        for path in list(clip.files) + clip.folders:
            parent = PurePosixPath(path) if path in clip.folders else PurePosixPath(path).parent
            while str(parent) not in (".", ""):
                allowed_dirs.add(str(parent))
                parent = parent.parent
    found: set[str] = set()
    problems: list[Problem] = []
    for scan_root in layout.scan_roots:
        if not (root / scan_root).is_dir():
            problems.append(Problem(str(root / scan_root), "missing data folder"))
            continue
        for directory, subdirs, files in os.walk(root / scan_root):
            rel_dir = Path(directory).relative_to(root).as_posix()
            keep = []
            for sub in sorted(subdirs):
                if _sort_entry(root, subset, f"{rel_dir}/{sub}", allowed_dirs, problems, is_dir=True):
                    keep.append(sub)
            subdirs[:] = keep  # never descend into what was already reported
            for name in sorted(files):
                rel = f"{rel_dir}/{name}"
                if _sort_entry(root, subset, rel, expected_files, problems, is_dir=False):
                    found.add(rel)
    return found, problems


def _sort_entry(
    root: Path, subset: str, rel: str, expected: set[str], problems: list[Problem], *, is_dir: bool
) -> bool:
    """Whether the entry `rel` (a folder or file, relative POSIX path) is expected; if not, append
    its problem: without a CSV row where a clip's entry would sit, unexpected elsewhere."""
    if rel in expected:
        return True
    entry = "folder" if is_dir else "file"
    if _row_level(subset, tuple(rel.split("/")), is_dir=is_dir):
        problems.append(Problem(str(root / rel), f"{entry} without a CSV row"))
    else:
        problems.append(Problem(str(root / rel), f"unexpected {entry}"))
    return False


def _check_clip(root: Path, clip: _Clip, present: set[str], image_size: int | None, num_classes: int) -> list[Problem]:
    """Validate a clip's files (each read once) and cross-check sizes and AVSS mask pairs."""
    problems: list[Problem] = []
    frame_sizes: dict[str, tuple[int, int]] = {}
    mask_sizes: dict[str, tuple[int, int]] = {}
    decoded: dict[str, np.ndarray] = {}  # frame index -> class indices of its first decoded mask
    for rel, kind in clip.files.items():
        if rel not in present:
            problems.append(Problem(str(root / rel), f"missing {_KIND_WORDS[kind]}"))
            continue
        messages, size, indices = check_file(root, rel, kind, image_size, num_classes)
        problems.extend(Problem(str(root / rel), message) for message in messages)
        if indices is not None:  # AVSS: labels_rgb/<i>.png and labels_semantic/<i>.png must agree
            stem = PurePosixPath(rel).stem
            other = decoded.setdefault(stem, indices)
            if other is not indices and other.shape == indices.shape and not np.array_equal(other, indices):
                differing = int((other != indices).sum())
                problems.append(
                    Problem(str(root / rel), f"labels_semantic and labels_rgb disagree at {differing} pixels")
                )
        if size is None:
            continue
        if kind == "frame":
            frame_sizes[rel] = size
        else:
            mask_sizes[rel] = size
    if image_size is None and frame_sizes:
        reference = Counter(frame_sizes.values()).most_common(1)[0][0]
        for rel, size in {**frame_sizes, **mask_sizes}.items():
            if size != reference:
                problems.append(
                    Problem(
                        str(root / rel),
                        f"size {size[0]}x{size[1]} differs from the clip's frames ({reference[0]}x{reference[1]})",
                    )
                )
    return problems


# ---------------------------------------------------------------------------------------------
# Entry points


def check_tree(
    root: str | os.PathLike, subset: str, *, image_size: int | None = None, workers: int | None = None
) -> list[Problem]:
    """Every problem in the `subset` tree at `root` (the folder holding the CSV), sorted by path."""
    if subset not in SUBSETS:
        raise ConfigError(f"subset: {subset!r} is not one of {list(SUBSETS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ConfigError(f"image_size: expected a positive integer or None, got {image_size!r}")
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "not a folder")]
    layout = _layout(root, subset)
    problems = list(layout.problems)
    present, extras = _find_extras(root, subset, layout)
    problems.extend(extras)
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoders release the GIL
        results = pool.map(lambda clip: _check_clip(root, clip, present, image_size, layout.num_classes), layout.clips)
        for clip_problems in results:
            problems.extend(clip_problems)
    return sorted(set(problems))


def _positive_int(key: str, given: object) -> int | None:
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, int) or given <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {given!r}")
    return given


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m avseg.data.check root=PATH subset=s4|ms3|avss [image_size=N] [workers=N]``
    (config ``conf/check.yaml``, Hydra's override grammar). Log one line per problem
    (`<path>: <message>`, on stdout); exit 1 if there is any, 2 on bad usage. The summary goes to
    stderr (logger ``avseg.data.check.status``)."""
    from avseg.cli import compose_command, console_log

    report = logging.getLogger("avseg.data.check")
    status = logging.getLogger("avseg.data.check.status")
    with console_log("avseg.data.check", status=status.name):
        try:
            args = compose_command(
                "check", argv, required=("root", "subset"), usage="root=PATH subset=s4|ms3|avss [image_size=N]"
            )
            image_size = _positive_int("image_size", args.image_size)
            workers = _positive_int("workers", args.workers)
            args.root = str(args.root)
            problems = check_tree(args.root, str(args.subset), image_size=image_size, workers=workers)
        except ConfigError as err:
            status.error("avseg.data.check: %s", err)
            return 2
        for problem in problems:
            report.info("%s", problem)
        if problems:
            status.error("avseg.data.check: %d problem(s) in %s", len(problems), args.root)
            return 1
        status.info("avseg.data.check: %s tree at %s is clean", args.subset, args.root)
        return 0


if __name__ == "__main__":
    sys.exit(main())
