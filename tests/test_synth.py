"""SynthAVS generator: layouts, content, determinism, the cache and all-or-nothing generation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avseg.data import synth
from avseg.data.check import check_tree
from avseg.data.palette import AVSS_CLASSES, decode_colour_mask
from avseg.errors import ConfigError, DataError

SMALL = {"image_size": 48, "clips_per_split": {"train": 4, "val": 2, "test": 2}}
AVSS_SMALL = {"image_size": 48, "clips_per_split": {"train": 6, "val": 3, "test": 3}}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("synth")
    return {
        "s4": synth.generate(base / "s4", "s4", write_pkl=True, **SMALL),
        "ms3": synth.generate(base / "ms3", "ms3", write_pkl=True, **SMALL),
        "avss": synth.generate(base / "avss", "avss", **AVSS_SMALL),
    }


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_generated_trees_check_clean(trees, subset):
    assert check_tree(trees[subset], subset, image_size=48) == []
    sidecar = json.loads((trees[subset] / synth.SIDECAR_NAME).read_text())
    assert sidecar["subset"] == subset and sidecar["options"]["image_size"] == 48
    assert len(sidecar["classes"]) == 8


def test_s4_layout_and_ground_truth(trees):
    root = trees["s4"]
    with open(root / "s4_meta_data.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["name", "start", "category", "split"]
    assert [r[3] for r in rows[1:]].count("train") == 4
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    for name, start, category, split in rows[1:]:
        assert int(start) >= 0
        clip = sidecar["clips"][name]
        # Exactly one sounding object, the same one every second, named by the category.
        assert all(len(second) == 1 for second in clip["sounding"])
        assert len({second[0]["instance"] for second in clip["sounding"]}) == 1
        assert clip["sounding"][0][0]["class"] == category
        frame_dir = root / "s4_data/visual_frames" / split / category / name
        mask_dir = root / "s4_data/gt_masks" / split / category / name
        assert sorted(p.name for p in frame_dir.iterdir()) == [f"{name}_{k}.png" for k in range(1, 6)]
        expected_masks = [1] if split == "train" else [1, 2, 3, 4, 5]
        assert sorted(p.name for p in mask_dir.iterdir()) == [f"{name}_{k}.png" for k in expected_masks]
        mask = np.asarray(Image.open(mask_dir / f"{name}_1.png"))
        assert Image.open(mask_dir / f"{name}_1.png").mode == "L"
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert (root / "s4_data/audio_log_mel" / split / category / f"{name}.pkl").is_file()
        with wave.open(str(root / "s4_data/audio_wav" / split / category / f"{name}.wav")) as handle:
            assert (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (16000, 1, 2)
            assert handle.getnframes() == 5 * 16000


def test_ms3_layout_sources_and_masks(trees):
    root = trees["ms3"]
    with open(root / "ms3_meta_data.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["video_id", "split"]
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    for name, split in rows[1:]:
        clip = sidecar["clips"][name]
        assert {p.name for p in (root / "ms3_data/visual_frames" / name).iterdir()} == {
            f"{name}.mp4_{k}.png" for k in range(1, 6)
        }
        sources = {entry["instance"] for second in clip["sounding"] for entry in second}
        assert 2 <= len(sources) <= 3
        for k, second in enumerate(clip["sounding"], start=1):
            assert 1 <= len(second) <= 3
            mask = np.asarray(Image.open(root / "ms3_data/gt_masks" / split / name / f"{name}_{k}.png"))
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert (root / "ms3_data/audio_wav" / split / f"{name}.wav").is_file()
        assert (root / "ms3_data/audio_log_mel" / split / f"{name}.pkl").is_file()


def test_avss_layout_kinds_labels_and_colours(trees):
    root = trees["avss"]
    label2idx = json.loads((root / "label2idx.json").read_text())
    assert list(label2idx) == list(AVSS_CLASSES)
    with open(root / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]
    assert {r["label"] for r in rows} == {"v1s", "v1m", "v2"}
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    class_names = {c["name"] for c in sidecar["classes"]}
    assert class_names <= set(AVSS_CLASSES[1:]) and len(class_names) == 8
    for row in rows:
        clip_dir = root / row["label"] / row["uid"]
        num_frames = 10 if row["label"] == "v2" else 5
        labelled = 1 if (row["label"] == "v1s" and row["split"] == "train") else num_frames
        assert sorted(p.name for p in (clip_dir / "frames").iterdir()) == sorted(f"{i}.jpg" for i in range(num_frames))
        assert sorted(p.name for p in (clip_dir / "labels_rgb").iterdir()) == sorted(
            f"{i}.png" for i in range(labelled)
        )
        assert (clip_dir / "audio.wav").is_file()
        clip = sidecar["clips"][row["uid"]]
        assert clip["num_frames"] == num_frames and clip["kind"] == row["label"]
        for i in range(labelled):
            rgb = np.asarray(Image.open(clip_dir / "labels_rgb" / f"{i}.png").convert("RGB"))
            indices, unknown = decode_colour_mask(rgb)
            semantic = np.asarray(Image.open(clip_dir / "labels_semantic" / f"{i}.png"))
            assert not unknown.any() and np.array_equal(indices, semantic)
            heard = {AVSS_CLASSES.index(entry["class"]) for entry in clip["sounding"][i]}
            present = set(np.unique(semantic)) - {0}
            assert present and present <= heard
        assert row["a_obj"] == "_".join(sorted({e["class"] for s in clip["sounding"] for e in s}))


def _plans(subset: str, split: str, count: int, **options):
    resolved = synth.resolve_options(subset, image_size=48, **options)
    catalogue = synth.class_catalogue(resolved["num_classes"])
    return [
        synth.plan_clip(options=resolved, catalogue=catalogue, subset=subset, split=split, index=i)
        for i in range(count)
    ]


def test_scene_alone_does_not_say_which_object_sounds():
    plans = _plans("s4", "train", 96)
    with_distractor = [p for p in plans if len(p.classes) > 1]
    assert len(with_distractor) / len(plans) >= 0.7
    sounding_classes = {p.classes[int(np.flatnonzero(p.sounding[:, 0])[0])].index for p in plans}
    silent_classes = {spec.index for p in plans for j, spec in enumerate(p.classes) if not p.sounding[j].any()}
    assert sounding_classes == silent_classes == set(range(8))
    # Visual-only guesses (largest, front-most object) are right in well under 80% of the clips
    # that hold a distractor.
    largest = front = 0
    for p in with_distractor:
        source = int(np.flatnonzero(p.sounding[:, 0])[0])
        areas = [(p.instances[0] == j + 1).sum() for j in range(len(p.classes))]
        largest += int(np.argmax(areas)) == source
        front += source == len(p.classes) - 1
    assert largest / len(with_distractor) < 0.75
    assert front / len(with_distractor) < 0.75


def test_class_sounds_are_separable_in_log_mel():
    from avseg.data.audio import log_mel_examples

    def features(plans):
        # One log-mel call for all clips: each 5 s clip is zero-padded to 6 examples' worth of
        # samples so examples never straddle two clips; the padded 6th example is dropped.
        stride = 96 * 160  # samples per 0.96 s example
        padded = [np.pad(p.audio.astype(np.float32) / 32768.0, (0, 6 * stride - p.audio.shape[0])) for p in plans]
        examples = log_mel_examples(np.concatenate(padded), synth.SAMPLE_RATE)[:, 0].numpy()
        xs, ys = [], []
        for i, p in enumerate(plans):
            source = int(np.flatnonzero(p.sounding[:, 0])[0])
            for example in examples[6 * i : 6 * i + 5]:
                spectrum = example.mean(axis=0)
                xs.append(spectrum - spectrum.mean())
                ys.append(p.classes[source].index)
        return np.stack(xs), np.array(ys)

    train_x, train_y = features(_plans("s4", "train", 16, snr_db=(5.0, 10.0)))
    test_x, test_y = features(_plans("s4", "val", 8, snr_db=(5.0, 10.0)))
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(8)])
    predicted = np.argmin(((test_x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_y).mean() >= 0.9


def test_objects_move_smoothly_and_stay_visible():
    for p in _plans("ms3", "val", 12):
        for j in range(len(p.classes)):
            assert all((p.instances[t] == j + 1).any() for t in range(p.num_frames))
            centres = [np.argwhere(p.instances[t] == j + 1).mean(axis=0) for t in range(p.num_frames)]
            steps = np.linalg.norm(np.diff(np.stack(centres), axis=0), axis=1)
            assert steps.max() < 0.3 * 48  # no jumps between consecutive frames


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    from avseg.data.safe_pickle import load_tensor_pickle

    for subset, extra in (("s4", {"write_pkl": True}), ("ms3", {"write_pkl": True}), ("avss", {})):
        # AVSS: train clips cycle v1s, v1m, v2; one val clip covers the v1s val/test mask count.
        clips = {"train": 3 if subset == "avss" else 1, "val": 1, "test": 0}
        options = {"image_size": 32, "clips_per_split": clips}
        a = _files(synth.generate(tmp_path / f"{subset}-a", subset, seed=3, **options, **extra))
        b = _files(synth.generate(tmp_path / f"{subset}-b", subset, seed=3, **options, **extra))
        assert a.keys() == b.keys()
        for rel in a:
            if rel.endswith(".pkl"):
                ta = load_tensor_pickle(tmp_path / f"{subset}-a" / rel)
                tb = load_tensor_pickle(tmp_path / f"{subset}-b" / rel)
                assert ta.shape == (5, 1, 96, 64) and bool((ta == tb).all())
            else:
                assert a[rel] == b[rel], rel
        if subset == "s4":
            c = _files(synth.generate(tmp_path / f"{subset}-c", subset, seed=4, **options, **extra))
            assert [rel for rel in c if rel.endswith(".wav")] != [rel for rel in a if rel.endswith(".wav")] or any(
                c[rel] != a[rel] for rel in a if rel.endswith((".png", ".wav"))
            )


def test_options_are_validated():
    with pytest.raises(ConfigError, match="subset"):
        synth.resolve_options("s5")
    with pytest.raises(ConfigError, match="num_classes"):
        synth.resolve_options("s4", num_classes=1)
    with pytest.raises(ConfigError, match="snr_db"):
        synth.resolve_options("s4", snr_db=(20, 10))
    with pytest.raises(ConfigError, match="clips_per_split"):
        synth.resolve_options("s4", clips_per_split={"train": 3})
    with pytest.raises(ConfigError, match="unknown key"):
        synth.resolve_options("s4", colour="red")
    with pytest.raises(ConfigError, match="write_pkl"):
        synth.resolve_options("avss", write_pkl=True)
    # Explicit defaults resolve (and hash) exactly like omitted ones.
    assert synth.resolve_options("ms3") == synth.resolve_options("ms3", seed=0, snr_db=[10, 20])
    key = synth.cache_key("s4", synth.resolve_options("s4"))
    assert key != synth.cache_key("s4", synth.resolve_options("s4", seed=1))
    assert key != synth.cache_key("ms3", synth.resolve_options("ms3"))


def test_generate_never_writes_into_an_existing_tree(tmp_path):
    existing = tmp_path / "user_data"
    existing.mkdir()
    (existing / "s4_meta_data.csv").write_text("mine\n")
    with pytest.raises(DataError, match="not empty"):
        synth.generate(existing, "s4", **SMALL)
    assert [p.name for p in existing.iterdir()] == ["s4_meta_data.csv"]
    assert (existing / "s4_meta_data.csv").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_data"]  # no partial left


def test_ensure_reuses_a_complete_tree(tmp_path, monkeypatch):
    root = synth.ensure_synth_tree(tmp_path, "s4", **SMALL)
    assert root.parent == tmp_path and root.name.startswith("s4-")
    assert (root / synth.COMPLETE_MARKER).is_file()

    def fail(*args, **kwargs):
        raise AssertionError("a complete tree must not be regenerated")

    monkeypatch.setattr(synth.tree, "_write_tree", fail)
    assert synth.ensure_synth_tree(tmp_path, "s4", **SMALL) == root
    monkeypatch.undo()
    other = synth.ensure_synth_tree(tmp_path, "s4", seed=1, **SMALL)
    assert other != root and other.parent == tmp_path


def test_interrupted_generation_is_never_used_and_is_rebuilt(tmp_path, monkeypatch):
    original = synth.layouts._write_clip
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("simulated crash during generation")
        return original(*args, **kwargs)

    monkeypatch.setattr(synth.layouts, "_write_clip", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth.ensure_synth_tree(tmp_path, "ms3", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither a tree nor a partial folder is left
    monkeypatch.setattr(synth.layouts, "_write_clip", original)
    root = synth.ensure_synth_tree(tmp_path, "ms3", **SMALL)
    assert check_tree(root, "ms3") == []
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_folder_without_marker_or_with_stale_marker_is_rebuilt(tmp_path):
    resolved = synth.resolve_options("s4", **SMALL)
    target = tmp_path / f"s4-{synth.cache_key('s4', resolved)}"
    (target / "s4_data").mkdir(parents=True)
    (target / "s4_meta_data.csv").write_text("name,start,category,split\n")  # half-written
    root = synth.ensure_synth_tree(tmp_path, "s4", **SMALL)
    assert root == target and check_tree(root, "s4") == []
    (root / synth.COMPLETE_MARKER).write_text('{"generator_version": 0}\n')  # older generator
    (root / "left-by-the-old-tree").write_text("x")
    root = synth.ensure_synth_tree(tmp_path, "s4", **SMALL)
    assert synth.is_complete(root, "s4", resolved)
    assert not (root / "left-by-the-old-tree").exists()


def test_sigkill_mid_generation_leaves_nothing_usable(tmp_path):
    """A real kill -9 while writing: no tree appears, and the next call cleans up and rebuilds."""
    options = {"image_size": 32, "clips_per_split": {"train": 30, "val": 2, "test": 2}}
    # Each clip is slowed down so that the kill surely lands in the middle of the generation.
    script = textwrap.dedent(
        f"""
        import time
        from avseg.data import synth
        original = synth.layouts._write_clip
        def slow_write_clip(*args, **kwargs):
            original(*args, **kwargs)
            time.sleep(0.2)
        synth.layouts._write_clip = slow_write_clip
        synth.ensure_synth_tree({str(tmp_path)!r}, "s4", **{options!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            partials = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
            if partials and any(partials[0].rglob("*.wav")):
                break
            assert process.poll() is None, "generation ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no partial tree appeared within 120 s")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    resolved = synth.resolve_options("s4", **options)
    target = tmp_path / f"s4-{synth.cache_key('s4', resolved)}"
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # left by the dead process
    root = synth.ensure_synth_tree(tmp_path, "s4", **options)
    assert root == target and check_tree(root, "s4") == []
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the dead partial was removed


def test_cli_writes_a_tree_and_reports_bad_options(tmp_path, capsys):
    out = tmp_path / "tree"
    code = synth.main(
        [
            f"out={out}",
            "subset=avss",
            "image_size=40",
            "clips_per_split.train=3",
            "clips_per_split.val=3",
            "clips_per_split.test=0",
            "snr_db=[0,5]",
            "seed=2",
        ]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    sidecar = json.loads((out / synth.SIDECAR_NAME).read_text())
    assert sidecar["options"]["snr_db"] == [0.0, 5.0] and sidecar["options"]["seed"] == 2
    assert sidecar["options"]["clips_per_split"] == {"train": 3, "val": 3, "test": 0}
    assert check_tree(out, "avss", image_size=40) == []
    assert synth.main([f"out={tmp_path / 'x'}", "subset=s4", "num_classes=0"]) == 2
    assert "num_classes" in capsys.readouterr().err
    assert synth.main([f"out={out}", "subset=avss"]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_cli_without_out_uses_the_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AVSEG_CACHE", str(tmp_path))
    code = synth.main(
        [
            "image_size=32",
            "clips_per_split.train=3",
            "clips_per_split.val=3",
            "clips_per_split.test=3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["s4", "ms3", "avss"]
    for line in printed:
        subset, path = line.split(": ", 1)
        assert Path(path).parent == tmp_path / "synth"
        assert check_tree(Path(path), subset) == []


@pytest.mark.slow
def test_module_with_no_arguments_writes_all_three_default_trees(tmp_path):
    env = {**os.environ, "AVSEG_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "avseg.data.synth"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        subset, path = line.split(": ", 1)
        assert Path(path).parent == tmp_path / "synth"
        assert check_tree(Path(path), subset, image_size=96) == []


@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_command_defaults_are_the_trees_the_synth_configs_use(subset):
    """`python -m avseg.data.synth` with no options prepares exactly the cached trees that
    `conf/data/synth_<subset>.yaml` asks for (same options, same cache folder)."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / f"synth_{subset}.yaml")
    options = OmegaConf.to_container(config.synth, resolve=False)
    assert options.pop("cache_dir") == "${paths.cache_dir}/synth"
    assert synth.resolve_options(subset, **options) == synth.resolve_options(subset)


def test_concurrent_generation_of_the_same_tree_uses_the_first_finished(tmp_path, monkeypatch):
    """Another process finishes the same tree while this one is generating: this one's rename
    fails, its partial folder is removed and the finished tree is returned."""
    original = synth.tree._write_tree
    resolved = synth.resolve_options("s4", **SMALL)
    target = tmp_path / f"s4-{synth.cache_key('s4', resolved)}"

    def write_then_lose_the_race(root, subset, options):
        original(root, subset, options)
        monkeypatch.setattr(synth.tree, "_write_tree", original)
        synth.generate(target, subset, **options)  # "the other process" completes first

    monkeypatch.setattr(synth.tree, "_write_tree", write_then_lose_the_race)
    root = synth.ensure_synth_tree(tmp_path, "s4", **SMALL)
    assert root == target and synth.is_complete(root, "s4", resolved)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
