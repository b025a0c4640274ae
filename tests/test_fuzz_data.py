"""Fuzzed AVSBench-format data (issue 6, item 6).

A tiny SynthAVS tree per subset (32 px, 2 clips per split; S4/MS3 with `.pkl` log-mels) is
generated once per module. Each Hypothesis example corrupts ONE file of a tree in place
(its original bytes are restored afterwards), then:

1. every item of every split is loaded with the `avseg.data.avsbench` datasets: each item either
   loads or raises `avseg.errors.DataError` (or a subclass) whose path is the corrupted file
   (for a CSV: the CSV, or a file the CSV now points at that does not exist) — never another
   exception type, never a hang (pytest-timeout marks and a Hypothesis deadline);
2. whenever the loader raised, `avseg.data.check.check_tree` reports a problem naming that file;
3. whenever the corruption damaged the file's structure (truncation, random bytes, zero length,
   unknown mask colours or class indices, wrong size, wrong sample rate, a pickle that is not a
   tensor [5, 1, 96, 64], a CSV whose rows changed), `check_tree` reports a problem naming it,
   whether or not the loader happened to notice.

To keep a busy 2-core machine fast, the audio is read from the (cheap) `.pkl` log-mels (S4/MS3)
or precomputed embeddings outside the tree (AVSS) unless the corrupted file is a WAV; pickles are
read with `audio_source="pkl"`, AVSS `labels_semantic/` masks with `mask_source="semantic"`.
Examples are derandomised (the same every run) unless AVSEG_FUZZ_RANDOM=1. The `slow` tests run
the same properties with more examples.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import struct
import wave
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from avseg.data.avsbench import AVSSDataset, MS3Dataset, S4Dataset, read_log_mel_pickle
from avseg.data.check import check_tree
from avseg.data.palette import NUM_AVSS_CLASSES, voc_colormap
from avseg.data.synth import generate
from avseg.errors import DataError, UnsafePickleError

SUBSETS = ("s4", "ms3", "avss")
SPLITS = ("train", "val", "test")
DATASETS = {"s4": S4Dataset, "ms3": MS3Dataset, "avss": AVSSDataset}
CSV_NAMES = {"s4": "s4_meta_data.csv", "ms3": "ms3_meta_data.csv", "avss": "metadata.csv"}
IMAGE_SIZE = 32
LOG_MEL_SHAPE = (5, 1, 96, 64)

RANDOM = os.environ.get("AVSEG_FUZZ_RANDOM") == "1"


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=60),  # a hang fails the example; busy machines are slow, not stuck
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )


# ---------------------------------------------------------------------------------------------
# the pristine trees


@dataclass(frozen=True, repr=False)
class Trees:
    roots: dict[str, Path]
    embeddings: Path  # AVSS embeddings .npy, outside the tree
    files: dict[tuple[str, str], list[str]]  # (subset, kind) -> relative paths

    def __repr__(self) -> str:  # keeps Hypothesis' falsifying-example report short
        return f"Trees({', '.join(f'{s}={r}' for s, r in self.roots.items())})"


def _catalogue(subset: str, root: Path) -> dict[str, list[str]]:
    def rel(pattern: str) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())

    if subset == "avss":
        return {
            "frame": rel("*/*/frames/*.jpg"),
            "mask": rel("*/*/labels_rgb/*.png"),
            "index_mask": rel("*/*/labels_semantic/*.png"),
            "wav": rel("*/*/audio.wav"),
            "pkl": [],
            "csv": [CSV_NAMES[subset]],
            "label2idx": ["label2idx.json"],
        }
    data = f"{subset}_data"
    return {
        "frame": rel(f"{data}/visual_frames/**/*.png"),
        "mask": rel(f"{data}/gt_masks/**/*.png"),
        "index_mask": [],
        "wav": rel(f"{data}/audio_wav/**/*.wav"),
        "pkl": rel(f"{data}/audio_log_mel/**/*.pkl"),
        "csv": [CSV_NAMES[subset]],
        "label2idx": [],
    }


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Trees:
    base = tmp_path_factory.mktemp("fuzz")
    roots: dict[str, Path] = {}
    files: dict[tuple[str, str], list[str]] = {}
    for subset in SUBSETS:
        root = generate(
            base / subset,
            subset,
            seed=3,
            image_size=IMAGE_SIZE,
            num_classes=4,
            clips_per_split={"train": 2, "val": 2, "test": 2},
            write_pkl=subset != "avss",
        )
        roots[subset] = Path(root)
        for kind, paths in _catalogue(subset, Path(root)).items():
            files[(subset, kind)] = paths
    embeddings = base / "avss_embeddings"
    rng = np.random.default_rng(0)
    for split in SPLITS:
        dataset = AVSSDataset(roots["avss"], split, image_size=IMAGE_SIZE)
        for record in dataset.records:
            target = embeddings / record.wav_relpath.with_suffix(".npy")
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, rng.standard_normal((len(record.frame_paths), 128)).astype(np.float32))
    return Trees(roots=roots, embeddings=embeddings, files=files)


# ---------------------------------------------------------------------------------------------
# loading and checking


def _loader_options(subset: str, kind: str, trees: Trees) -> dict:
    options: dict = {"image_size": IMAGE_SIZE}
    if kind == "wav":
        options["audio_source"] = "wav"
    elif subset == "avss":
        options.update(audio_source="embeddings", embeddings_dir=trees.embeddings)
    else:
        options["audio_source"] = "pkl"
    if subset == "avss":
        options["mask_source"] = "semantic" if kind == "index_mask" else "rgb"
    return options


def _load_everything(subset: str, root: Path, options: dict, what: str) -> list[DataError]:
    """Load every item of every split; DataErrors are collected, anything else fails the test."""
    errors: list[DataError] = []
    for split in SPLITS:
        try:
            dataset = DATASETS[subset](root, split, **options)
        except DataError as error:
            errors.append(error)
            continue
        except Exception as error:  # noqa: BLE001 - the property under test
            raise AssertionError(
                f"{type(error).__name__} escaped building {subset} {split} after {what}: {error}"
            ) from error
        for index in range(len(dataset)):
            try:
                item = dataset[index]
            except DataError as error:
                errors.append(error)
                continue
            except Exception as error:  # noqa: BLE001 - the property under test
                raise AssertionError(
                    f"{type(error).__name__} escaped loading {subset} {split} item {index} after {what}: {error}"
                ) from error
            assert torch.isfinite(item["frames"]).all(), f"non-finite frames from {subset} {split} {index} after {what}"
            assert torch.isfinite(item["audio"]).all(), f"non-finite audio from {subset} {split} {index} after {what}"
    return errors


def _names(error: DataError, path: Path) -> bool:
    # the message starts with error.path; another file's error may still name this one in its text
    return str(path) in str(error)


def _problem_paths(root: Path, subset: str, what: str) -> dict[Path, list[str]]:
    found: dict[Path, list[str]] = {}
    try:
        problems = check_tree(root, subset)
    except Exception as error:  # noqa: BLE001 - the property under test: the checker reports, never crashes
        raise AssertionError(f"check_tree raised {type(error).__name__} after {what}: {error}") from error
    for problem in problems:
        found.setdefault(Path(problem.path), []).append(problem.message)
    return found


class Corruption:
    """The new bytes of a file, what was done, and whether the checker must report it."""

    __slots__ = ("data", "label", "structural")

    def __init__(self, data: bytes, label: str, structural: bool) -> None:
        self.data = data
        self.label = label
        self.structural = structural  # the checker must report the file whatever the loader did

    def __repr__(self) -> str:
        return f"Corruption({self.label!r}, {len(self.data)} bytes, structural={self.structural})"


def _run_case(trees: Trees, subset: str, kind: str, rel: str, corruption: Corruption) -> None:
    root = trees.roots[subset]
    path = root / rel
    original = path.read_bytes()
    what = f"{corruption.label} of {rel} ({len(original)} -> {len(corruption.data)} bytes)"
    path.write_bytes(corruption.data)
    try:
        errors = _load_everything(subset, root, _loader_options(subset, kind, trees), what)
        problems = _problem_paths(root, subset, what)
    finally:
        path.write_bytes(original)

    is_csv = kind == "csv"
    for error in errors:
        if is_csv:
            # the CSV itself, or a file that the changed CSV points at and that does not exist
            named = Path(error.path)
            assert named == path or not named.exists(), f"{what}: loader blamed {error.path}: {error}"
            assert str(named) in str(error)
        else:
            assert _names(error, path), f"{what}: loader raised a DataError naming another file: {error}"
    if errors:
        blamed = {Path(e.path) for e in errors}
        for named in blamed:
            reported = [p for p in problems if p == named or p == path or p in named.parents and p != root]
            assert reported, f"{what}: the loader raised ({named}) but check_tree reported nothing about it: {problems}"
    if corruption.structural:
        if is_csv:
            assert problems, f"{what}: check_tree found nothing wrong"
        else:
            assert path in problems, f"{what}: check_tree did not report {rel}; it reported {problems}"


# ---------------------------------------------------------------------------------------------
# corruption strategies


@st.composite
def byte_corruptions(draw, original: bytes) -> Corruption:
    """Truncate at a random byte, flip random bytes, replace with random bytes, or empty the file."""
    how = draw(st.sampled_from(["truncate", "flip", "random", "empty"]))
    if how == "truncate":
        cut = draw(st.integers(0, len(original) - 1))
        return Corruption(original[:cut], f"truncation at byte {cut}", True)
    if how == "flip":
        data = bytearray(original)
        positions = draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8, unique=True))
        for position in positions:
            data[position] ^= draw(st.integers(1, 255))
        return Corruption(bytes(data), f"byte flips at {positions}", False)
    if how == "random":
        data = draw(st.binary(min_size=1, max_size=2048))
        return Corruption(data, f"random bytes ({len(data)})", True)
    return Corruption(b"", "zero-length file", True)


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_like(path: Path, image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return buffer.getvalue()


@st.composite
def resized(draw, path: Path) -> Corruption:
    size = draw(st.sampled_from([16, 31, 33, 48]).filter(lambda s: s != IMAGE_SIZE))
    with Image.open(path) as image:
        image.load()
        small = image.resize((size, size), Image.NEAREST)
    return Corruption(_encode_like(path, small), f"re-encoded at {size}x{size}", True)


@st.composite
def region(draw) -> tuple[slice, slice]:
    y = draw(st.integers(0, IMAGE_SIZE - 1))
    x = draw(st.integers(0, IMAGE_SIZE - 1))
    h = draw(st.integers(1, IMAGE_SIZE - y))
    w = draw(st.integers(1, IMAGE_SIZE - x))
    return slice(y, y + h), slice(x, x + w)


_KNOWN_COLOURS = {tuple(int(v) for v in c) for c in voc_colormap(NUM_AVSS_CLASSES)}


@st.composite
def unknown_colours(draw, path: Path) -> Corruption:
    """AVSS colour mask with a region painted in a colour that is no class colour."""
    colour = draw(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)))
    assume(colour not in _KNOWN_COLOURS)
    with Image.open(path) as image:
        rgb = np.array(image.convert("RGB"))
    rows, cols = draw(region())
    rgb[rows, cols] = colour
    return Corruption(_png(rgb, "RGB"), f"unknown colour {colour} at {rows}, {cols}", True)


@st.composite
def non_binary_values(draw, path: Path) -> Corruption:
    """S4/MS3 mask with two different foreground values (0/255 masks hold one at most)."""
    with Image.open(path) as image:
        mask = np.array(image.convert("L"))
    value = draw(st.integers(1, 254))
    first, second = draw(region()), draw(region())
    mask[first] = value
    mask[second] = 255
    assume(len(np.unique(mask[mask != 0])) > 1)
    return Corruption(_png(mask, "L"), f"mask values {value} and 255", True)


@st.composite
def out_of_range_indices(draw, path: Path) -> Corruption:
    """AVSS index mask with class indices >= 71."""
    with Image.open(path) as image:
        mask = np.array(image)
    value = draw(st.integers(NUM_AVSS_CLASSES, 255))
    mask[draw(region())] = value
    return Corruption(_png(mask.astype(np.uint8), "L"), f"class index {value}", True)


@st.composite
def image_corruptions(draw, path: Path, kind: str, subset: str) -> Corruption:
    options = ["bytes", "resize"]
    if kind == "mask":
        options.append("colours")
    if kind == "index_mask":
        options.append("indices")
    how = draw(st.sampled_from(options))
    if how == "bytes":
        return draw(byte_corruptions(path.read_bytes()))
    if how == "resize":
        return draw(resized(path))
    if how == "indices":
        return draw(out_of_range_indices(path))
    return draw(unknown_colours(path) if subset == "avss" else non_binary_values(path))


# WAV header fields of the plain 44-byte header: (offset, struct format, name)
_WAV_FIELDS = [
    (4, "<I", "RIFF size"),
    (16, "<I", "fmt size"),
    (20, "<H", "audio format"),
    (22, "<H", "channels"),
    (24, "<I", "sample rate"),
    (28, "<I", "byte rate"),
    (32, "<H", "block align"),
    (34, "<H", "bits per sample"),
    (40, "<I", "data size"),
]


@st.composite
def wav_corruptions(draw, path: Path) -> Corruption:
    original = path.read_bytes()
    how = draw(st.sampled_from(["bytes", "header", "sample_rate"]))
    if how == "bytes":
        return draw(byte_corruptions(original))
    if how == "header":
        assert original[36:40] == b"data", "SynthAVS writes the plain 44-byte WAV header"
        offset, fmt, name = draw(st.sampled_from(_WAV_FIELDS))
        bits = struct.calcsize(fmt) * 8
        old = struct.unpack_from(fmt, original, offset)[0]
        value = draw(st.integers(0, 2**bits - 1).filter(lambda v: v != old))
        data = bytearray(original)
        struct.pack_into(fmt, data, offset, value)
        return Corruption(bytes(data), f"WAV header {name} {old} -> {value}", False)
    rate = draw(st.sampled_from([8000, 11025, 22050, 44100, 48000]))
    with wave.open(io.BytesIO(original)) as reader:
        params, frames = reader.getparams(), reader.readframes(reader.getnframes())
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(params.nchannels)
        writer.setsampwidth(params.sampwidth)
        writer.setframerate(rate)
        writer.writeframes(frames)
    return Corruption(buffer.getvalue(), f"sample rate {rate} Hz written", True)


class _RunsCommand:
    """Unpickling this calls os.system: the classic payload."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _StorageFromBytes:
    """Pickles as `torch.storage._load_from_bytes(data)`: the nested route to torch.load."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


SENTINEL_NAME = "avseg-fuzz-payload-ran"


@st.composite
def pickle_corruptions(draw, path: Path, sentinel: Path) -> Corruption:
    how = draw(st.sampled_from(["bytes", "payload", "nested_payload", "object", "shape", "dtype"]))
    protocol = draw(st.integers(2, pickle.HIGHEST_PROTOCOL))
    if how == "bytes":
        return draw(byte_corruptions(path.read_bytes()))
    if how == "payload":
        return Corruption(pickle.dumps(_RunsCommand(f"touch {sentinel}"), protocol=protocol), "os.system payload", True)
    if how == "nested_payload":
        inner = pickle.dumps(_RunsCommand(f"touch {sentinel}"), protocol=2)
        return Corruption(pickle.dumps(_StorageFromBytes(inner), protocol=protocol), "payload in storage bytes", True)
    if how == "object":
        obj = draw(st.sampled_from([[1, 2, 3], {"a": 1.0}, "text", 3.5, None, (5, 1, 96, 64), b"bytes"]))
        return Corruption(pickle.dumps(obj, protocol=protocol), f"pickled {type(obj).__name__}", True)
    if how == "shape":
        shape = draw(st.sampled_from([(4, 1, 96, 64), (5, 96, 64), (5, 1, 96, 63), (0,), (10, 1, 96, 64), ()]))
        return Corruption(pickle.dumps(torch.zeros(shape), protocol=protocol), f"tensor of shape {list(shape)}", True)
    return Corruption(
        pickle.dumps(torch.zeros(LOG_MEL_SHAPE, dtype=torch.int64), protocol=protocol), "int64 tensor", True
    )


def _rows(text: str) -> list[list[str]] | str:
    """The table a CSV text holds (blank rows skipped), or the csv module's error text."""
    try:
        return [
            [c.strip() for c in row] for row in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in row)
        ]
    except csv.Error as error:
        return f"unparseable: {error}"


