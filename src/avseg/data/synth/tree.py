"""SynthAVS trees: all-or-nothing generation of a tree into a new folder, and the cache of trees
keyed by their options (completion marker, cleanup of partial folders left by dead processes)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from avseg.data.synth.layouts import _json_bytes, _write_tree
from avseg.data.synth.options import COMPLETE_MARKER, GENERATOR_VERSION, cache_key, resolve_options
from avseg.errors import DataError


def _marker_content(subset: str, resolved: Mapping[str, Any]) -> bytes:
    return _json_bytes({"generator_version": GENERATOR_VERSION, "subset": subset, "key": cache_key(subset, resolved)})


def _partial_prefix(root_name: str) -> str:
    return f".{root_name}.partial-{socket.gethostname()}-"


def generate(
    root: str | os.PathLike,
    subset: str,
    *,
    seed: int = 0,
    image_size: int = 96,
    num_classes: int = 8,
    clips_per_split: Mapping[str, int] | None = None,
    snr_db: Sequence[float] = (10.0, 20.0),
    write_pkl: bool = False,
    max_objects: int = 4,
    distractor_prob: float = 0.85,
    jpeg_quality: int = 95,
    assets: str = "synthetic",
    soundfont: str | None = None,
    assets_dir: str | None = None,
    backgrounds: str | None = None,
    instrument_sounds: str | None = None,
) -> Path:
    """Write a SynthAVS tree for `subset` at `root` (the folder that will hold the CSV).

    All-or-nothing: the tree is built in a hidden sibling folder, the completion marker is written
    last, and the folder is renamed to `root` in one step; on any error the partial folder is
    removed. `root` must not exist or be an empty folder (never writes into an existing tree).
    """
    resolved = resolve_options(
        subset,
        seed=seed,
        image_size=image_size,
        num_classes=num_classes,
        clips_per_split=clips_per_split,
        snr_db=snr_db,
        write_pkl=write_pkl,
        max_objects=max_objects,
        distractor_prob=distractor_prob,
        jpeg_quality=jpeg_quality,
        assets=assets,
        soundfont=soundfont,
        assets_dir=assets_dir,
        backgrounds=backgrounds,
        instrument_sounds=instrument_sounds,
    )
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(root, "already exists and is not empty; SynthAVS writes only into a new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(root.name)}{os.getpid()}-", dir=root.parent))
    try:
        _write_tree(partial, subset, resolved)
        marker = partial / COMPLETE_MARKER
        with open(marker, "wb") as handle:  # last file written: its presence means complete
            handle.write(_marker_content(subset, resolved))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(partial, 0o755)  # mkdtemp makes it 0700
        try:
            os.replace(partial, root)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise DataError(root, "appeared (written by another process) while generating") from err
            raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def is_complete(root: str | os.PathLike, subset: str, resolved: Mapping[str, Any]) -> bool:
    """True if `root` holds a finished tree generated with exactly these options."""
    marker = Path(root) / COMPLETE_MARKER
    try:
        return marker.read_bytes() == _marker_content(subset, resolved)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(cache_dir: Path, root_name: str) -> None:
    """Delete partial folders for `root_name` left by processes on this host that died."""
    prefix = _partial_prefix(root_name)
    for entry in cache_dir.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def ensure_synth_tree(cache_dir: str | os.PathLike, subset: str, **options: Any) -> Path:
    """The tree for (subset, options) under `cache_dir/<subset>-<hash>/`, generated on first use.

    A folder without the right completion marker (interrupted, copied, older generator) is never
    used: it is deleted and rebuilt. Partial folders of dead local processes are cleaned up.
    """
    resolved = resolve_options(subset, **options)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = cache_dir / f"{subset}-{cache_key(subset, resolved)}"
    if is_complete(root, subset, resolved):
        return root
    _remove_dead_partials(cache_dir, root.name)
    if root.exists():
        shutil.rmtree(root)
    try:
        generate(root, subset, **resolved)
    except DataError:
        if is_complete(root, subset, resolved):  # another process finished it first
            return root
        raise
    return root
