"""Load the official AVSBench `audio_log_mel/*.pkl` files without running arbitrary code.

A pickled tensor needs only a handful of globals: `torch._utils._rebuild_tensor_v2` (and
`_rebuild_parameter` for a pickled `nn.Parameter`), `collections.OrderedDict` (backward hooks),
`_codecs.encode` (bytes in protocol-2 pickles; latin-1 only) and `torch.storage._load_from_bytes`
for the storage. The real `_load_from_bytes` calls `torch.load(..., weights_only=False)` on the
embedded bytes, so it is never called: the storage bytes go through
`torch.load(BytesIO(b), weights_only=True, map_location="cpu")` instead, which refuses a payload
hidden there too (docs/AVSBENCH.md section 4). Every other global is refused before anything is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch
import torch._utils

from avseg.errors import DataError, UnsafePickleError


class _RefusedGlobal(Exception):
    def __init__(self, qualified_name: str, reason: str):
        self.qualified_name = qualified_name
        self.reason = reason
        super().__init__(f"{qualified_name}: {reason}")


def _load_storage_bytes(data: bytes) -> Any:
    """Stand-in for `torch.storage._load_from_bytes` that cannot run code."""
    if not isinstance(data, (bytes, bytearray)):
        raise _RefusedGlobal("torch.storage._load_from_bytes", "argument is not bytes")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch's weights-only unpickler names the global it refused ("Unsupported global: ...").
        raise _RefusedGlobal("torch.storage._load_from_bytes", f"nested storage bytes refused: {err}") from err
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise _RefusedGlobal(
            "torch.storage._load_from_bytes",
            f"nested bytes hold a {type(storage).__name__}, not a tensor storage",
        )
    return storage


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to write bytes as latin-1 text."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise _RefusedGlobal("_codecs.encode", f"only latin-1 text is allowed, got {encoding!r}")
    return text.encode("latin-1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("_codecs", "encode"): _latin1_encode,
}


class _TensorOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}", "not needed to rebuild a tensor") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal("persistent_load", f"persistent id {pid!r} is not allowed")


# An official log-mel pickle [5, 1, 96, 64] float32 is about 123 KB; AVSS ships none.
MAX_PICKLE_BYTES = 64 * 1024 * 1024


def load_tensor_pickle(path: str | os.PathLike) -> torch.Tensor:
    """Load a pickled tensor (e.g. an official `.pkl` log-mel [5, 1, 96, 64]), detached, on CPU.

    Raises UnsafePickleError (naming the file and the refused global) when the pickle asks for
    anything beyond a plain tensor, and DataError when the file is missing, corrupt or holds
    something other than a tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DataError(path, f"{size} bytes is far larger than a log-mel pickle (limit {MAX_PICKLE_BYTES})")
    try:
        # Read the bytes first: a corrupt length field then cannot make the unpickler allocate or
        # read past the file (OverflowError / MemoryError below cover what remains).
        payload = path.read_bytes()
        loaded = _TensorOnlyUnpickler(io.BytesIO(payload)).load()
    except _RefusedGlobal as err:
        raise UnsafePickleError(path, f"refused global {err.qualified_name} ({err.reason})") from err
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        RuntimeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
        OverflowError,
        MemoryError,
        OSError,
    ) as err:
        raise DataError(path, f"corrupt or unsupported pickle: {type(err).__name__}: {err}") from err
    if not isinstance(loaded, torch.Tensor):
        raise DataError(path, f"pickle holds a {type(loaded).__name__}, expected a torch tensor")
    return loaded.detach()
