"""Crash-safe checkpoint files and safe, clearly failing checkpoint loading.

``AtomicCheckpointIO`` (a Lightning ``CheckpointIO`` plugin, set in ``conf/trainer/default.yaml``)
writes every checkpoint with `avseg.io.write_bytes_atomic` (a temporary file in the target folder,
fsynced, renamed over the target with ``os.replace``, atomic on POSIX, then the folder fsynced):
a ``kill -9`` or a power cut at any moment leaves either the previous complete file or the new
complete file, never a torn one. Loading always uses ``torch.load(weights_only=True)`` and turns every failure into a
`avseg.errors.CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from avseg.errors import CheckpointError
from avseg.io import write_bytes_atomic

__all__ = ["AtomicCheckpointIO", "load_checkpoint_file"]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with every failure a `CheckpointError` naming the file."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(file, "no such checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(file, "the file is empty (0 bytes)")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            file,
            "refused by the safe loader (weights_only=True): it holds more than tensors and plain values "
            f"({first_line})",
        ) from error
    except Exception as error:  # untrusted bytes: any failure to decode them means a corrupt file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            file, f"not a readable PyTorch checkpoint (truncated or corrupt?): {first_line}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(file, f"expected a dict checkpoint, found {type(checkpoint).__name__}")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO writing via temp file + fsync + rename and loading with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes_atomic(path, buffer.getvalue())

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | str | torch.device | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(path, "avseg loads checkpoints with weights_only=True only")
        return load_checkpoint_file(path, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
