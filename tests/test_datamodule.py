"""AVSDataModule and conf/data/*.yaml: composition, roots, synth cache, avs concat, loaders, collate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from test_avsbench import build_ms3_tree, build_s4_tree
from torch.utils.data import DataLoader

from avseg.data.collate import collate_clips
from avseg.errors import ConfigError, DataError
from avseg.lit.datamodule import AVSDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA_CONFIGS = ["s4", "ms3", "avs", "avss", "synth_s4", "synth_ms3", "synth_avss"]
TINY_SYNTH = [
    "data.synth.image_size=32",
    "data.synth.clips_per_split={train: 2, val: 1, test: 2}",
]


def compose_data(name: str, overrides: list[str] = ()) -> object:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=None, overrides=[f"+data={name}", "+paths=default", *overrides])


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_instantiates_without_touching_disk(name, tmp_path, monkeypatch):
    monkeypatch.setenv("AVSEG_DATA", str(tmp_path / "no_data_here"))
    monkeypatch.setenv("AVSEG_CACHE", str(tmp_path / "cache"))
    cfg = compose_data(name)
    module = instantiate(cfg.data)
    assert isinstance(module, AVSDataModule)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "no_data_here").exists()
    expected_subset = name.removeprefix("synth_")
    assert module.subset == expected_subset
    assert module.num_frames == (10 if expected_subset == "avss" else 5)
    assert module.semantic == (expected_subset == "avss")
    assert (module.num_classes, module.num_mask_classes) == ((70, 71) if module.semantic else (1, 2))
    if name.startswith("synth_"):
        assert str(module.synth_cache_dir) == str(tmp_path / "cache" / "synth")
        assert module.image_size == cfg.data.synth.image_size


@pytest.mark.parametrize("name", ["s4", "ms3", "avss", "avs"])
def test_missing_real_root_says_where_and_how(name, tmp_path, monkeypatch):
    monkeypatch.setenv("AVSEG_DATA", str(tmp_path / "nowhere"))
    module = instantiate(compose_data(name).data)
    with pytest.raises(DataError) as info:
        module.setup("fit")
    assert info.value.path.startswith(str(tmp_path / "nowhere"))
    assert "docs/DATA.md" in str(info.value) and "python -m avseg.data.synth" in str(info.value)


@pytest.mark.parametrize("name", ["synth_s4", "synth_avss"])
def test_synth_config_generates_into_cache_once(name, tmp_path, monkeypatch):
    monkeypatch.setenv("AVSEG_CACHE", str(tmp_path / "cache"))
    module = instantiate(compose_data(name, TINY_SYNTH).data)
    module.prepare_data()
    root = module.roots[module.subset]
    assert root.parent == tmp_path / "cache" / "synth" and root.name.startswith(f"{module.subset}-")
    module.setup("fit")
    module.setup("test")
    batch = next(iter(module.train_dataloader()))
    T = module.num_frames
    assert batch["frames"].shape == (2, T, 3, 32, 32) and batch["masks"].shape == (2, T, 32, 32)
    assert batch["audio"].shape == (2, T, 1, 96, 64)
    test_batch = next(iter(module.test_dataloader()))
    assert test_batch["index"].tolist() == [0, 1] and len(test_batch["video_id"]) == 2
    # a second module with the same options reuses the tree
    again = instantiate(compose_data(name, TINY_SYNTH).data)
    again.prepare_data()
    assert again.roots == module.roots
    assert len(list((tmp_path / "cache" / "synth").iterdir())) == 1


def test_avs_concatenates_with_repeats_and_tests_each_set(tmp_path):
    s4 = build_s4_tree(tmp_path / "s4", {"train": 2, "val": 1, "test": 2})
    ms3 = build_ms3_tree(tmp_path / "ms3", {"train": 1, "val": 1, "test": 1})
    module = AVSDataModule(
        subset="avs",
        roots={"s4": str(s4), "ms3": str(ms3)},
        repeats={"s4": 1, "ms3": 3},
        image_size=32,
        batch_size=2,
        augment=True,
        val_sets=["ms3"],
    )
    module.setup("fit")
    module.setup("test")
    assert len(module.train_dataset) == 2 * 1 + 1 * 3
    ids = [module.train_dataset[i]["video_id"] for i in range(5)]
    assert ids == ["s4clip0", "s4clip1", "ms3clip0", "ms3clip0", "ms3clip0"]
    assert module.test_set_names == ["s4", "ms3"] and module.val_set_names == ["ms3"]
    tests = module.test_dataloader()
    assert isinstance(tests, list) and len(tests) == 2
    assert [b["video_id"] for b in tests[0]] == [["s4clip3", "s4clip4"]]
    assert [b["video_id"] for b in tests[1]] == [["ms3clip2"]]
    assert isinstance(module.val_dataloader(), DataLoader)  # one val set -> one loader
    seen = sorted(v for b in module.train_dataloader() for v in b["video_id"])
    assert seen == sorted(ids)


def test_workers_give_the_same_batches(tmp_path):
    root = build_s4_tree(tmp_path, {"train": 1, "val": 3})
    batches = {}
    for workers in (0, 2):
        module = AVSDataModule(
            subset="s4",
            root=str(root),
            image_size=32,
            batch_size=2,
            num_workers=workers,
            persistent_workers=True,
            prefetch_factor=2,
            pin_memory=False,
        )
        module.setup("validate")
        batches[workers] = list(module.val_dataloader())
    assert len(batches[0]) == len(batches[2]) == 2
    for a, b in zip(batches[0], batches[2]):
        assert a["video_id"] == b["video_id"] and torch.equal(a["index"], b["index"])
        for key in ("frames", "masks", "frame_valid", "label_valid", "audio"):
            assert torch.equal(a[key], b[key])


def test_training_augmentation_is_seeded_per_item_and_epoch(tmp_path):
    root = build_s4_tree(tmp_path, {"train": 2})
    module = AVSDataModule(
        subset="s4",
        root=str(root),
        image_size=24,
        batch_size=2,
        seed=5,
        augment={"scale_min": 0.4, "hflip_prob": 0.5},
        eval_audio_transform=None,
    )
    module.setup("fit")
    dataset = module.train_dataset
    torch.manual_seed(0)
    first = dataset[0]["frames"]
    torch.manual_seed(1)
    assert torch.equal(dataset[0]["frames"], first)  # independent of the global RNG
    loader = module.train_dataloader()
    loader.resumable_sampler.set_epoch(3)
    list(loader)
    assert int(dataset.epoch_counter[0]) == 3
    assert not torch.equal(dataset[0]["frames"], first)


def test_persistent_workers_see_the_epoch(tmp_path):
    root = build_s4_tree(tmp_path, {"train": 2})
    module = AVSDataModule(
        subset="s4",
        root=str(root),
        image_size=24,
        batch_size=2,
        seed=5,
        num_workers=1,
        persistent_workers=True,
        augment={"scale_min": 0.4, "brightness": 0.3},
    )
    module.setup("fit")
    loader = module.train_dataloader()
    for epoch in (0, 2):
        loader.resumable_sampler.set_epoch(epoch)
        (batch,) = list(loader)  # loaded in the (same, persistent) worker
        assert int(module.train_dataset.epoch_counter[0]) == epoch
        for row, index in enumerate(batch["index"].tolist()):
            assert torch.equal(batch["frames"][row], module.train_dataset[index]["frames"])


def test_eval_audio_transform_reaches_val_and_test_only(tmp_path):
    root = build_s4_tree(tmp_path, {"train": 1, "val": 1, "test": 1})
    calls = []

    def mute(wav: np.ndarray, sample_rate: int, index: int) -> np.ndarray:
        calls.append(index)
        return np.zeros_like(wav)

    module = AVSDataModule(subset="s4", root=str(root), image_size=32, eval_audio_transform=mute)
    module.setup(None)
    module.train_dataset[0]
    assert calls == []
    silent = float(np.log(0.01))
    assert torch.all(module.val_datasets["s4"][0]["audio"] == silent)
    assert torch.all(module.test_datasets["s4"][0]["audio"] == silent)
    module.set_eval_audio_transform(None)
    assert not torch.all(module.test_datasets["s4"][0]["audio"] == silent)


def test_config_errors():
    with pytest.raises(ConfigError, match="subset"):
        AVSDataModule(subset="s5", root="x")
    with pytest.raises(ConfigError, match="root"):
        AVSDataModule(subset="s4")
    with pytest.raises(ConfigError, match="roots"):
        AVSDataModule(subset="avs", root="x")
    with pytest.raises(ConfigError, match="roots"):
        AVSDataModule(subset="avs", roots={"s4": "x"})
    with pytest.raises(ConfigError, match="repeats"):
        AVSDataModule(subset="avs", roots={"s4": "x", "ms3": "y"}, repeats={"avss": 2})
    with pytest.raises(ConfigError, match="synth"):
        AVSDataModule(subset="s4", root="x", synth={"cache_dir": "c"})
    with pytest.raises(ConfigError, match="test_sets"):
        AVSDataModule(subset="s4", root="x", test_sets=["ms3"])


def test_collate_keeps_flags_ids_and_indices():
    def item(index: int) -> dict:
        return {
            "frames": torch.full((5, 3, 4, 4), float(index)),
            "masks": torch.zeros(5, 4, 4, dtype=torch.long),
            "frame_valid": torch.tensor([True] * 5),
            "label_valid": torch.tensor([True, False, False, False, False]),
            "audio": torch.zeros(5, 128),
            "video_id": f"clip{index}",
            "index": index,
        }

    batch = collate_clips([item(3), item(7)])
    assert batch["frames"].shape == (2, 5, 3, 4, 4) and batch["frames"][1].eq(7).all()
    assert batch["label_valid"].dtype == torch.bool and batch["label_valid"][:, 0].all()
    assert batch["label_valid"][:, 1:].sum() == 0
    assert batch["video_id"] == ["clip3", "clip7"]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [3, 7]
    bad = item(1)
    bad["audio"] = torch.zeros(5, 1, 96, 64)
    with pytest.raises(ValueError, match="audio"):
        collate_clips([item(0), bad])
    with pytest.raises(ValueError, match="keys"):
        collate_clips([item(0), {k: v for k, v in item(1).items() if k != "index"}])
