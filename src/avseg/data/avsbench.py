"""AVSBench loaders: S4, MS3 (AVSBench-object) and AVSS (AVSBench-semantic), official layouts.

Each dataset reads its split from the metadata CSV (items in CSV row order) and returns one dict per
clip (docs/METHOD.md section 3):

- `frames` float32 [T, 3, H, W], ImageNet-normalised; AVSS padded frames are zeros AFTER
  normalisation (the mean colour), as the official loader pads the normalised tensor.
- `masks` int64 [T, H, W]: 0/1 for S4/MS3, class index 0..70 for AVSS; 0 where there is no label.
- `frame_valid` bool [T] (a real frame), `label_valid` bool [T] (a ground-truth file exists for it).
- `audio` float32 [T, 1, 96, 64] (log-mel, `audio_source="wav"|"pkl"`) or [T, 128]
  (`audio_source="embeddings"`); AVSS padded frames zeroed.
- `video_id` str, `index` int (position in the split).

Layouts are in docs/AVSBENCH.md; every missing or unreadable file raises `DataError` naming it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from avseg.data.audio import fit_examples, load_wav, log_mel_examples
from avseg.data.layout import (
    AVSS_MASK_DIRS,
    LAYOUTS,
    SPLITS,
    SubsetLayout,
    parse_rows,
    read_label2idx,
)
from avseg.data.palette import decode_colour_mask
from avseg.data.safe_pickle import load_tensor_pickle
from avseg.data.transforms import AugmentConfig, ClipTransform
from avseg.errors import ConfigError, DataError

AudioTransform = Callable[[np.ndarray, int, int], np.ndarray]

AUDIO_SOURCES: tuple[str, ...] = ("wav", "pkl", "embeddings")
LOG_MEL_SHAPE: tuple[int, int, int] = (1, 96, 64)
EMBEDDING_DIM = 128
DATA_DOC_HINT = (
    "see docs/DATA.md for how to download AVSBench and point avseg at it (data.root=... or the "
    "AVSBENCH_ROOT environment variable), or generate a synthetic tree in the same layout with "
    "`python -m avseg.data.synth` (or train on data=synth_s4 / synth_ms3 / synth_avss)"
)
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ClipRecord:
    """Where one clip's files live. `mask_paths[t]` is None for a frame without a label file."""

    video_id: str
    frame_paths: tuple[Path, ...]
    mask_paths: tuple[Path | None, ...]
    wav_path: Path
    wav_relpath: Path  # relative to the dataset root; embeddings mirror it with suffix .npy
    pkl_path: Path | None


# ----------------------------------------------------------------------------------------------
# File readers: each names the file in its error.


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(path, f"missing {what}")


def _decode_rgb(path: Path, *, missing: str, what: str) -> np.ndarray:
    """Decode an image file fully to uint8 [H, W, 3]; a missing file raises DataError "missing
    <missing>", a truncated or undecodable one "cannot decode <what> (...)"."""
    _require_file(path, missing)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except _IMAGE_ERRORS as error:
        raise DataError(path, f"cannot decode {what} ({type(error).__name__}: {error})") from error
    return rgb


