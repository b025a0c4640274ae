"""`AVSDataModule`: AVSBench (S4, MS3, AVSS, S4 + MS3 "avs") or a SynthAVS tree as Lightning data.

Built by Hydra from `conf/data/*.yaml` (`_target_: avseg.lit.datamodule.AVSDataModule`); the schema
is documented in docs/DATA.md. Construction never touches the disk: the dataset roots are looked at
in `setup` (a missing root raises `DataError` naming the path looked for and how to get the data),
and synthetic trees are generated in `prepare_data` / `setup` under `synth.cache_dir`.

Attributes the LightningModule reads: `num_frames` (T: 5 or 10), `semantic` (AVSS),
`num_classes` (object classes of the class head: 1 binary, 70 AVSS), `num_mask_classes` (values of
the masks, background included: 2 or 71; `SemanticAVSMetric(num_classes=...)`), `val_set_names`,
`test_set_names` (one name per val/test loader, in loader order).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from avseg.data.avsbench import DATASETS, AudioTransform, AVSBenchDataset
from avseg.data.collate import collate_clips
from avseg.data.layout import LAYOUTS, SUBSET_MEMBERS
from avseg.errors import ConfigError
from avseg.lit.sampler import ResumableDataLoader
from avseg.models.options import Problem, at_least, choice, int_at_least, is_int, present, raise_first

# subset name -> the AVSBench subsets it is made of
MEMBERS = SUBSET_MEMBERS


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts / lists (Hydra passes DictConfig unless _convert_ says otherwise)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _expand(path: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(path))))


def _source_problems(options: Mapping[str, Any]) -> list[Problem]:
    """Where the data comes from, among the ``root`` / ``roots`` / ``synth`` options present: a
    generated tree (``synth`` with a ``cache_dir``; root and roots null), or the one root of s4 /
    ms3 / avss, or the roots of each member of avs."""
    root, roots, synth = options.get("root"), options.get("roots"), options.get("synth")
    subset = options.get("subset")
    members = MEMBERS.get(subset, ()) if isinstance(subset, str) else ()
    problems = []
    if synth is not None:
        if not isinstance(synth, Mapping):
            problems.append(Problem("data.synth", synth, "null (real data) or a mapping of SynthAVS options"))
        elif synth.get("cache_dir") is None:
            problems.append(Problem("data.synth.cache_dir", None, "a folder where generated trees are cached"))
        generated = "null when data.synth is set (the tree is generated)"
        problems += [
            Problem(f"data.{key}", value, generated)
            for key, value in (("root", root), ("roots", roots))
            if value is not None
        ]
    elif len(members) == 1:
        if roots is not None:
            problems.append(Problem("data.roots", roots, f"null for data.subset={subset} (use data.root)"))
        if "root" in options and root is None:
            csv = LAYOUTS[subset].metadata_csv
            problems.append(
                Problem("data.root", None, f"the folder holding {csv} (real data), or a data=synth_* config")
            )
    elif members:
        names = " and ".join(f"data.roots.{name}" for name in members)
        if root is not None:
            problems.append(Problem("data.root", root, f"null for data.subset={subset} (it reads {names})"))
        if "roots" in options and (not isinstance(roots, Mapping) or set(roots) != set(members)):
            problems.append(Problem("data.roots", roots, f"a mapping with exactly the keys {' and '.join(members)}"))
    return problems


class _EpochSyncedLoader(ResumableDataLoader):
    """Writes the sampler's epoch into the datasets' shared epoch counters before each pass, so
    per-item augmentation seeds (dataset, epoch, index) agree across workers and resumed runs."""

    def __init__(self, dataset: Dataset, *, epoch_counters: Sequence[torch.Tensor], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_counters = list(epoch_counters)

    def __iter__(self):  # type: ignore[override]
        epoch = int(self.resumable_sampler.epoch)
        for counter in self.epoch_counters:
            counter.fill_(epoch)
        return super().__iter__()


class AVSDataModule(LightningDataModule):
    """Lightning data for AVSBench / SynthAVS.

    Args:
        subset: "s4", "ms3", "avss" or "avs" (S4 + MS3 training sets together, binary; each test set
            evaluated on its own).
        root: dataset root (the folder holding the metadata CSV) for s4 / ms3 / avss.
        roots: for "avs": {"s4": ROOT, "ms3": ROOT}.
        repeats: for "avs": how many times each training set is repeated in one epoch, e.g.
            {"s4": 1, "ms3": 7} (docs/DATA.md: our reading of the seed's `avs_1s7m`).
        synth: generate a SynthAVS tree instead of reading `root`: {"cache_dir": DIR, **options of
            `avseg.data.synth.ensure_synth_tree`}; root/roots must then be null.
        image_size: side S of frames and masks.
        audio_source, embeddings_dir, mask_source: dataset options (`avseg.data.avsbench`);
            mask_source is used by AVSS only.
        augment: joint training augmentation: false, true or a mapping of AugmentConfig fields.
        eval_audio_transform: `f(wav, sample_rate, index) -> wav` for the val/test sets (evaluation
            noise, muting); None for clean audio.
        batch_size / eval_batch_size: clips per training / evaluation batch (eval defaults to
            batch_size; the official S4/MS3 test batch is 4 clips = 20 frames).
        num_workers, pin_memory, persistent_workers, prefetch_factor: DataLoader options
            (persistent_workers / prefetch_factor only take effect with num_workers > 0).
        drop_last: drop the last incomplete training batch.
        seed: seed of the training order and of per-item augmentation.
        val_sets / test_sets: which member subsets are evaluated (default all; "avs": s4 and ms3).
    """

    def __init__(
        self,
        *,
        subset: str,
        root: str | os.PathLike | None = None,
        roots: Mapping[str, str | os.PathLike] | None = None,
        repeats: Mapping[str, int] | None = None,
        synth: Mapping[str, Any] | None = None,
        image_size: int = 224,
        audio_source: str = "wav",
        embeddings_dir: str | os.PathLike | None = None,
        mask_source: str = "rgb",
        augment: bool | Mapping[str, Any] = False,
        eval_audio_transform: AudioTransform | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
        val_sets: Sequence[str] | None = None,
        test_sets: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        roots, repeats, synth = _plain(roots), _plain(repeats), _plain(synth)
        sizes = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "num_workers": num_workers}
        sources = {"root": root, "roots": roots, "synth": synth}
        raise_first(self.check_options({"subset": subset, "repeats": repeats, **sizes, **sources}))
        self.subset = subset
        self.members: tuple[str, ...] = MEMBERS[subset]
        self.synth_options: dict[str, Any] | None = None
        self._roots: dict[str, Path] | None = None
        if synth is not None:
            synth = dict(synth)
            self.synth_cache_dir = _expand(synth.pop("cache_dir"))
            self.synth_options = synth
        elif root is not None:
            self._roots = {subset: _expand(root)}
        else:
            self._roots = {name: _expand(roots[name]) for name in self.members}
        repeats = dict(repeats) if repeats is not None else {}
        self.repeats = {name: int(repeats.get(name, 1)) for name in self.members}
        self.val_set_names = self._eval_names(val_sets, "val_sets")
        self.test_set_names = self._eval_names(test_sets, "test_sets")

        first = DATASETS[self.members[0]]
        self.num_frames: int = first.num_frames
        self.semantic: bool = first.semantic
        self.num_mask_classes: int = first.layout.num_mask_classes  # 2, or 71 for AVSS
        self.num_classes: int = self.num_mask_classes - 1  # no background logit in the class head

        self.image_size = int(image_size)
        self.dataset_options: dict[str, Any] = {
            "audio_source": audio_source,
            "embeddings_dir": embeddings_dir,
            "image_size": self.image_size,
        }
        self.mask_source = mask_source
        self.augment = _plain(augment)
        self.eval_audio_transform: AudioTransform | None = eval_audio_transform
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.drop_last = bool(drop_last)
        self.seed = int(seed)

        self.train_sets: dict[str, AVSBenchDataset] = {}
        self.val_datasets: dict[str, AVSBenchDataset] = {}
        self.test_datasets: dict[str, AVSBenchDataset] = {}
        self.train_dataset: Dataset | None = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``data`` options ``options`` holds that concern this module alone
        (absent ones are not checked): ``subset``, where the data comes from (``root``, ``roots``,
        ``synth``: `_source_problems`), sizes and ``repeats`` (read with the members of ``subset``
        when it is known; a member not named repeats once). Run by the constructor and, before any
        data is read, by `avseg.config_validation` (which checks that the roots exist)."""
        checks = {
            "subset": choice(tuple(MEMBERS)),
            "batch_size": at_least(1),
            "eval_batch_size": lambda key, value: int_at_least(key, value, 1, nullable=True),
            "num_workers": at_least(0),
        }
        problems = present(options, checks, "data.") + _source_problems(options)
        repeats = options.get("repeats")
        if repeats is not None:
            members = MEMBERS.get(options.get("subset"), ())
            ok = isinstance(repeats, Mapping) and all(is_int(v) and v >= 0 for v in repeats.values())
            if ok and members:
                ok = set(repeats) <= set(members) and any(repeats.get(name, 1) for name in members)
            if not ok:
                allowed = "null or a mapping subset -> an integer >= 0, not all 0"
                problems.append(
                    Problem("data.repeats", repeats, allowed + (f" (subsets {list(members)})" if members else ""))
                )
        return problems

    def _eval_names(self, names: Sequence[str] | None, key: str) -> list[str]:
        names = list(_plain(names)) if names is not None else list(self.members)
        unknown = [n for n in names if n not in self.members]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                f"data.{key} must be a non-empty list of distinct names from {list(self.members)}, got {names}"
            )
        return names

    # -- roots ------------------------------------------------------------------------------------

    def _generate_synth(self) -> dict[str, Path]:
        from avseg.data.synth import ensure_synth_tree

        assert self.synth_options is not None
        return {
            name: Path(ensure_synth_tree(self.synth_cache_dir, name, **self.synth_options)) for name in self.members
        }

    def prepare_data(self) -> None:
        """Generates the synthetic trees once (rank 0); real data is never touched here."""
        if self.synth_options is not None:
            self._roots = self._generate_synth()

    @property
    def roots(self) -> dict[str, Path]:
        """Dataset root per member subset (generating a synthetic tree if this process has none yet)."""
        if self._roots is None:
            self._roots = self._generate_synth()
        return self._roots

    # -- datasets ---------------------------------------------------------------------------------

    def build(self, name: str, split: str, *, train: bool) -> AVSBenchDataset:
        """The dataset of member `name` for `split` with this module's options."""
        options = dict(self.dataset_options)
        if name == "avss":
            options["mask_source"] = self.mask_source
        if train:
            options.update(augment=self.augment, augment_seed=self.seed)
        else:
            options["audio_transform"] = self.eval_audio_transform
        return DATASETS[name](self.roots[name], split, **options)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_sets = {
                name: self.build(name, "train", train=True) for name in self.members if self.repeats[name] > 0
            }
            parts: list[Dataset] = []
            for name, dataset in self.train_sets.items():
                parts.extend([dataset] * self.repeats[name])
            self.train_dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if stage in (None, "fit", "validate"):
            self.val_datasets = {name: self.build(name, "val", train=False) for name in self.val_set_names}
        if stage in (None, "test", "predict"):
            self.test_datasets = {name: self.build(name, "test", train=False) for name in self.test_set_names}

    # -- loaders ----------------------------------------------------------------------------------

    def _loader_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
            "collate_fn": collate_clips,
        }
        if self.num_workers > 0 and self.prefetch_factor is not None:
            options["prefetch_factor"] = int(self.prefetch_factor)
        return options

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("AVSDataModule.train_dataloader: call setup('fit') first")
        options = self._loader_options()
        prefetch = options.pop("prefetch_factor", None)
        return _EpochSyncedLoader(
            self.train_dataset,
            epoch_counters=[d.epoch_counter for d in self.train_sets.values()],
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            drop_last=self.drop_last,
            prefetch_factor=prefetch,
            **options,
        )

    def _eval_loaders(
        self, datasets: dict[str, AVSBenchDataset], names: list[str], stage: str
    ) -> DataLoader | list[DataLoader]:
        if not datasets:
            raise RuntimeError(f"AVSDataModule: call setup({stage!r}) first")
        loaders = [
            DataLoader(datasets[name], batch_size=self.eval_batch_size, shuffle=False, **self._loader_options())
            for name in names
        ]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per name in `val_set_names` (a single loader when there is one)."""
        return self._eval_loaders(self.val_datasets, self.val_set_names, "validate")

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per name in `test_set_names` (a single loader when there is one)."""
        return self._eval_loaders(self.test_datasets, self.test_set_names, "test")

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loaders(self.test_datasets, self.test_set_names, "predict")

    def set_eval_audio_transform(self, transform: Callable[..., Any] | None) -> None:
        """Swap the val/test audio transform (e.g. noise at an SNR) and rebuild the eval datasets that exist."""
        self.eval_audio_transform = transform
        if self.val_datasets:
            self.val_datasets = {name: self.build(name, "val", train=False) for name in self.val_set_names}
        if self.test_datasets:
            self.test_datasets = {name: self.build(name, "test", train=False) for name in self.test_set_names}

    def __repr__(self) -> str:
        where = f"synth={self.synth_options}" if self.synth_options is not None else f"roots={self._roots}"
        return (
            f"AVSDataModule(subset={self.subset!r}, {where}, repeats={self.repeats}, image_size={self.image_size}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers})"
        )