# columns the project reads (the others, e.g. S4 `start` or AVSS `vid`, are carried but unused,
# so a tree without them still loads and checks clean)
_USED_COLUMNS = {"s4": {"name", "category", "split"}, "ms3": {"video_id", "split"}, "avss": {"uid", "split", "label"}}


@st.composite
def csv_corruptions(draw, path: Path) -> Corruption:
    original = path.read_bytes()
    text = original.decode("utf-8")
    lines = text.splitlines()
    header, body = lines[0], lines[1:]
    how = draw(st.sampled_from(["drop", "duplicate", "garble", "missing_column", "split", "empty", "bytes"]))
    if how == "bytes":
        corruption = draw(byte_corruptions(original))
        try:
            changed = _rows(corruption.data.decode("utf-8")) != _rows(text)
        except UnicodeDecodeError:
            changed = True
        # a truncation that only drops the final newline leaves the same table
        return Corruption(corruption.data, corruption.label, changed and corruption.structural)
    if how == "empty":
        return Corruption(b"", "empty CSV", True)
    row = draw(st.integers(0, len(body) - 1))
    if how == "drop":
        body = body[:row] + body[row + 1 :]
        label = f"row {row + 2} dropped"
    elif how == "duplicate":
        body = body[: row + 1] + [body[row]] + body[row + 1 :]
        label = f"row {row + 2} duplicated"
    elif how == "garble":
        garbage = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
        assume(_rows(garbage) != _rows(body[row]))
        body = body[:row] + [garbage] + body[row + 1 :]
        label = f"row {row + 2} replaced by {garbage!r}"
    elif how == "missing_column":
        names = header.split(",")
        column = draw(st.integers(0, len(names) - 1))
        remove = lambda line: ",".join(c for i, c in enumerate(line.split(",")) if i != column)  # noqa: E731
        header, body = remove(header), [remove(line) for line in body]
        subset = next(s for s, name in CSV_NAMES.items() if name == path.name)
        used = names[column] in _USED_COLUMNS[subset]
        data = ("\n".join([header, *body]) + "\n").encode("utf-8")
        return Corruption(data, f"column {names[column]!r} removed", used)
    else:
        cells = body[row].split(",")
        split_col = lines[0].split(",").index("split")
        value = draw(
            st.text(
                st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=',"'), min_size=1, max_size=8
            )
        )
        assume(value not in SPLITS)
        cells[split_col] = value
        body = body[:row] + [",".join(cells)] + body[row + 1 :]
        label = f"row {row + 2} split {value!r}"
    data = ("\n".join([header, *body]) + "\n").encode("utf-8")
    return Corruption(data, label, True)


