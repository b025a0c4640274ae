"""avseg.data.layout: one layout per subset, and the checker accepts exactly the trees the loader reads.

Small SynthAVS trees (S4, MS3, AVSS) are mutated one way at a time; for each mutation
`check_tree` must report a problem if and only if the loader raises while building or iterating
every split. The checker's extra hygiene rules (files the loader never opens) are listed apart.
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avseg.data import synth
from avseg.data.avsbench import DATASETS
from avseg.data.check import check_tree
from avseg.data.layout import LAYOUTS, SPLITS, get_layout, parse_rows
from avseg.data.palette import NUM_AVSS_CLASSES
from avseg.errors import ConfigError, DataError

SIZE = 32
SUBSETS = ("s4", "ms3", "avss")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layout")
    clips = {"train": 2, "val": 1, "test": 1}
    return {
        "s4": synth.generate(base / "s4", "s4", image_size=SIZE, clips_per_split=clips),
        "ms3": synth.generate(base / "ms3", "ms3", image_size=SIZE, clips_per_split=clips),
        # train cycles v1s, v1m, v2; the val clip is a v1s clip with 5 labels
        "avss": synth.generate(
            base / "avss", "avss", image_size=SIZE, clips_per_split={"train": 3, "val": 1, "test": 0}
        ),
    }


def loader_error(root: Path, subset: str) -> DataError | None:
    """The loader's first DataError over every split and item, or None when it reads them all."""
    try:
        for split in SPLITS:
            dataset = DATASETS[subset](root, split, image_size=SIZE)
            for index in range(len(dataset)):
                dataset[index]
    except DataError as error:
        return error
    return None


# -- mutations: each changes a copy of a pristine tree in one way ---------------------------------


def _first(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(pattern))
    assert matches, pattern
    return matches[0]


def _csv(root: Path, subset: str) -> Path:
    return root / LAYOUTS[subset].metadata_csv


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


_FRAME = {
    "s4": "s4_data/visual_frames/*/*/*/*.png",
    "ms3": "ms3_data/visual_frames/*/*.png",
    "avss": "*/*/frames/*.jpg",
}
_MASK = {"s4": "s4_data/gt_masks/*/*/*/*.png", "ms3": "ms3_data/gt_masks/*/*/*.png", "avss": "*/*/labels_rgb/*.png"}
_WAV = {"s4": "s4_data/audio_wav/*/*/*.wav", "ms3": "ms3_data/audio_wav/*/*.wav", "avss": "*/*/audio.wav"}


def missing_frame(root: Path, subset: str) -> None:
    _first(root, _FRAME[subset]).unlink()


def missing_mask(root: Path, subset: str) -> None:
    _first(root, _MASK[subset]).unlink()


def missing_audio(root: Path, subset: str) -> None:
    _first(root, _WAV[subset]).unlink()


def wrong_mask_size(root: Path, subset: str) -> None:
    path = _first(root, _MASK[subset])
    with Image.open(path) as image:
        image.load()
        image.resize((SIZE + 8, SIZE)).save(path)


def extra_csv_row(root: Path, subset: str) -> None:
    """A row for a clip that has no files."""
    path = _csv(root, subset)
    lines = _lines(path)
    row = {"s4": "ghost,0,dog,val", "ms3": "ghost,test", "avss": "ghost,ghost_1,0,0,dog,val,v1m"}[subset]
    _write_lines(path, lines + [row])


def duplicate_csv_row(root: Path, subset: str) -> None:
    path = _csv(root, subset)
    lines = _lines(path)
    _write_lines(path, lines + [lines[1]])


def unknown_split(root: Path, subset: str) -> None:
    """The last row's split is not train/val/test (the loader used to skip such a row silently)."""
    path = _csv(root, subset)
    lines = _lines(path)
    cells = lines[-1].split(",")
    split_col = {"s4": 3, "ms3": 1, "avss": 5}[subset]
    cells[split_col] = "training"
    _write_lines(path, lines[:-1] + [",".join(cells)])


