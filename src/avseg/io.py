"""Writing files, once: atomic writers, the mask PNGs in the official AVSBench formats and naming,
and the mask overlay drawn on a frame.

Every writer here goes through `write_bytes_atomic`: a temporary file in the target folder,
flushed and fsynced, renamed over the target (``os.replace``, atomic on POSIX), then the folder
fsynced. A reader (or a crash, ``kill -9``, a power cut) sees the old complete file or the new
complete file, never a torn one, and no temporary file is left behind on an error.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "atomic_output",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "json_safe",
    "write_npy_atomic",
    "png_bytes",
    "write_png_atomic",
    "write_binary_mask_png",
    "write_colour_mask_png",
    "write_label_png",
    "mask_relpaths",
    "BINARY_OVERLAY_COLOUR",
    "overlay_labels",
]

BINARY_OVERLAY_COLOUR = (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new complete
    file (parent folders are created). ``fsync=False`` skips the two fsyncs (still atomic for
    readers, not durable across a power cut): for the thousands of mask PNGs of one evaluation."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """For a writer that writes a file itself (a video encoder): yields a temporary path in the
    target's folder, with the target's suffix; renamed over ``path`` when the block ends without an
    error, removed when it raises."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN / Infinity), recursively through mappings and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, payload: Any, *, sort_keys: bool = True) -> None:
    """``payload`` as indented JSON (keys sorted by default), atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """A numpy array in ``.npy`` format, atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# PNG images and masks


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """A uint8 image array ([H, W] or [H, W, 3]) encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    image = (
        Image.fromarray(np.ascontiguousarray(array))
        if mode is None
        else Image.fromarray(np.ascontiguousarray(array), mode=mode)
    )
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png_atomic(
    path: str | os.PathLike, array: np.ndarray, mode: str | None = None, *, fsync: bool = False
) -> None:
    """A uint8 image array ([H, W] or [H, W, 3]) as a PNG file, atomically (not fsynced by default:
    masks and overlays are outputs one can write again)."""
    write_bytes_atomic(path, png_bytes(array, mode), fsync=fsync)


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def write_binary_mask_png(path: str | os.PathLike, mask: np.ndarray | torch.Tensor) -> None:
    """A binary mask [H, W] (nonzero = foreground) as the official single-channel 0/255 PNG."""
    mask = _numpy(mask)
    if mask.ndim != 2:
        raise ValueError(f"write_binary_mask_png: expected [H, W], got {mask.shape}")
    write_png_atomic(path, np.where(mask != 0, 255, 0).astype(np.uint8), "L")


def write_colour_mask_png(path: str | os.PathLike, labels: np.ndarray | torch.Tensor) -> None:
    """Class indices [H, W] as an AVSS colour PNG (PASCAL-VOC colours, RGB)."""
    from avseg.data.palette import encode_colour_mask

    labels = _numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"write_colour_mask_png: expected [H, W], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"write_colour_mask_png: class indices must be in 0..255, got {labels.min()}..{labels.max()}")
    write_png_atomic(path, encode_colour_mask(labels.astype(np.int64)), "RGB")


def write_label_png(path: str | os.PathLike, labels: np.ndarray | torch.Tensor, *, semantic: bool) -> None:
    """Labels [H, W] in their official format: AVSS colours (semantic) or binary 0/255."""
    (write_colour_mask_png if semantic else write_binary_mask_png)(path, labels)


def mask_relpaths(dataset: Any, index: int) -> list[tuple[int, Path]]:
    """(frame t, path relative to ``pred_masks/``) for the real frames of clip ``index``, in the
    official naming: S4 ``<category>/<name>/<name>_<k>.png`` (k = t + 1), MS3
    ``<name>/<name>_<k>.png``, AVSS ``<uid>/<t>.png``."""
    from avseg.errors import ConfigError

    record = dataset.records[index]
    name = record.video_id
    count = len(record.frame_paths)
    if dataset.subset == "s4":
        category = record.frame_paths[0].parent.parent.name  # s4_data/visual_frames/<split>/<category>/<name>/
        return [(t, Path(category, name, f"{name}_{t + 1}.png")) for t in range(count)]
    if dataset.subset == "ms3":
        return [(t, Path(name, f"{name}_{t + 1}.png")) for t in range(count)]
    if dataset.subset == "avss":
        return [(t, Path(name, f"{t}.png")) for t in range(count)]
    raise ConfigError(f"save_masks: no official naming for subset {dataset.subset!r}")


# ---------------------------------------------------------------------------------------------
# overlays


def overlay_labels(
    frame: torch.Tensor, labels: np.ndarray | torch.Tensor, *, semantic: bool, alpha: float = 0.5
) -> torch.Tensor:
    """uint8 frame [3, H, W] with labels [H, W] blended on (``torchvision.utils.draw_segmentation_masks``):
    binary foreground red, AVSS classes in their VOC colours; label 0 (background) left as is.
    Labels of another size than the frame are resized by nearest neighbour."""
    from torchvision.utils import draw_segmentation_masks

    from avseg.data.palette import voc_colormap

    if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[0] != 3:
        raise ValueError(f"overlay_labels: expected a uint8 frame [3, H, W], got {frame.dtype} {tuple(frame.shape)}")
    labels = torch.as_tensor(_numpy(labels)).long()
    if labels.shape != frame.shape[-2:]:
        labels = torch.nn.functional.interpolate(
            labels[None, None].float(), size=tuple(frame.shape[-2:]), mode="nearest"
        )[0, 0].long()
    values = [int(v) for v in torch.unique(labels) if int(v) > 0]
    if not values:
        return frame.clone()
    masks = torch.stack([labels == v for v in values])
    if semantic:
        palette = voc_colormap(256)
        colours = [tuple(int(c) for c in palette[min(v, 255)]) for v in values]
    else:
        colours = [BINARY_OVERLAY_COLOUR] * len(values)
    return draw_segmentation_masks(frame.cpu(), masks.cpu(), alpha=alpha, colors=colours)