# ---------------------------------------------------------------------------------------------
# the tests


def test_pristine_trees_load_and_check_clean(trees):
    for subset in SUBSETS:
        for kind in ("frame", "wav", "pkl"):
            options = _loader_options(subset, kind, trees)
            assert _load_everything(subset, trees.roots[subset], options, "nothing") == []
        assert check_tree(trees.roots[subset], subset) == []
    assert trees.files[("avss", "index_mask")] and trees.files[("s4", "pkl")]


def _draw_file(data, trees: Trees, kinds: tuple[str, ...], subsets: tuple[str, ...] = SUBSETS) -> tuple[str, str, str]:
    choices = [(s, k) for s in subsets for k in kinds if trees.files[(s, k)]]
    subset, kind = data.draw(st.sampled_from(choices), label="subset, kind")
    rel = data.draw(st.sampled_from(trees.files[(subset, kind)]), label="file")
    return subset, kind, rel


def _images(trees: Trees, data, kinds: tuple[str, ...]) -> None:
    subset, kind, rel = _draw_file(data, trees, kinds)
    corruption = data.draw(image_corruptions(trees.roots[subset] / rel, kind, subset), label="corruption")
    _run_case(trees, subset, kind, rel, corruption)


def _wavs(trees: Trees, data) -> None:
    subset, kind, rel = _draw_file(data, trees, ("wav",))
    corruption = data.draw(wav_corruptions(trees.roots[subset] / rel), label="corruption")
    _run_case(trees, subset, kind, rel, corruption)