def wrong_csv_header(root: Path, subset: str) -> None:
    """A header that lacks the split column (by name and at its official position)."""
    path = _csv(root, subset)
    lines = _lines(path)
    header = {"s4": "name,start", "ms3": "video_id", "avss": "vid,uid,s_min,s_sec,a_obj,part,label"}[subset]
    _write_lines(path, [header] + lines[1:])


def upper_case_csv_header(root: Path, subset: str) -> None:
    """Harmless: columns are found by name case-insensitively."""
    path = _csv(root, subset)
    lines = _lines(path)
    _write_lines(path, [lines[0].upper()] + lines[1:])


def blank_csv_line(root: Path, subset: str) -> None:
    """Harmless: blank lines are skipped."""
    path = _csv(root, subset)
    lines = _lines(path)
    _write_lines(path, lines[:2] + [""] + lines[2:])


def missing_label2idx(root: Path, subset: str) -> None:
    (root / "label2idx.json").unlink()


def reordered_label2idx(root: Path, subset: str) -> None:
    path = root / "label2idx.json"
    lines = _lines(path)
    # the JSON is written one key per line: swap two class lines
    i = next(k for k, line in enumerate(lines) if line.strip().startswith('"') and k > 2)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    _write_lines(path, lines)


def duplicate_label2idx_key(root: Path, subset: str) -> None:
    """The first class key written twice (json.loads would silently keep one)."""
    path = root / "label2idx.json"
    lines = _lines(path)
    _write_lines(path, lines[:2] + [lines[1]] + lines[2:])


def missing_csv(root: Path, subset: str) -> None:
    _csv(root, subset).unlink()


MUTATIONS = {
    "clean": (lambda root, subset: None, False),
    "missing_frame": (missing_frame, True),
    "missing_mask": (missing_mask, True),
    "missing_audio": (missing_audio, True),
    "wrong_mask_size": (wrong_mask_size, True),
    "extra_csv_row": (extra_csv_row, True),
    "duplicate_csv_row": (duplicate_csv_row, True),
    "unknown_split": (unknown_split, True),
    "wrong_csv_header": (wrong_csv_header, True),
    "missing_csv": (missing_csv, True),
    "upper_case_csv_header": (upper_case_csv_header, False),
    "blank_csv_line": (blank_csv_line, False),
    "missing_label2idx": (missing_label2idx, True),
    "reordered_label2idx": (reordered_label2idx, True),
    "duplicate_label2idx_key": (duplicate_label2idx_key, True),
}
_AVSS_ONLY = {"missing_label2idx", "reordered_label2idx", "duplicate_label2idx_key"}


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_checker_reports_a_problem_iff_the_loader_raises(pristine, tmp_path, subset, mutation):
    if mutation in _AVSS_ONLY and subset != "avss":
        pytest.skip("label2idx.json is an AVSS file")
    root = tmp_path / subset
    shutil.copytree(pristine[subset], root)
    mutate, broken = MUTATIONS[mutation]
    mutate(root, subset)
    problems = check_tree(root, subset)
    error = loader_error(root, subset)
    assert bool(problems) == broken, [str(p) for p in problems]
    assert (error is not None) == broken, error
    if error is not None:  # both name the same file
        assert error.path in {p.path for p in problems}, (str(error), [str(p) for p in problems])


def stray_file(root: Path, subset: str) -> Path:
    stray = _first(root, _FRAME[subset]).parent / "stray.txt"
    stray.write_text("not data")
    return stray


def two_foreground_values(root: Path, subset: str) -> Path:
    """A binary mask holding 0, 128 and 255 (the loader takes any nonzero value as foreground)."""
    path = _first(root, _MASK[subset])
    with Image.open(path) as image:
        values = np.asarray(image.convert("L")).copy()
    values[0, 0] = 128 if values[0, 0] == 0 else values[0, 0]
    values[-1, -1] = 255
    values[0, 1] = 128
    Image.fromarray(values, mode="L").save(path)
    return path