def read_rgb_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3]; truncated or undecodable files raise DataError."""
    return _decode_rgb(path, missing="frame", what="image")


def read_binary_mask(path: Path) -> np.ndarray:
    """A binary mask PNG of mode L (0/255), 1, P, I, I;16, LA or RGB -> int64 [H, W] of 0/1.

    Nonzero is foreground (for P the palette index, for LA the L channel, for RGB any channel).
    """
    _require_file(path, "mask")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "LA":
                array = np.asarray(image.getchannel("L"))
            elif mode in ("L", "1", "P", "I", "I;16", "I;16B", "I;16L", "RGB"):
                array = np.asarray(image)
            else:
                raise DataError(path, f"unsupported mask image mode {mode!r} (expected L, 1, P, I, LA or RGB)")
    except DataError:
        raise
    except _IMAGE_ERRORS as error:
        raise DataError(path, f"cannot decode mask ({type(error).__name__}: {error})") from error
    if array.ndim == 3:
        array = array.any(axis=2)
    return (array != 0).astype(np.int64)


def read_colour_mask(path: Path, num_classes: int) -> np.ndarray:
    """An AVSS colour mask (VOC palette) -> class indices int64 [H, W]; an unknown colour raises."""
    rgb = _decode_rgb(path, missing="label mask", what="label mask")
    indices, unknown = decode_colour_mask(rgb, num_classes)
    if unknown.any():
        ys, xs = np.nonzero(unknown)
        colours = np.unique(rgb[unknown].reshape(-1, 3), axis=0)
        shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:5])
        raise DataError(
            path,
            f"{int(unknown.sum())} pixels have colours that are no class colour of label2idx.json "
            f"(first at row {int(ys[0])}, column {int(xs[0])}; colours: {shown}"
            f"{', ...' if len(colours) > 5 else ''})",
        )
    return indices.astype(np.int64)


def read_index_mask(path: Path, num_classes: int) -> np.ndarray:
    """An AVSS `labels_semantic` index PNG (mode L, P or I) -> int64 [H, W] in 0..num_classes-1."""
    _require_file(path, "label mask")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(path, f"index mask must be single-channel (L, P or I), got mode {image.mode!r}")
            array = np.asarray(image).astype(np.int64)
    except DataError:
        raise
    except _IMAGE_ERRORS as error:
        raise DataError(path, f"cannot decode label mask ({type(error).__name__}: {error})") from error
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise DataError(path, f"class index {int(array.max())} out of range 0..{num_classes - 1}")
    return array


def read_embeddings(path: Path, allowed_lengths: Sequence[int]) -> torch.Tensor:
    """A `.npy` of VGGish embeddings [n, 128] with n in allowed_lengths -> float32 tensor."""
    _require_file(path, "audio embeddings file")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(path, f"cannot read embeddings ({type(error).__name__}: {error})") from error
    if (
        not isinstance(array, np.ndarray)
        or array.ndim != 2
        or array.shape[1] != EMBEDDING_DIM
        or array.shape[0] not in allowed_lengths
    ):
        raise DataError(
            path,
            f"embeddings must have shape [n, {EMBEDDING_DIM}] with n in {list(allowed_lengths)}, "
            f"got {getattr(array, 'shape', type(array).__name__)}",
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(path, f"embeddings must be floating point, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def read_log_mel_pickle(path: Path, num_frames: int) -> torch.Tensor:
    """The official pickled log-mel [num_frames, 1, 96, 64], through the restricted unpickler."""
    _require_file(path, "log-mel pickle")
    tensor = load_tensor_pickle(path)
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (num_frames, *LOG_MEL_SHAPE):
        raise DataError(
            path,
            f"log-mel pickle must hold a tensor of shape {[num_frames, *LOG_MEL_SHAPE]}, "
            f"got {list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}",
        )
    if not tensor.is_floating_point():
        raise DataError(path, f"log-mel pickle must hold a floating-point tensor, got {tensor.dtype}")
    return tensor.detach().to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# Datasets


class AVSBenchDataset(Dataset):
    """Shared machinery of the three AVSBench loaders.

    Subclasses set `layout` (`avseg.data.layout.LAYOUTS[subset]`): file paths, CSV, clip length,
    audio fit mode and which frames have masks all come from it.

    Args:
        root: the folder holding the metadata CSV (`s4_meta_data.csv`, `ms3_meta_data.csv` or
            `metadata.csv`).
        split: "train", "val" or "test".
        audio_source: "wav" (log-mel computed from the WAV), "pkl" (official pickled log-mel; S4/MS3
            only) or "embeddings" (`.npy` [T, 128] under `embeddings_dir`, mirroring the WAV layout).
        embeddings_dir: root of the embeddings tree (required for audio_source="embeddings").
        image_size: output side S; frames/masks come out [.., S, S].
        augment: False, True (defaults) or a mapping of `AugmentConfig` fields; applied jointly to
            frames and masks whenever given (the data module gives it to training splits only).
        resize_mode: "auto" (train split -> short side + centre crop, else plain resize), "train" or
            "eval".
        audio_transform: `f(wav [n] float32, sample_rate, index) -> wav`, applied to the waveform
            before the log-mel (audio_source="wav" only).
        augment_seed: when set, each item's augmentation is drawn from a private RNG seeded by
            (augment_seed, epoch, index) instead of the global RNG, so it does not depend on which
            worker loads the item or on when a resumed run starts; `epoch` is read from
            `epoch_counter` (a shared-memory long tensor [1] the data module advances).
        loading_threads: intra-op threads while an item is loaded in the main process (restored
            afterwards; workers use 1 anyway); None leaves PyTorch's setting alone.
    """

    layout: ClassVar[SubsetLayout]
    supports_pkl: ClassVar[bool] = True
    mask_source: str = "rgb"
    # The layout's facts as class attributes (the data module reads them before any dataset exists).
    subset: ClassVar[str]
    num_frames: ClassVar[int]
    semantic: ClassVar[bool]
    metadata_name: ClassVar[str]
    log_mel_fit: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        layout = cls.layout
        cls.subset, cls.num_frames, cls.semantic = layout.name, layout.num_frames, layout.semantic
        cls.metadata_name, cls.log_mel_fit = layout.metadata_csv, layout.fit_mode
        cls.supports_pkl = layout.has_pkl

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        audio_source: str = "wav",
        embeddings_dir: str | os.PathLike | None = None,
        image_size: int = 224,
        augment: bool | Mapping[str, Any] | AugmentConfig | None = False,
        resize_mode: str = "auto",
        audio_transform: AudioTransform | None = None,
        augment_seed: int | None = None,
        loading_threads: int | None = 1,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if audio_source not in AUDIO_SOURCES:
            raise ConfigError(f"audio_source must be one of {list(AUDIO_SOURCES)}, got {audio_source!r}")
        if audio_source == "pkl" and not self.supports_pkl:
            raise ConfigError(
                f"audio_source='pkl' is not available for {self.subset.upper()} (it ships no .pkl log-mel); "
                "use 'wav' or 'embeddings'"
            )
        if audio_source == "embeddings" and embeddings_dir is None:
            raise ConfigError("audio_source='embeddings' needs embeddings_dir (the folder of .npy files)")
        if audio_transform is not None and audio_source != "wav":
            raise ConfigError(
                f"audio_transform acts on the waveform and needs audio_source='wav', got {audio_source!r}"
            )
        if loading_threads is not None and loading_threads < 1:
            raise ConfigError(f"loading_threads must be >= 1 or None, got {loading_threads}")
        if resize_mode not in ("auto", "train", "eval"):
            raise ConfigError(f"resize_mode must be 'auto', 'train' or 'eval', got {resize_mode!r}")
        self.root = Path(os.path.expanduser(os.fspath(root)))
        self.split = split
        self.audio_source = audio_source
        self.embeddings_dir = (
            Path(os.path.expanduser(os.fspath(embeddings_dir))) if embeddings_dir is not None else None
        )
        self.image_size = int(image_size)
        self.audio_transform = audio_transform
        mode = ("train" if split == "train" else "eval") if resize_mode == "auto" else resize_mode
        self.transform = ClipTransform(image_size=self.image_size, mode=mode, augment=augment)
        self.augment_seed = augment_seed
        self.loading_threads = loading_threads
        # Shared memory, so DataLoader workers (also persistent ones) see the epoch the main process sets.
        self.epoch_counter = torch.zeros(1, dtype=torch.long).share_memory_()
        metadata = self.root / self.metadata_name
        if not self.root.is_dir():
            raise DataError(
                self.root, f"{self.subset.upper()} dataset root does not exist (looked for {metadata}); {DATA_DOC_HINT}"
            )
        if not metadata.is_file():
            raise DataError(
                metadata,
                f"{self.subset.upper()} metadata CSV not found (root must be the folder holding "
                f"{self.metadata_name}); {DATA_DOC_HINT}",
            )
        self.records: list[ClipRecord] = self._read_records(metadata)

    # -- records and masks ------------------------------------------------------------------------

    def _read_records(self, metadata: Path) -> list[ClipRecord]:
        """The split's clips, in CSV row order. Any bad row (of any split) raises, as the checker
        reports it (`avseg.data.layout.parse_rows`)."""
        rows, problems = parse_rows(self.layout, metadata)
        if problems:
            raise DataError(metadata, problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        records = []
        for row in rows:
            if row["split"] != self.split:
                continue
            files = self.layout.clip_files(row, with_pkl=self.supports_pkl, mask_source=self.mask_source)
            records.append(
                ClipRecord(
                    video_id=files.video_id,
                    frame_paths=tuple(self.root / p for p in files.frames),
                    mask_paths=tuple(self.root / p if p is not None else None for p in files.masks),
                    wav_path=self.root / files.wav,
                    wav_relpath=Path(files.wav),
                    pkl_path=self.root / files.pkl if files.pkl is not None else None,
                )
            )
        return records

    def _read_masks(self, record: ClipRecord, height: int, width: int) -> np.ndarray:
        """int64 [t, H, W] for the clip's real frames; zeros where there is no label file."""
        masks = np.zeros((len(record.frame_paths), height, width), dtype=np.int64)
        for t, path in enumerate(record.mask_paths):
            if path is None:
                continue
            mask = self._read_one_mask(path)
            if mask.shape != (height, width):
                raise DataError(
                    path,
                    f"mask is {mask.shape[1]}x{mask.shape[0]}, its frame {record.frame_paths[t]} is {width}x{height}",
                )
            masks[t] = mask
        return masks

    def _read_one_mask(self, path: Path) -> np.ndarray:
        return read_binary_mask(path)

    # -- public -----------------------------------------------------------------------------------

    @property
    def video_ids(self) -> list[str]:
        return [r.video_id for r in self.records]

    def embedding_path(self, record: ClipRecord) -> Path:
        """`<embeddings_dir>/<WAV path relative to the dataset root, suffix .npy>`.

        The layout `python -m avseg.data.embeddings` writes: S4
        `s4_data/audio_wav/<split>/<category>/<name>.npy`, MS3 `ms3_data/audio_wav/<split>/<name>.npy`,
        AVSS `<label>/<uid>/audio.npy` (so one folder can hold S4 and MS3 embeddings together).
        """
        if self.embeddings_dir is None:
            raise ConfigError("embeddings_dir is not set")
        return self.embeddings_dir / record.wav_relpath.with_suffix(".npy")

    def __len__(self) -> int:
        return len(self.records)

    def item_seed(self, index: int) -> int | None:
        """The augmentation seed of item `index` this epoch (None: use the global RNG)."""
        if self.augment_seed is None or self.transform.augmentation is None:
            return None
        entropy = [int(self.augment_seed) & 0xFFFFFFFF, int(self.epoch_counter[0]), int(index)]
        return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} clips")
        with self._loading_threads():
            return self._load_item(index)

    @contextlib.contextmanager
    def _loading_threads(self):
        """In the main process, load with `loading_threads` intra-op threads, then restore.

        DataLoader workers already run with one thread. In the main process (num_workers=0) the many
        small tensor ops of one item pay a thread wake-up each; on a busy machine that made loading
        4-10x slower than on one thread (docs/DATA.md section 7)."""
        if self.loading_threads is None or get_worker_info() is not None:
            yield
            return
        saved = torch.get_num_threads()
        torch.set_num_threads(self.loading_threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def _load_item(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        num_real = len(record.frame_paths)
        images = [read_rgb_image(p) for p in record.frame_paths]
        # The clip's size is its most common frame size (ties: the earliest), so the odd frame is blamed.
        sizes = [image.shape[:2] for image in images]
        height, width = max(sizes, key=lambda size: (sizes.count(size), -sizes.index(size)))
        for path, size in zip(record.frame_paths, sizes):
            if size != (height, width):
                reference = record.frame_paths[sizes.index((height, width))]
                raise DataError(
                    path,
                    f"frame is {size[1]}x{size[0]}, the clip's other frames are {width}x{height} (e.g. {reference})",
                )
        masks = self._read_masks(record, height, width)
        frames_uint8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        frames, mask_tensor = self.transform(frames_uint8, torch.from_numpy(masks), seed=self.item_seed(index))

        size = self.image_size
        out_frames = torch.zeros(self.num_frames, 3, size, size, dtype=torch.float32)
        out_masks = torch.zeros(self.num_frames, size, size, dtype=torch.long)
        out_frames[:num_real] = frames
        out_masks[:num_real] = mask_tensor
        frame_valid = torch.zeros(self.num_frames, dtype=torch.bool)
        frame_valid[:num_real] = True
        label_valid = torch.zeros(self.num_frames, dtype=torch.bool)
        label_valid[: len(record.mask_paths)] = torch.tensor([p is not None for p in record.mask_paths])

        audio = self._load_audio(record, index, num_real)
        return {
            "frames": out_frames,
            "masks": out_masks,
            "frame_valid": frame_valid,
            "label_valid": label_valid,
            "audio": audio,
            "video_id": record.video_id,
            "index": index,
        }

    def _load_audio(self, record: ClipRecord, index: int, num_real: int) -> torch.Tensor:
        """[T, 1, 96, 64] log-mel or [T, 128] embeddings; frames past num_real zeroed."""
        if self.audio_source == "wav":
            _require_file(record.wav_path, "audio file")
            wav, sample_rate = load_wav(record.wav_path)
            if self.audio_transform is not None:
                wav = self.audio_transform(wav, sample_rate, index)
                if not isinstance(wav, np.ndarray) or wav.ndim != 1:
                    raise ConfigError(
                        "audio_transform must return a 1-D numpy waveform, got "
                        f"{getattr(wav, 'shape', type(wav).__name__)}"
                    )
                wav = wav.astype(np.float32, copy=False)
            examples = log_mel_examples(wav, sample_rate)
            if examples.shape[0] == 0 and self.log_mel_fit == "repeat_last":
                raise DataError(record.wav_path, "audio is shorter than one 0.96 s log-mel example (nothing to repeat)")
            audio = fit_examples(examples, self.num_frames, self.log_mel_fit)
        elif self.audio_source == "pkl":
            assert record.pkl_path is not None
            audio = read_log_mel_pickle(record.pkl_path, self.num_frames)
        else:
            allowed = sorted({num_real, self.num_frames})
            audio = read_embeddings(self.embedding_path(record), allowed)
            if audio.shape[0] < self.num_frames:
                padding = audio.new_zeros(self.num_frames - audio.shape[0], EMBEDDING_DIM)
                audio = torch.cat([audio, padding], dim=0)
        audio = audio.to(torch.float32)
        if num_real < self.num_frames:
            audio = audio.clone()
            audio[num_real:] = 0  # the official AVSS model multiplies padded frames' audio by 0
        return audio

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, clips={len(self)}, "
            f"audio_source={self.audio_source!r}, {self.transform!r})"
        )


class S4Dataset(AVSBenchDataset):
    """AVSBench-object single source. Train clips have only frame 1's mask (label_valid [1,0,0,0,0])."""

    layout = LAYOUTS["s4"]


class MS3Dataset(AVSBenchDataset):
    """AVSBench-object multi source. Frame files are `<name>.mp4_<k>.png`; all 5 frames labelled."""

    layout = LAYOUTS["ms3"]


class AVSSDataset(AVSBenchDataset):
    """AVSBench-semantic: v1s / v1m (5 frames) and v2 (10 frames) clips, padded to 10 frames.

    `mask_source="rgb"` decodes `labels_rgb/` colour masks through the VOC palette in the key order of
    the tree's `label2idx.json` (an unknown colour raises); `"semantic"` reads `labels_semantic/`
    index PNGs. Label files per clip: v1s train 1 (`0.png`), v1s val/test 5, v1m 5, v2 10.
    """

    layout = LAYOUTS["avss"]
    FRAMES_PER_LABEL: ClassVar[dict[str, int]] = LAYOUTS["avss"].clip_kinds

    def __init__(self, root: str | os.PathLike, split: str, *, mask_source: str = "rgb", **options: Any) -> None:
        if mask_source not in AVSS_MASK_DIRS:
            raise ConfigError(f"mask_source must be 'rgb' or 'semantic', got {mask_source!r}")
        self.mask_source = mask_source
        super().__init__(root, split, **options)
        assert self.layout.label_file is not None
        self.classes = read_label2idx(self.root / self.layout.label_file)
        self.num_mask_classes = len(self.classes)

    def _read_one_mask(self, path: Path) -> np.ndarray:
        if self.mask_source == "rgb":
            return read_colour_mask(path, self.num_mask_classes)
        return read_index_mask(path, self.num_mask_classes)


DATASETS: dict[str, type[AVSBenchDataset]] = {"s4": S4Dataset, "ms3": MS3Dataset, "avss": AVSSDataset}


def build_dataset(subset: str, root: str | os.PathLike, split: str, **options: Any) -> AVSBenchDataset:
    """`DATASETS[subset](root, split, **options)` with a clear error for an unknown subset."""
    if subset not in DATASETS:
        raise ConfigError(f"subset must be one of {list(DATASETS)}, got {subset!r}")
    return DATASETS[subset](root, split, **options)
