"""avseg.data.check: clean SynthAVS trees pass; every corruption is listed with its path."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avseg.data import check, check_files, synth
from avseg.data.check import Problem, check_tree

SIZE = 32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pristine")
    clips = {"train": 2, "val": 1, "test": 1}
    return {
        "s4": synth.generate(base / "s4", "s4", image_size=SIZE, clips_per_split=clips, write_pkl=True),
        "ms3": synth.generate(base / "ms3", "ms3", image_size=SIZE, clips_per_split=clips, write_pkl=True),
        # Train clips cycle v1s, v1m, v2; the val clip is a v1s clip with 5 labels.
        "avss": synth.generate(
            base / "avss", "avss", image_size=SIZE, clips_per_split={"train": 3, "val": 1, "test": 0}
        ),
    }


@pytest.fixture
def tree(pristine, tmp_path, request):
    """A private copy of the pristine tree named by the test's `subset` parameter."""
    subset = request.param
    copy = tmp_path / subset
    shutil.copytree(pristine[subset], copy)
    return subset, copy


def _first(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(pattern))
    assert matches, pattern
    return matches[0]


def _paths(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


def _only(problems: list[Problem], path: Path, fragment: str) -> None:
    """Exactly one problem, at `path`, whose message contains `fragment`."""
    assert len(problems) == 1, [str(p) for p in problems]
    assert problems[0].path == str(path)
    assert fragment in problems[0].message, problems[0].message


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_generated_trees_are_clean(pristine, subset):
    assert check_tree(pristine[subset], subset) == []
    assert check_tree(pristine[subset], subset, image_size=SIZE) == []


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_wrong_image_size_is_reported_for_every_image(pristine, subset):
    problems = check_tree(pristine[subset], subset, image_size=SIZE * 2)
    images = [p for p in pristine[subset].rglob("*") if p.suffix in (".png", ".jpg")]
    assert sorted(_paths(problems)) == sorted(str(p) for p in images)
    assert all(f"expected {2 * SIZE}x{2 * SIZE}" in p.message for p in problems)


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_truncated_image(tree):
    subset, root = tree
    frame = _first(root, "**/visual_frames/**/*.png" if subset != "avss" else "v2/*/frames/3.jpg")
    frame.write_bytes(frame.read_bytes()[: len(frame.read_bytes()) // 2])
    _only(check_tree(root, subset), frame, "truncated PNG" if subset != "avss" else "truncated JPEG")


@pytest.mark.parametrize("tree", ["s4", "avss"], indirect=True)
@pytest.mark.parametrize("cut", ["IEND", "CRC"])
def test_png_that_lost_its_tail_still_decodes_but_is_reported(tree, cut):
    """PIL decodes a PNG without its IEND chunk (or the last IDAT CRC); the checker does not
    accept it."""
    subset, root = tree
    mask = _first(root, "**/gt_masks/val/**/*_1.png" if subset == "s4" else "v1m/*/labels_rgb/0.png")
    data = mask.read_bytes()
    data = data[:-12] if cut == "IEND" else data[:-14]
    mask.write_bytes(data)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # still decodes
    _only(check_tree(root, subset), mask, "truncated PNG")


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_png_with_a_damaged_chunk(tree):
    subset, root = tree
    frame = _first(root, "**/visual_frames/**/*_4.png")
    data = bytearray(frame.read_bytes())
    data[-20] ^= 0x01  # inside the last IDAT chunk
    frame.write_bytes(bytes(data))
    _only(check_tree(root, subset), frame, "CRC mismatch in chunk 'IDAT'")


@pytest.mark.parametrize("tree", ["avss"], indirect=True)
def test_jpeg_without_its_end_marker(tree):
    subset, root = tree
    frame = _first(root, "v2/*/frames/7.jpg")
    frame.write_bytes(frame.read_bytes()[:-2])
    _only(check_tree(root, subset), frame, "truncated JPEG")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_missing_frame(tree):
    subset, root = tree
    frame = _first(root, "**/visual_frames/**/*_3.png" if subset != "avss" else "v1m/*/frames/4.jpg")
    frame.unlink()
    _only(check_tree(root, subset), frame, "missing frame")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_missing_mask(tree):
    subset, root = tree
    mask = _first(root, "**/gt_masks/test/**/*_5.png" if subset != "avss" else "v2/*/labels_rgb/9.png")
    mask.unlink()
    _only(check_tree(root, subset), mask, "missing")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_extra_file_in_a_clip_folder(tree):
    subset, root = tree
    frame = _first(root, "**/visual_frames/**/*_1.png" if subset != "avss" else "v1s/*/frames/0.jpg")
    extra = frame.with_name("notes.txt")
    extra.write_text("x")
    _only(check_tree(root, subset), extra, "unexpected file")


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_s4_train_clip_with_more_than_the_first_mask(tree):
    subset, root = tree
    first = _first(root, "s4_data/gt_masks/train/**/*_1.png")
    second = first.with_name(first.name.replace("_1.png", "_2.png"))
    shutil.copy(first, second)
    _only(check_tree(root, subset), second, "unexpected file")


@pytest.mark.parametrize("tree", ["s4", "ms3"], indirect=True)
def test_non_binary_mask_values(tree):
    subset, root = tree
    mask = _first(root, "**/gt_masks/val/**/*_2.png")
    values = np.asarray(Image.open(mask)).copy()
    values[0, :4] = [0, 64, 128, 255]
    Image.fromarray(values, mode="L").save(mask)
    _only(check_tree(root, subset), mask, "non-binary mask")


@pytest.mark.parametrize("tree", ["avss"], indirect=True)
def test_unknown_mask_colour(tree):
    subset, root = tree
    mask = _first(root, "v1m/*/labels_rgb/2.png")
    rgb = np.asarray(Image.open(mask).convert("RGB")).copy()
    rgb[5, 5] = (1, 2, 3)
    Image.fromarray(rgb).save(mask)
    _only(check_tree(root, subset), mask, "unknown colours (1, 2, 3)")


@pytest.mark.parametrize("tree", ["avss"], indirect=True)
def test_semantic_and_colour_masks_disagree(tree):
    subset, root = tree
    mask = _first(root, "v2/*/labels_semantic/6.png")
    values = np.asarray(Image.open(mask)).copy()
    values[:3, :3] = 1 if values[0, 0] != 1 else 2
    Image.fromarray(values, mode="L").save(mask)
    _only(check_tree(root, subset), mask, "disagree at 9 pixels")


@pytest.mark.parametrize("tree", ["avss"], indirect=True)
def test_index_mask_outside_the_classes(tree):
    subset, root = tree
    mask = _first(root, "v1s/*/labels_semantic/0.png")
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 200
    Image.fromarray(values, mode="L").save(mask)
    _only(check_tree(root, subset), mask, "outside 0..70")


@pytest.mark.parametrize("tree", ["avss"], indirect=True)
def test_missing_label2idx(tree):
    subset, root = tree
    (root / "label2idx.json").unlink()
    _only(check_tree(root, subset), root / "label2idx.json", "missing label2idx.json")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_bad_wav_header(tree):
    subset, root = tree
    audio = _first(root, "**/*.wav")
    data = bytearray(audio.read_bytes())
    data[:4] = b"JUNK"
    audio.write_bytes(bytes(data))
    _only(check_tree(root, subset), audio, "bad header")


@pytest.mark.parametrize("tree", ["s4", "avss"], indirect=True)
def test_truncated_wav(tree):
    subset, root = tree
    audio = _first(root, "**/*.wav")
    audio.write_bytes(audio.read_bytes()[:20000])
    _only(check_tree(root, subset), audio, "truncated")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_wrong_sample_rate(tree):
    subset, root = tree
    audio = _first(root, "**/*.wav")
    with wave.open(str(audio)) as handle:
        frames = handle.readframes(handle.getnframes())
    with wave.open(str(audio), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(22050)
        handle.writeframes(frames)
    _only(check_tree(root, subset), audio, "sample rate 22050 Hz, expected 16000 Hz")


@pytest.mark.parametrize("tree", ["ms3"], indirect=True)
def test_too_short_wav(tree):
    subset, root = tree
    audio = _first(root, "**/*.wav")
    with wave.open(str(audio), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(np.zeros(8000, dtype="<i2").tobytes())
    _only(check_tree(root, subset), audio, "shorter than one 0.96 s log-mel example")


class _RunsCode:
    """A pickle payload: unpickling it would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _NestedPayload:
    """A tensor-looking pickle whose storage bytes hide a code-running pickle."""

    def __init__(self, inner: bytes):
        self.inner = inner

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.inner,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the nested bytes
@pytest.mark.parametrize("tree", ["s4", "ms3"], indirect=True)
@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_reported_and_not_run(tree, nested, tmp_path):
    subset, root = tree
    target = _first(root, "**/audio_log_mel/**/*.pkl")
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_RunsCode(marker))
    target.write_bytes(pickle.dumps(_NestedPayload(payload)) if nested else payload)
    problems = check_tree(root, subset)
    assert not marker.exists()
    assert _paths(problems) == [str(target)]


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_pickle_of_the_wrong_shape(tree):
    subset, root = tree
    target = _first(root, "**/audio_log_mel/**/*.pkl")
    target.write_bytes(pickle.dumps(torch.zeros(3, 1, 96, 64)))
    _only(check_tree(root, subset), target, "expected [5, 1, 96, 64]")


def _append_row(csv_path: Path, row: list[str]) -> None:
    with open(csv_path, "a", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(row)


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_csv_row_without_files(tree):
    subset, root = tree
    if subset == "s4":
        _append_row(root / "s4_meta_data.csv", ["ghost", "0", "bell", "val"])
        expected = [
            *(f"s4_data/visual_frames/val/bell/ghost/ghost_{k}.png" for k in range(1, 6)),
            *(f"s4_data/gt_masks/val/bell/ghost/ghost_{k}.png" for k in range(1, 6)),
            "s4_data/audio_wav/val/bell/ghost.wav",
            "s4_data/audio_log_mel/val/bell/ghost.pkl",
        ]
    elif subset == "ms3":
        _append_row(root / "ms3_meta_data.csv", ["ghost", "train"])
        expected = [
            *(f"ms3_data/visual_frames/ghost/ghost.mp4_{k}.png" for k in range(1, 6)),
            *(f"ms3_data/gt_masks/train/ghost/ghost_{k}.png" for k in range(1, 6)),
            "ms3_data/audio_wav/train/ghost.wav",
            "ms3_data/audio_log_mel/train/ghost.pkl",
        ]
    else:
        _append_row(root / "metadata.csv", ["ghost", "ghost_1", "0", "0", "bell", "train", "v1s"])
        expected = [
            *(f"v1s/ghost_1/frames/{i}.jpg" for i in range(5)),
            "v1s/ghost_1/labels_rgb/0.png",
            "v1s/ghost_1/audio.wav",
        ]
    problems = check_tree(root, subset)
    assert sorted(_paths(problems)) == sorted(str(root / rel) for rel in expected)
    assert all(p.message.startswith("missing") for p in problems)


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_clip_folder_without_csv_row(tree):
    subset, root = tree
    if subset == "s4":
        source = _first(root, "s4_data/visual_frames/test/*/*")
        orphan = source.with_name("orphan")
        wav = _first(root, "s4_data/audio_wav/val/*/*.wav")
        stray_wav = wav.with_name("orphan.wav")  # beside a listed clip's WAV
        shutil.copy(wav, stray_wav)
        new_category = root / "s4_data/gt_masks/train/no-such-category"
        shutil.copytree(_first(root, "s4_data/gt_masks/train/*"), new_category)
        expected = {
            str(orphan): "folder without a CSV row",
            str(stray_wav): "file without a CSV row",
            str(new_category): "folder without a CSV row",
        }
    elif subset == "ms3":
        source = _first(root, "ms3_data/visual_frames/*")
        orphan = source.with_name("orphan")
        expected = {str(orphan): "folder without a CSV row"}
    else:
        source = _first(root, "v2/*")
        orphan = source.with_name("orphan_1")
        expected = {str(orphan): "folder without a CSV row"}
    shutil.copytree(source, orphan)
    problems = check_tree(root, subset)
    assert {p.path: p.message for p in problems} == expected


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_mask_size_differs_from_its_frames(tree):
    subset, root = tree
    mask = _first(root, "s4_data/gt_masks/test/**/*_4.png")
    Image.open(mask).resize((SIZE + 8, SIZE), Image.NEAREST).save(mask)
    _only(check_tree(root, subset), mask, f"differs from the clip's frames ({SIZE}x{SIZE})")


@pytest.mark.parametrize("tree", ["s4", "ms3", "avss"], indirect=True)
def test_bad_csv_rows(tree):
    subset, root = tree
    if subset == "s4":
        csv_path = root / "s4_meta_data.csv"
        _append_row(csv_path, ["../escape", "0", "bell", "val"])
        _append_row(csv_path, ["x", "0", "bell", "holdout"])
    elif subset == "ms3":
        csv_path = root / "ms3_meta_data.csv"
        _append_row(csv_path, ["short-row"])
        _append_row(csv_path, ["x", "holdout"])
    else:
        csv_path = root / "metadata.csv"
        _append_row(csv_path, ["v", "u", "0", "0", "a", "train", "v3"])
        _append_row(csv_path, ["v", "../u", "0", "0", "a", "train", "v2"])
    problems = check_tree(root, subset)
    assert _paths(problems) == [str(csv_path)] * 2
    assert all(p.message.startswith("line ") for p in problems)


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_every_problem_is_listed_not_just_the_first(tree):
    subset, root = tree
    frame = _first(root, "**/visual_frames/**/*_2.png")
    frame.unlink()
    audio = _first(root, "**/*.wav")
    audio.write_bytes(b"RIFF")
    extra = root / "s4_data" / "gt_masks" / "stray.png"
    extra.write_bytes(b"")
    problems = check_tree(root, subset)
    assert sorted(_paths(problems)) == sorted([str(frame), str(audio), str(extra)])


def test_missing_root_and_csv(tmp_path):
    assert check_tree(tmp_path / "nope", "s4") == [Problem(str(tmp_path / "nope"), "not a folder")]
    problems = check_tree(tmp_path, "ms3")
    assert problems == [Problem(str(tmp_path / "ms3_meta_data.csv"), "missing metadata CSV")]


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_each_file_is_read_once(pristine, subset, monkeypatch):
    from avseg.data import audio, safe_pickle

    opened: list[str] = []
    original_read, original_wav, original_pkl = check_files._read_bytes, audio.load_wav, safe_pickle.load_tensor_pickle
    original_open = Image.open

    def counting_read(path):
        opened.append(str(path))
        return original_read(path)

    def counting_wav(path):
        opened.append(str(path))
        return original_wav(path)

    def counting_pkl(path):
        opened.append(str(path))
        return original_pkl(path)

    def open_bytes_only(source, *args, **kwargs):
        assert not isinstance(source, (str, os.PathLike)), f"{source} opened by path, not from its bytes"
        return original_open(source, *args, **kwargs)

    monkeypatch.setattr(check_files, "_read_bytes", counting_read)
    monkeypatch.setattr(check_files.Image, "open", open_bytes_only)
    monkeypatch.setattr(audio, "load_wav", counting_wav)
    monkeypatch.setattr(safe_pickle, "load_tensor_pickle", counting_pkl)
    assert check_tree(pristine[subset], subset) == []
    data_files = [
        str(p) for p in pristine[subset].rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".wav", ".pkl")
    ]
    assert sorted(opened) == sorted(data_files)  # every data file once, none twice


@pytest.mark.parametrize("tree", ["s4"], indirect=True)
def test_cli_lists_problems_and_exit_codes(tree, capsys):
    subset, root = tree
    assert check.main([f"root={root}", f"subset={subset}", f"image_size={SIZE}"]) == 0
    frame = _first(root, "**/visual_frames/**/*_5.png")
    frame.write_bytes(b"not a png")
    assert check.main([f"root={root}", f"subset={subset}"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{frame}: unreadable image")
    assert check.main([f"root={root}"]) == 2
    assert check.main([f"root={root}", "subset=s5"]) == 2
    assert check.main([f"root={root}", "subset=s4", "image_size=big"]) == 2
    assert "image_size" in capsys.readouterr().err