def _csvs(trees: Trees, data) -> None:
    subset, kind, rel = _draw_file(data, trees, ("csv",))
    corruption = data.draw(csv_corruptions(trees.roots[subset] / rel), label="corruption")
    _run_case(trees, subset, kind, rel, corruption)


@st.composite
def json_corruptions(draw, original: bytes) -> Corruption:
    """Byte corruptions, or JSON nested deeper than Python's recursion limit."""
    if draw(st.booleans()):
        return draw(byte_corruptions(original))
    depth = draw(st.integers(2_000, 100_000))
    opener = draw(st.sampled_from(["[", '{"a":']))
    return Corruption(opener.encode() * depth, f"JSON nested {depth} deep ({opener!r})", True)


def _label2idx(trees: Trees, data) -> None:
    subset, kind, rel = _draw_file(data, trees, ("label2idx",))
    corruption = data.draw(json_corruptions((trees.roots[subset] / rel).read_bytes()), label="corruption")
    _run_case(trees, subset, kind, rel, corruption)


def _pickles(trees: Trees, data, tmp_dir: Path) -> None:
    subset, kind, rel = _draw_file(data, trees, ("pkl",))
    sentinel = tmp_dir / SENTINEL_NAME
    corruption = data.draw(pickle_corruptions(trees.roots[subset] / rel, sentinel), label="corruption")
    _run_case(trees, subset, kind, rel, corruption)
    assert not sentinel.exists(), f"{corruption.label} of {rel}: the pickle payload RAN"
    if "payload" in corruption.label:
        # the same bytes through the loader's reader: refused as unsafe, not merely malformed
        target = tmp_dir / "payload.pkl"
        target.write_bytes(corruption.data)
        with pytest.raises(UnsafePickleError):
            read_log_mel_pickle(target, 5)
        assert not sentinel.exists()