def wav_at_32_khz(root: Path, subset: str) -> Path:
    """The same audio at 32 kHz (the loader resamples it; the checker wants AVSBench's 16 kHz)."""
    path = _first(root, _WAV[subset])
    with wave.open(str(path), "rb") as handle:
        params, frames = handle.getparams(), handle.readframes(handle.getnframes())
    samples = np.frombuffer(frames, dtype="<i2").reshape(-1, params.nchannels)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(params.nchannels)
        handle.setsampwidth(2)
        handle.setframerate(32000)
        handle.writeframes(np.repeat(samples, 2, axis=0).astype("<i2").tobytes())
    return path


HYGIENE = {"stray_file": stray_file, "two_foreground_values": two_foreground_values, "wav_at_32_khz": wav_at_32_khz}


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("rule", list(HYGIENE))
def test_checker_hygiene_rules_the_loader_does_not_need(pristine, tmp_path, subset, rule):
    """The checker is stricter in documented ways (docs/DATA.md section 1) about what the loader
    never opens or tolerates: the checker reports the one file, the loader reads the tree."""
    if rule == "two_foreground_values" and subset == "avss":
        pytest.skip("AVSS masks are colour masks")
    root = tmp_path / subset
    shutil.copytree(pristine[subset], root)
    path = HYGIENE[rule](root, subset)
    assert [p.path for p in check_tree(root, subset)] == [str(path)]
    assert loader_error(root, subset) is None


def test_one_layout_per_subset():
    assert [LAYOUTS[s].num_frames for s in SUBSETS] == [5, 5, 10]
    assert [LAYOUTS[s].fit_mode for s in SUBSETS] == ["repeat_last", "repeat_last", "zero_pad"]
    assert [LAYOUTS[s].num_mask_classes for s in SUBSETS] == [2, 2, NUM_AVSS_CLASSES]
    assert LAYOUTS["avss"].object_classes == 70 and LAYOUTS["avss"].label_file == "label2idx.json"
    for subset, dataset in DATASETS.items():  # the loader's class facts are the layout's
        assert dataset.layout is LAYOUTS[subset] and dataset.num_frames == LAYOUTS[subset].num_frames
        assert dataset.log_mel_fit == LAYOUTS[subset].fit_mode and dataset.metadata_name == LAYOUTS[subset].metadata_csv
    with pytest.raises(ConfigError, match="subset"):
        get_layout("avs")


@pytest.mark.parametrize(
    ("subset", "split", "kind", "labelled"),
    [
        ("s4", "train", None, 1),
        ("s4", "val", None, 5),
        ("ms3", "train", None, 5),
        ("avss", "train", "v1s", 1),
        ("avss", "test", "v1s", 5),
        ("avss", "train", "v1m", 5),
        ("avss", "train", "v2", 10),
    ],
)
def test_labelled_frames(subset, split, kind, labelled):
    layout = LAYOUTS[subset]
    assert layout.labelled_frames(split, kind) == labelled
    row = {"name": "c", "category": "dog", "uid": "c_1", "label": kind or "", "split": split}
    files = layout.clip_files(row)
    assert sum(m is not None for m in files.masks) == labelled
    assert len(files.frames) == (layout.clip_kinds[kind] if kind else layout.num_frames)


def test_parse_rows_reports_every_bad_row(tmp_path):
    path = tmp_path / "s4_meta_data.csv"
    path.write_text("name,start,category,split\na,0,dog,train\nb,0,dog\n../x,0,dog,val\na,0,dog,val\nc,0,dog,dev\n")
    rows, problems = parse_rows(LAYOUTS["s4"], path)
    assert [r["name"] for r in rows] == ["a"]
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6"]
    assert "duplicate clip 'a'" in problems[2] and "'dev'" in problems[3]
