"""Per-file checks of an AVSBench-format tree: images (container structure, full decode, size),
binary, colour and index masks, WAVs and log-mel pickles. Each file is read once.

`avseg.data.check` walks a tree and calls :func:`check_file` on every expected file.
"""

from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from avseg.data.palette import decode_colour_mask
from avseg.errors import DataError

EXPECTED_SAMPLE_RATE = 16000
MIN_AUDIO_SECONDS = 0.975  # one 0.96 s VGGish example needs 96 hops of 10 ms + a 25 ms window


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_bytes(path: Path) -> bytes:
    """The one read of an image file (decoding and structure checks work on these bytes)."""
    return path.read_bytes()


def _png_structure_problem(data: bytes) -> str | None:
    """Walk the PNG chunks: each must fit in the file with a correct CRC, and IEND must end it.

    PIL decodes a PNG that lost its tail (IEND, even part of the last IDAT chunk's CRC) without
    complaint, so a truncated file would otherwise pass.
    """
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunk_type = data[position + 4 : position + 8]
        end = position + 12 + length
        name = chunk_type.decode("latin-1")
        if end > len(data):
            return f"truncated PNG: chunk {name!r} needs {end - len(data)} more bytes"
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[position + 4 : end - 4]) != crc:
            return f"corrupt PNG: CRC mismatch in chunk {name!r}"
        if chunk_type == b"IEND":
            if end != len(data):
                return f"corrupt PNG: {len(data) - end} bytes after the IEND chunk"
            return None
        position = end
    return "truncated PNG: no IEND chunk"


def open_image(path: Path) -> tuple[Image.Image | None, str | None]:
    """Read once, check the container structure (PNG chunks, JPEG end marker) and decode fully.
    Returns (image, None) or (None, problem)."""
    try:
        data = _read_bytes(path)
    except OSError as err:
        return None, f"unreadable file: {err}"
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_structure_problem(data)
        if problem:
            return None, problem
    elif data.startswith(b"\xff\xd8") and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None, "truncated JPEG: no end-of-image marker"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on oddities it can still decode
            image = Image.open(io.BytesIO(data))
            image.load()
        return image, None
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported, whatever its type
        return None, f"unreadable image: {type(err).__name__}: {err}"


def _check_binary_values(image: Image.Image) -> str | None:
    if image.mode == "1":
        return None
    if image.mode not in ("L", "P"):
        return f"mask mode {image.mode} is not a single-channel binary mask (L, 1 or P)"
    values = np.unique(np.asarray(image))
    nonzero = values[values != 0]
    if len(nonzero) > 1:
        shown = ", ".join(str(int(v)) for v in values[:8])
        return (
            f"non-binary mask: values {shown}{' ...' if len(values) > 8 else ''} (expected 0 and one foreground value)"
        )
    return None


def check_file(
    root: Path, rel: str, kind: str, image_size: int | None, num_classes: int
) -> tuple[list[str], tuple[int, int] | None, np.ndarray | None]:
    """Validate one file. Returns (problem messages, image size or None, class indices [H, W] of
    a decodable AVSS mask or None)."""
    path = root / rel
    messages: list[str] = []
    if kind in ("wav",):
        from avseg.data.audio import load_wav

        try:
            samples, sample_rate = load_wav(path)
        except DataError as err:
            return [err.problem], None, None
        if sample_rate != EXPECTED_SAMPLE_RATE:
            messages.append(f"sample rate {sample_rate} Hz, expected {EXPECTED_SAMPLE_RATE} Hz")
        if len(samples) < MIN_AUDIO_SECONDS * sample_rate:
            messages.append(f"{len(samples) / sample_rate:.3f} s of audio, shorter than one 0.96 s log-mel example")
        return messages, None, None
    if kind == "pkl":
        from avseg.data.safe_pickle import load_tensor_pickle

        try:
            tensor = load_tensor_pickle(path)
        except DataError as err:  # UnsafePickleError is a DataError
            return [err.problem], None, None
        if tuple(tensor.shape) != (5, 1, 96, 64):
            messages.append(f"log-mel shape {list(tensor.shape)}, expected [5, 1, 96, 64]")
        elif not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
            messages.append("log-mel holds non-float or non-finite values")
        return messages, None, None
    image, error = open_image(path)
    if image is None:
        return [error], None, None
    size = image.size
    if image_size is not None and size != (image_size, image_size):
        messages.append(f"size {size[0]}x{size[1]}, expected {image_size}x{image_size}")
    if kind == "binary_mask":
        message = _check_binary_values(image)
        if message:
            messages.append(message)
        return messages, size, None
    if kind == "rgb_mask":
        if image.mode not in ("RGB", "RGBA", "P"):
            messages.append(f"colour mask mode {image.mode}, expected RGB")
            return messages, size, None
        rgb = np.asarray(image.convert("RGB"))
        indices, unknown = decode_colour_mask(rgb, num_classes)
        if unknown.any():
            colours = np.unique(rgb[unknown].reshape(-1, 3), axis=0)
            shown = ", ".join(str(tuple(int(x) for x in c)) for c in colours[:4])
            messages.append(
                f"{int(unknown.sum())} pixels with unknown colours {shown}{' ...' if len(colours) > 4 else ''}"
            )
            return messages, size, None
        return messages, size, indices
    if kind == "index_mask":
        if image.mode not in ("L", "P"):
            messages.append(f"index mask mode {image.mode}, expected L or P")
            return messages, size, None
        indices = np.asarray(image).astype(np.int64)
        if indices.max(initial=0) >= num_classes:
            bad = np.unique(indices[indices >= num_classes])
            messages.append(f"class indices {[int(b) for b in bad[:8]]} outside 0..{num_classes - 1}")
            return messages, size, None
        return messages, size, indices
    return messages, size, None  # frame