@pytest.mark.timeout(300)
@_settings(50)
@given(data=st.data())
def test_fuzz_frames(trees, data):
    _images(trees, data, ("frame",))


@pytest.mark.timeout(300)
@_settings(60)
@given(data=st.data())
def test_fuzz_masks(trees, data):
    _images(trees, data, ("mask", "index_mask"))


@pytest.mark.timeout(300)
@_settings(30)
@given(data=st.data())
def test_fuzz_wavs(trees, data):
    _wavs(trees, data)


@pytest.mark.timeout(300)
@_settings(80)
@given(data=st.data())
def test_fuzz_csvs(trees, data):
    _csvs(trees, data)


@pytest.mark.timeout(300)
@_settings(15)
@given(data=st.data())
def test_fuzz_label2idx(trees, data):
    _label2idx(trees, data)


@pytest.mark.timeout(300)
@_settings(50)
@given(data=st.data())
def test_fuzz_pickles(trees, data, tmp_path_factory):
    _pickles(trees, data, tmp_path_factory.mktemp("payload", numbered=True))


@pytest.mark.slow
@pytest.mark.timeout(900)
@_settings(300)
@given(data=st.data())
def test_fuzz_images_many(trees, data):
    _images(trees, data, ("frame", "mask", "index_mask"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@_settings(150)
@given(data=st.data())
def test_fuzz_wavs_many(trees, data):
    _wavs(trees, data)


@pytest.mark.slow
@pytest.mark.timeout(900)
@_settings(400)
@given(data=st.data())
def test_fuzz_csvs_and_pickles_many(trees, data, tmp_path_factory):
    if data.draw(st.booleans(), label="csv or pickle"):
        _csvs(trees, data)
    else:
        _pickles(trees, data, tmp_path_factory.mktemp("payload", numbered=True))


# ---------------------------------------------------------------------------------------------
# fixed cases that random truncation rarely hits


@pytest.mark.parametrize("cut", [1, 12, 20])
@pytest.mark.parametrize("kind", ["frame", "mask"])
def test_png_cut_inside_its_trailer_is_reported(trees, kind, cut):
    """A PNG that lost its last bytes (IEND chunk, checksums) still decodes to the same pixels,
    so the loader may accept it; the checker must still report the file as truncated."""
    rel = trees.files[("s4", kind)][0]
    path = trees.roots["s4"] / rel
    original = path.read_bytes()
    _run_case(trees, "s4", kind, rel, Corruption(original[:-cut], f"last {cut} bytes cut", True))


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_label2idx_is_a_data_error(trees, opener):
    """json.load recurses: nesting deeper than the recursion limit must be a DataError, not a
    RecursionError, in the loader and in the checker."""
    _run_case(trees, "avss", "label2idx", "label2idx.json", Corruption(opener.encode() * 100_000, "deep JSON", True))


@pytest.mark.parametrize(
    "content", [b"a\n", b"\n", b"x,y\n", b"\x00"], ids=["one_column", "blank", "two_columns", "nul"]
)
@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_csv_without_a_usable_header_is_reported(trees, subset, content):
    """The loader refuses such a CSV naming it; the checker must name the CSV too (not only list
    every clip folder as having no CSV row)."""
    rel = CSV_NAMES[subset]
    _run_case(trees, subset, "csv", rel, Corruption(content, f"CSV replaced by {content!r}", True))


@pytest.mark.parametrize(
    "content",
    [b"\x80\x04\x8d" + (2**63).to_bytes(8, "little"), b"\x80\x04\x8e" + (2**50).to_bytes(8, "little")],
    ids=["BINUNICODE8_2e63", "BINBYTES8_2e50"],
)
def test_pickle_with_an_absurd_length_field_is_a_data_error(trees, content):
    """Eleven bytes whose length field asks for 2**63 / 2**50 bytes: the unpickler raises
    OverflowError / MemoryError, which must become a DataError naming the file (loader and checker)."""
    rel = trees.files[("s4", "pkl")][0]
    _run_case(trees, "s4", "pkl", rel, Corruption(content, "absurd pickle length field", True))
