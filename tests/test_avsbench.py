"""AVSBench loaders on tiny hand-built trees (exact control over every file) and bad input."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from avseg.data.audio import fit_examples, load_wav, log_mel_examples
from avseg.data.avsbench import AVSSDataset, MS3Dataset, S4Dataset, build_dataset
from avseg.data.palette import AVSS_CLASSES, encode_colour_mask, label2idx_json
from avseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from avseg.errors import ConfigError, DataError, UnsafePickleError

SIZE = 32
SAMPLE_RATE = 16000


# ------------------------------------------------------------------------------------------------
# Tiny tree builders. Frame k of clip c is a flat colour that encodes (c, k); the mask of frame k is
# a rectangle whose width encodes k, so tests can check which file landed where.


def frame_colour(clip: int, k: int) -> tuple[int, int, int]:
    return (10 + 20 * clip, 5 + 30 * k, 200)


def rect_mask(k: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[4:20, 2 : 2 + 3 * (k + 1)] = 1
    return mask


def write_frame(path: Path, clip: int, k: int, size: int = SIZE, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), frame_colour(clip, k)).save(path, format=fmt, quality=100)


def write_binary_mask(path: Path, k: int, mode: str = "L", size: int = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = rect_mask(k, size)
    if mode == "L":
        image = Image.fromarray(mask * 255, mode="L")
    elif mode == "1":
        image = Image.fromarray(mask.astype(bool))
    elif mode == "P":
        image = Image.fromarray(mask * 3, mode="L").convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    else:
        raise AssertionError(mode)
    image.save(path)


def write_wav(path: Path, seconds: float, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wav = (0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
    soundfile.write(path, wav, SAMPLE_RATE, subtype="PCM_16")
    return wav


def write_pkl(path: Path, tensor: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(tensor.clone().requires_grad_(True), handle)


def build_s4_tree(root: Path, counts: dict[str, int], *, mask_mode: str = "L", size: int = SIZE) -> Path:
    data = root / "s4_data"
    rows = []
    clip = 0
    for split, count in counts.items():
        for _ in range(count):
            name, category = f"s4clip{clip}", ("dog" if clip % 2 else "piano")
            rows.append([name, "0", category, split])
            for k in range(1, 6):
                write_frame(data / "visual_frames" / split / category / name / f"{name}_{k}.png", clip, k - 1, size)
                if split != "train" or k == 1:
                    write_binary_mask(
                        data / "gt_masks" / split / category / name / f"{name}_{k}.png", k - 1, mask_mode, size
                    )
            write_wav(data / "audio_wav" / split / category / f"{name}.wav", 5.0, seed=clip)
            write_pkl(
                data / "audio_log_mel" / split / category / f"{name}.pkl", torch.full((5, 1, 96, 64), float(clip))
            )
            clip += 1
    with open(root / "s4_meta_data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "start_time", "category", "split"])
        writer.writerows(rows)
    return root


def build_ms3_tree(root: Path, counts: dict[str, int], *, size: int = SIZE) -> Path:
    data = root / "ms3_data"
    rows = []
    clip = 0
    for split, count in counts.items():
        for _ in range(count):
            name = f"ms3clip{clip}"
            rows.append([name, split])
            for k in range(1, 6):
                write_frame(data / "visual_frames" / name / f"{name}.mp4_{k}.png", clip, k - 1, size)
                write_binary_mask(data / "gt_masks" / split / name / f"{name}_{k}.png", k - 1, "L", size)
            write_wav(data / "audio_wav" / split / f"{name}.wav", 5.0, seed=clip)
            write_pkl(data / "audio_log_mel" / split / f"{name}.pkl", torch.full((5, 1, 96, 64), float(clip)))
            clip += 1
    with open(root / "ms3_meta_data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "split"])
        writer.writerows(rows)
    return root


def avss_class_mask(clip: int, i: int, size: int = SIZE) -> np.ndarray:
    """Class indices: background plus a rectangle of class (clip * 7 + i) % 70 + 1."""
    mask = np.zeros((size, size), dtype=np.int64)
    mask[2:12, 3 : 3 + 2 * (i + 1)] = (clip * 7 + i) % 70 + 1
    mask[20:26, 20:30] = 70  # woman, the last class
    return mask


def build_avss_tree(root: Path, clips: list[tuple[str, str]], *, size: int = SIZE, jpg: bool = True) -> Path:
    """clips: (label kind, split) per clip, in CSV order."""
    rows = []
    frame_counts = {"v1s": 5, "v1m": 5, "v2": 10}
    for clip, (label, split) in enumerate(clips):
        uid = f"{label}_uid{clip}"
        clip_dir = root / label / uid
        count = frame_counts[label]
        labelled = 1 if (label == "v1s" and split == "train") else count
        for i in range(count):
            write_frame(clip_dir / "frames" / f"{i}.jpg", clip, i, size, fmt="JPEG" if jpg else "PNG")
            if i < labelled:
                classes = avss_class_mask(clip, i, size)
                (clip_dir / "labels_rgb").mkdir(parents=True, exist_ok=True)
                (clip_dir / "labels_semantic").mkdir(parents=True, exist_ok=True)
                Image.fromarray(encode_colour_mask(classes)).save(clip_dir / "labels_rgb" / f"{i}.png")
                Image.fromarray(classes.astype(np.uint8), mode="L").save(clip_dir / "labels_semantic" / f"{i}.png")
        write_wav(clip_dir / "audio.wav", float(count), seed=clip)
        rows.append([f"vid{clip}", uid, "0", "0", "x", split, label])
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
        writer.writerows(rows)
    (root / "label2idx.json").write_text(json.dumps(label2idx_json()))
    return root


def expected_frame(clip: int, k: int) -> torch.Tensor:
    colour = torch.tensor(frame_colour(clip, k), dtype=torch.float32) / 255.0
    return (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


# ------------------------------------------------------------------------------------------------
# Layouts


@pytest.fixture(scope="module")
def s4_root(tmp_path_factory) -> Path:
    return build_s4_tree(tmp_path_factory.mktemp("s4"), {"train": 2, "val": 1, "test": 2})


@pytest.fixture(scope="module")
def ms3_root(tmp_path_factory) -> Path:
    return build_ms3_tree(tmp_path_factory.mktemp("ms3"), {"train": 1, "val": 1, "test": 1})


@pytest.fixture(scope="module")
def avss_root(tmp_path_factory) -> Path:
    clips = [("v1s", "train"), ("v2", "train"), ("v1m", "train"), ("v1s", "test"), ("v2", "test")]
    return build_avss_tree(tmp_path_factory.mktemp("avss"), clips)


def test_s4_train_item_only_frame_one_labelled(s4_root):
    dataset = S4Dataset(s4_root, "train", image_size=SIZE)
    assert len(dataset) == 2 and dataset.video_ids == ["s4clip0", "s4clip1"]
    item = dataset[1]
    assert set(item) == {"frames", "masks", "frame_valid", "label_valid", "audio", "video_id", "index"}
    assert item["frames"].shape == (5, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
    assert item["masks"].shape == (5, SIZE, SIZE) and item["masks"].dtype == torch.long
    assert item["label_valid"].tolist() == [True, False, False, False, False]
    assert item["frame_valid"].tolist() == [True] * 5
    assert item["video_id"] == "s4clip1" and item["index"] == 1
    assert torch.equal(item["masks"][0], torch.from_numpy(rect_mask(0)).long())
    assert item["masks"][1:].abs().sum() == 0
    for k in range(5):  # frame k of clip 1 in slot k, ImageNet-normalised
        assert torch.allclose(item["frames"][k, :, 0, 0], expected_frame(1, k), atol=1e-5)
    assert item["audio"].shape == (5, 1, 96, 64) and item["audio"].dtype == torch.float32


def test_s4_val_all_frames_labelled_in_csv_order(s4_root):
    test = S4Dataset(s4_root, "test", image_size=SIZE)
    assert test.video_ids == ["s4clip3", "s4clip4"]
    item = test[0]
    assert item["label_valid"].all()
    assert item["index"] == 0
    for k in range(5):
        assert torch.equal(item["masks"][k], torch.from_numpy(rect_mask(k)).long())
    assert set(item["masks"].unique().tolist()) == {0, 1}


def test_ms3_mp4_frame_names_and_all_labels(ms3_root):
    dataset = MS3Dataset(ms3_root, "train", image_size=SIZE)
    assert dataset.records[0].frame_paths[2].name == "ms3clip0.mp4_3.png"
    item = dataset[0]
    assert item["label_valid"].all() and item["frame_valid"].all()
    for k in range(5):
        assert torch.equal(item["masks"][k], torch.from_numpy(rect_mask(k)).long())
        assert torch.allclose(item["frames"][k, :, 5, 5], expected_frame(0, k), atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_binary_mask_modes_become_zero_one(tmp_path, mode):
    root = build_s4_tree(tmp_path, {"val": 1}, mask_mode=mode)
    item = S4Dataset(root, "val", image_size=SIZE, audio_source="pkl")[0]
    for k in range(5):
        assert torch.equal(item["masks"][k], torch.from_numpy(rect_mask(k)).long())


def test_avss_padding_flags_and_classes(avss_root):
    train = AVSSDataset(avss_root, "train", image_size=SIZE)
    assert train.video_ids == ["v1s_uid0", "v2_uid1", "v1m_uid2"]
    v1s, v2, v1m = train[0], train[1], train[2]
    assert v1s["frames"].shape == (10, 3, SIZE, SIZE) and v1s["masks"].shape == (10, SIZE, SIZE)
    assert v1s["frame_valid"].tolist() == [True] * 5 + [False] * 5
    assert v1s["label_valid"].tolist() == [True] + [False] * 9
    assert v1m["label_valid"].tolist() == [True] * 5 + [False] * 5
    assert v2["frame_valid"].all() and v2["label_valid"].all()
    # padded frames are zeros after normalisation (the mean colour), masks and audio zero there
    assert v1m["frames"][5:].abs().sum() == 0 and v1m["frames"][:5].abs().sum() > 0
    assert v1m["masks"][5:].abs().sum() == 0
    assert v1m["audio"].shape == (10, 1, 96, 64) and v1m["audio"][5:].abs().sum() == 0
    assert v1m["audio"][:5].abs().sum() > 0
    for i in range(5):
        assert torch.equal(v1m["masks"][i], torch.from_numpy(avss_class_mask(2, i)))
    for i in range(10):
        assert torch.equal(v2["masks"][i], torch.from_numpy(avss_class_mask(1, i)))
    assert torch.equal(v1s["masks"][0], torch.from_numpy(avss_class_mask(0, 0)))
    assert v1s["masks"][1:].abs().sum() == 0
    assert int(v2["masks"].max()) == 70


def test_avss_test_split_v1s_fully_labelled_and_semantic_source(avss_root):
    rgb = AVSSDataset(avss_root, "test", image_size=SIZE)
    semantic = AVSSDataset(avss_root, "test", image_size=SIZE, mask_source="semantic")
    assert rgb.video_ids == ["v1s_uid3", "v2_uid4"]
    assert rgb[0]["label_valid"].tolist() == [True] * 5 + [False] * 5
    for index in range(2):
        assert torch.equal(rgb[index]["masks"], semantic[index]["masks"])
    assert rgb.classes == AVSS_CLASSES


def test_wav_audio_matches_reference_pipeline(s4_root):
    dataset = S4Dataset(s4_root, "val", image_size=SIZE)
    wav, rate = load_wav(dataset.records[0].wav_path)
    expected = fit_examples(log_mel_examples(wav, rate), 5, "repeat_last")
    assert torch.allclose(dataset[0]["audio"], expected)


def test_short_wav_repeats_last_example_s4(tmp_path):
    root = build_s4_tree(tmp_path, {"val": 1})
    wav_path = root / "s4_data/audio_wav/val/piano/s4clip0.wav"
    write_wav(wav_path, 3.0, seed=3)
    audio = S4Dataset(root, "val", image_size=SIZE)[0]["audio"]
    assert torch.equal(audio[2], audio[3]) and torch.equal(audio[3], audio[4])
    assert not torch.equal(audio[1], audio[2])


def test_pkl_audio_source(s4_root, ms3_root):
    item = S4Dataset(s4_root, "train", image_size=SIZE, audio_source="pkl")[1]
    assert item["audio"].shape == (5, 1, 96, 64) and not item["audio"].requires_grad
    assert torch.all(item["audio"] == 1.0)
    assert torch.all(MS3Dataset(ms3_root, "test", image_size=SIZE, audio_source="pkl")[0]["audio"] == 2.0)


def test_pkl_refused_for_avss(avss_root):
    with pytest.raises(ConfigError, match="pkl"):
        AVSSDataset(avss_root, "train", audio_source="pkl")


def test_embeddings_audio_source(tmp_path, s4_root, avss_root):
    emb = tmp_path / "emb"
    dataset = S4Dataset(s4_root, "val", image_size=SIZE, audio_source="embeddings", embeddings_dir=emb)
    path = dataset.embedding_path(dataset.records[0])
    # mirrors the WAV's path inside the tree (python -m avseg.data.embeddings writes this layout)
    assert path == emb / "s4_data" / "audio_wav" / "val" / "piano" / "s4clip2.npy"
    path.parent.mkdir(parents=True)
    values = np.arange(5 * 128, dtype=np.float32).reshape(5, 128)
    np.save(path, values)
    assert torch.equal(dataset[0]["audio"], torch.from_numpy(values))
    np.save(path, values[:4])
    with pytest.raises(DataError, match="shape") as info:
        dataset[0]
    assert info.value.path == str(path)

    avss = AVSSDataset(avss_root, "test", image_size=SIZE, audio_source="embeddings", embeddings_dir=emb)
    v1s_path = avss.embedding_path(avss.records[0])
    assert v1s_path == emb / "v1s" / "v1s_uid3" / "audio.npy"
    v1s_path.parent.mkdir(parents=True)
    np.save(v1s_path, np.ones((5, 128), dtype=np.float32))  # real frames only: padded with zeros
    audio = avss[0]["audio"]
    assert audio.shape == (10, 128) and audio[:5].eq(1).all() and audio[5:].eq(0).all()
    np.save(v1s_path, np.ones((10, 128), dtype=np.float32))  # all 10: padded frames zeroed
    audio = avss[0]["audio"]
    assert audio[:5].eq(1).all() and audio[5:].eq(0).all()


def test_audio_transform_applies_to_waveform(s4_root):
    calls = []

    def mute(wav: np.ndarray, sample_rate: int, index: int) -> np.ndarray:
        calls.append((sample_rate, index))
        return np.zeros_like(wav)

    audio = S4Dataset(s4_root, "test", image_size=SIZE, audio_transform=mute)[1]["audio"]
    assert calls == [(SAMPLE_RATE, 1)]
    assert torch.allclose(audio, torch.full_like(audio, float(np.log(0.01))))
    with pytest.raises(ConfigError, match="audio_transform"):
        S4Dataset(s4_root, "test", audio_source="pkl", audio_transform=mute)


def test_build_dataset_and_bad_options(s4_root):
    assert isinstance(build_dataset("s4", s4_root, "val", image_size=SIZE), S4Dataset)
    with pytest.raises(ConfigError, match="subset"):
        build_dataset("s5", s4_root, "val")
    with pytest.raises(ConfigError, match="split"):
        S4Dataset(s4_root, "training")
    with pytest.raises(ConfigError, match="audio_source"):
        S4Dataset(s4_root, "val", audio_source="mp3")
    with pytest.raises(ConfigError, match="embeddings_dir"):
        S4Dataset(s4_root, "val", audio_source="embeddings")


def test_missing_root_and_csv_errors_say_how_to_get_data(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        S4Dataset(missing, "train")
    assert info.value.path == str(missing)
    assert "docs/DATA.md" in str(info.value) and "python -m avseg.data.synth" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        AVSSDataset(tmp_path / "empty", "train")
    assert info.value.path == str(tmp_path / "empty" / "metadata.csv")
    assert "docs/DATA.md" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Bad input: each raises DataError naming the file, never zeros / background / a skipped clip.


@pytest.fixture()
def fresh_s4(tmp_path) -> Path:
    return build_s4_tree(tmp_path, {"val": 1})


def frame_path(root: Path, k: int) -> Path:
    return root / "s4_data/visual_frames/val/piano/s4clip0" / f"s4clip0_{k}.png"


def test_truncated_frame_raises(fresh_s4):
    path = frame_path(fresh_s4, 3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(path) and "decode" in info.value.problem


def test_undecodable_frame_raises(fresh_s4):
    path = frame_path(fresh_s4, 2)
    path.write_bytes(b"this is not a png at all")
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(path)


def test_missing_frame_and_mask_raise(fresh_s4):
    frame = frame_path(fresh_s4, 4)
    frame.unlink()
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(frame) and "missing frame" in info.value.problem
    write_frame(frame, 0, 3)
    mask = fresh_s4 / "s4_data/gt_masks/val/piano/s4clip0/s4clip0_5.png"
    mask.unlink()
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(mask) and "missing" in info.value.problem


def test_unknown_mask_colour_raises(tmp_path):
    root = build_avss_tree(tmp_path, [("v1m", "val")])
    path = root / "v1m/v1m_uid0/labels_rgb/3.png"
    rgb = np.array(Image.open(path).convert("RGB"))
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as info:
        AVSSDataset(root, "val", image_size=SIZE)[0]
    assert info.value.path == str(path) and "(1, 2, 3)" in info.value.problem


def test_semantic_index_out_of_range_raises(tmp_path):
    root = build_avss_tree(tmp_path, [("v1m", "val")])
    path = root / "v1m/v1m_uid0/labels_semantic/1.png"
    Image.fromarray(np.full((SIZE, SIZE), 71, dtype=np.uint8), mode="L").save(path)
    with pytest.raises(DataError) as info:
        AVSSDataset(root, "val", image_size=SIZE, mask_source="semantic")[0]
    assert info.value.path == str(path)


def test_label2idx_with_wrong_keys_raises(tmp_path):
    root = build_avss_tree(tmp_path, [("v1m", "val")])
    mapping = label2idx_json()
    swapped = {
        ("airplane" if k == "accordion" else "accordion" if k == "airplane" else k): v for k, v in mapping.items()
    }
    (root / "label2idx.json").write_text(json.dumps(swapped))
    with pytest.raises(DataError) as info:
        AVSSDataset(root, "val", image_size=SIZE)
    assert info.value.path == str(root / "label2idx.json") and "key 1" in info.value.problem


def test_truncated_wav_and_bad_header_raise(fresh_s4):
    wav = fresh_s4 / "s4_data/audio_wav/val/piano/s4clip0.wav"
    data = wav.read_bytes()
    wav.write_bytes(data[:30])
    dataset = S4Dataset(fresh_s4, "val", image_size=SIZE)
    with pytest.raises(DataError) as info:
        dataset[0]
    assert info.value.path == str(wav)
    wav.write_bytes(b"JUNK" + data[4:])
    with pytest.raises(DataError) as info:
        dataset[0]
    assert info.value.path == str(wav) and "header" in info.value.problem
    wav.unlink()
    with pytest.raises(DataError) as info:
        dataset[0]
    assert info.value.path == str(wav)


class _Payload:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_without_running(fresh_s4, tmp_path):
    pkl = fresh_s4 / "s4_data/audio_log_mel/val/piano/s4clip0.pkl"
    marker = tmp_path / "payload_ran"
    pkl.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafePickleError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(pkl)
    assert not marker.exists()


def test_pickle_with_wrong_shape_raises(fresh_s4):
    pkl = fresh_s4 / "s4_data/audio_log_mel/val/piano/s4clip0.pkl"
    write_pkl(pkl, torch.zeros(4, 1, 96, 64))
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(pkl) and "shape" in info.value.problem


def test_mask_of_other_size_than_frame_raises(fresh_s4):
    mask = fresh_s4 / "s4_data/gt_masks/val/piano/s4clip0/s4clip0_2.png"
    Image.fromarray(np.zeros((SIZE, SIZE + 2), dtype=np.uint8), mode="L").save(mask)
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(mask)


def test_unknown_avss_label_kind_raises(tmp_path):
    root = build_avss_tree(tmp_path, [("v1m", "val")])
    text = (root / "metadata.csv").read_text().replace(",v1m", ",v3")
    (root / "metadata.csv").write_text(text)
    with pytest.raises(DataError) as info:
        AVSSDataset(root, "val")
    assert info.value.path == str(root / "metadata.csv") and "v3" in info.value.problem


# ------------------------------------------------------------------------------------------------
# Round trip: SynthAVS generator -> loader, all three layouts.

SYNTH_CLIPS = {"train": 3, "val": 1, "test": 3}


@pytest.fixture(scope="module")
def synth_trees(tmp_path_factory) -> dict[str, Path]:
    from avseg.data.synth import generate

    base = tmp_path_factory.mktemp("synth")
    return {
        subset: generate(
            base / subset, subset, seed=1, image_size=SIZE, clips_per_split=SYNTH_CLIPS, write_pkl=subset != "avss"
        )
        for subset in ("s4", "ms3", "avss")
    }


def sidecar(root: Path) -> dict:
    return json.loads((root / "synth_sources.json").read_text())


def csv_ids(root: Path, name: str, split: str, id_column: int, split_column: int) -> list[str]:
    with open(root / name, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row[id_column] for row in rows if row[split_column] == split]


@pytest.mark.parametrize("subset", ["s4", "ms3"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_synth_round_trip_binary(synth_trees, subset, split):
    root = synth_trees[subset]
    dataset_cls = S4Dataset if subset == "s4" else MS3Dataset
    wav_set = dataset_cls(root, split, image_size=SIZE)
    pkl_set = dataset_cls(root, split, image_size=SIZE, audio_source="pkl")
    csv_name, split_col = ("s4_meta_data.csv", 3) if subset == "s4" else ("ms3_meta_data.csv", 1)
    assert wav_set.video_ids == csv_ids(root, csv_name, split, 0, split_col)
    assert len(wav_set) == SYNTH_CLIPS[split]
    clips = sidecar(root)["clips"]
    for index in range(len(wav_set)):
        item = wav_set[index]
        assert item["index"] == index
        assert item["frames"].shape == (5, 3, SIZE, SIZE) and item["frames"].dtype == torch.float32
        assert item["masks"].shape == (5, SIZE, SIZE) and item["masks"].dtype == torch.long
        assert item["audio"].shape == (5, 1, 96, 64) and item["audio"].dtype == torch.float32
        assert item["frame_valid"].dtype == torch.bool and item["frame_valid"].all()
        labelled = [True] + [split != "train" or subset == "ms3"] * 4
        assert item["label_valid"].tolist() == labelled
        assert set(item["masks"].unique().tolist()) <= {0, 1}
        sounding = clips[item["video_id"]]["sounding"]
        for t in range(5):
            if labelled[t]:  # GT present where something sounds (sounding objects stay visible)
                assert bool(item["masks"][t].any()) == bool(sounding[t])
            else:  # S4 train: GT on frame 1 only
                assert not item["masks"][t].any()
        # the official pickled log-mel and the one computed from the WAV agree
        assert torch.allclose(pkl_set[index]["audio"], item["audio"], atol=1e-3)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("mask_source", ["rgb", "semantic"])
def test_synth_round_trip_avss(synth_trees, split, mask_source):
    root = synth_trees["avss"]
    dataset = AVSSDataset(root, split, image_size=SIZE, mask_source=mask_source)
    assert dataset.video_ids == csv_ids(root, "metadata.csv", split, 1, 5)
    info = sidecar(root)
    clips = info["clips"]
    kinds = set()
    for index in range(len(dataset)):
        item = dataset[index]
        entry = clips[item["video_id"]]
        kind, real = entry["kind"], entry["num_frames"]
        kinds.add(kind)
        assert item["frames"].shape == (10, 3, SIZE, SIZE) and item["masks"].shape == (10, SIZE, SIZE)
        assert item["audio"].shape == (10, 1, 96, 64)
        assert item["frame_valid"].tolist() == [True] * real + [False] * (10 - real)
        labelled = 1 if (kind == "v1s" and split == "train") else real
        assert item["label_valid"].tolist() == [True] * labelled + [False] * (10 - labelled)
        assert item["frames"][real:].abs().sum() == 0 and item["audio"][real:].abs().sum() == 0
        assert item["masks"][labelled:].abs().sum() == 0
        avss_index = {o["instance"]: o["avss_index"] for o in entry["objects"]}
        for t in range(labelled):
            expected = {avss_index[s["instance"]] for s in entry["sounding"][t]}
            assert set(item["masks"][t].unique().tolist()) - {0} == expected
    assert kinds == {"v1s", "v1m", "v2"}


def test_embedding_paths_match_the_embeddings_command(synth_trees, tmp_path):
    from avseg.data.embeddings import embedding_path

    for subset, dataset_cls in (("s4", S4Dataset), ("ms3", MS3Dataset), ("avss", AVSSDataset)):
        root = synth_trees[subset]
        dataset = dataset_cls(root, "test", audio_source="embeddings", embeddings_dir=tmp_path)
        for record in dataset.records:
            assert dataset.embedding_path(record) == embedding_path(record.wav_path, root=root, embeddings_dir=tmp_path)


def test_main_process_loading_uses_one_thread_and_restores(s4_root):
    seen = []

    def record_threads(wav: np.ndarray, sample_rate: int, index: int) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return wav

    before = torch.get_num_threads()
    S4Dataset(s4_root, "test", image_size=SIZE, audio_transform=record_threads)[0]
    S4Dataset(s4_root, "test", image_size=SIZE, audio_transform=record_threads, loading_threads=None)[0]
    assert seen == [1, before] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="loading_threads"):
        S4Dataset(s4_root, "test", loading_threads=0)


def test_frame_of_odd_size_is_the_one_blamed(fresh_s4):
    odd = frame_path(fresh_s4, 1)  # the first frame: the others set the clip's size
    write_frame(odd, 0, 0, size=SIZE // 2)
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE, audio_source="pkl")[0]
    assert info.value.path == str(odd) and f"{SIZE}x{SIZE}" in info.value.problem


@pytest.mark.parametrize("rate", [7, 44101, 3_000_000_000 // 1000])
def test_implausible_sample_rate_raises_before_resampling(fresh_s4, rate):
    wav = fresh_s4 / "s4_data/audio_wav/val/piano/s4clip0.wav"
    data = bytearray(wav.read_bytes())
    data[24:28] = rate.to_bytes(4, "little")  # the header's sample rate field
    wav.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        S4Dataset(fresh_s4, "val", image_size=SIZE)[0]
    assert info.value.path == str(wav) and "sample rate" in info.value.problem


def test_common_sample_rates_are_resampled(fresh_s4):
    wav = fresh_s4 / "s4_data/audio_wav/val/piano/s4clip0.wav"
    soundfile.write(wav, np.zeros(5 * 44100, dtype=np.float32), 44100)
    assert S4Dataset(fresh_s4, "val", image_size=SIZE)[0]["audio"].shape == (5, 1, 96, 64)
