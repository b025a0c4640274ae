"""Precompute VGGish embeddings [T, 128] for every WAV of an AVSBench tree.

    python -m avseg.data.embeddings root=PATH subset=s4|ms3|avss out=DIR \
        vggish_weights=PATH [random_init=true seed=0] [overwrite=false] [device=cpu]

(config ``conf/embeddings.yaml``; the arguments are Hydra overrides, as for train / eval / predict.)

Each `<root>/<rel>/<name>.wav` gives `<out>/<rel>/<name>.npy` (`embedding_path`): S4
`<out>/s4_data/audio_wav/<split>/<category>/<name>.npy`, MS3
`<out>/ms3_data/audio_wav/<split>/<name>.npy`, AVSS `<out>/<label>/<uid>/audio.npy`.
An embedding is VGGish(fit_examples(log_mel_examples(wav), T, mode)) with T = 5 and
`repeat_last` for S4 / MS3, T = 10 and `zero_pad` for AVSS (docs/AVSBENCH.md section 4), so the
loader's `audio_source="embeddings"` gives what the model would compute from the WAV.
`out` must lie outside the data tree; every file is written atomically (`avseg.io`).
Existing outputs are kept unless `overwrite=true`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from avseg.cli import compose_command, console_log, run_main
from avseg.data.audio import FitMode, fit_examples, load_wav, log_mel_examples
from avseg.data.layout import LAYOUTS
from avseg.errors import ConfigError, DataError
from avseg.io import write_npy_atomic
from avseg.models.audio import VGGish

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("avseg.data.embeddings")  # also when run as __main__ (console_log)

# (T, fit mode) per subset, from avseg.data.layout
SUBSET_LAYOUT: dict[str, tuple[int, FitMode]] = {name: (lay.num_frames, lay.fit_mode) for name, lay in LAYOUTS.items()}


def wav_files(root: str | os.PathLike, subset: str) -> list[Path]:
    """Every WAV of a subset's tree, sorted: S4/MS3 `<subset>_data/audio_wav/**.wav`, AVSS
    `<label>/<uid>/audio.wav`. Raises DataError when the audio folder is missing or empty."""
    root = Path(root)
    if subset in ("s4", "ms3"):
        audio_dir = root / LAYOUTS[subset].data_dirs[0] / "audio_wav"
        if not audio_dir.is_dir():
            raise DataError(audio_dir, "audio folder not found")
        files = sorted(audio_dir.rglob("*.wav"))
    elif subset == "avss":
        if not root.is_dir():
            raise DataError(root, "AVSS root folder not found")
        files = sorted(root.glob("*/*/audio.wav"))  # <kind>/<uid>/audio.wav (SubsetLayout.clip_files)
    else:
        raise ConfigError(f"subset must be one of {sorted(SUBSET_LAYOUT)}, got {subset!r}")
    if not files:
        raise DataError(root, f"no WAV files found for subset {subset}")
    return files


def embedding_path(wav_path: str | os.PathLike, *, root: str | os.PathLike, embeddings_dir: str | os.PathLike) -> Path:
    """Where the embedding of `wav_path` (inside `root`) lives under `embeddings_dir`."""
    relative = Path(wav_path).resolve().relative_to(Path(root).resolve())
    return Path(embeddings_dir) / relative.with_suffix(".npy")


def clip_embedding(
    vggish: VGGish, wav_path: str | os.PathLike, subset: str, device: torch.device | str = "cpu"
) -> np.ndarray:
    """VGGish embedding of one clip's WAV: float32 [T, 128]."""
    num_frames, mode = SUBSET_LAYOUT[subset]
    wav, sample_rate = load_wav(wav_path)
    examples = log_mel_examples(wav, sample_rate)
    if examples.shape[0] == 0 and mode == "repeat_last":
        raise DataError(wav_path, "audio shorter than one 0.96 s VGGish example")
    examples = fit_examples(examples, num_frames, mode)
    with torch.inference_mode():
        return vggish(examples.to(device)).float().cpu().numpy()


def _is_within(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def write_embeddings(
    root: str | os.PathLike,
    subset: str,
    out: str | os.PathLike,
    *,
    vggish: VGGish,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Path, bool]]:
    """Write every clip's embedding; yields (output path, written) per WAV, `written` False when
    an existing file was kept."""
    root, out = Path(root), Path(out)
    if subset not in SUBSET_LAYOUT:
        raise ConfigError(f"subset must be one of {sorted(SUBSET_LAYOUT)}, got {subset!r}")
    if _is_within(out, root):
        raise ConfigError(f"out={out} lies inside the data tree root={root}; choose a folder outside it")
    vggish = vggish.to(device).eval()
    for wav_path in wav_files(root, subset):
        target = embedding_path(wav_path, root=root, embeddings_dir=out)
        if target.exists() and not overwrite:
            yield target, False
            continue
        write_npy_atomic(target, clip_embedding(vggish, wav_path, subset, device))
        yield target, True


def _flag(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The command (config ``conf/embeddings.yaml``, Hydra's override grammar); a bad argument
    raises `ConfigError` (``python -m`` prints it as one ``error:`` line and exits 1)."""
    with console_log():
        return _run(
            compose_command(
                "embeddings",
                argv,
                required=("root", "subset", "out"),
                usage="root=PATH subset=s4|ms3|avss out=DIR vggish_weights=PATH",
            )
        )


def _run(options: DictConfig) -> int:
    subset, root, out = str(options.subset), str(options.root), str(options.out)
    if subset not in SUBSET_LAYOUT:
        raise ConfigError(f"subset must be one of {sorted(SUBSET_LAYOUT)}, got {subset!r}")
    random_init = _flag("random_init", options.random_init)
    overwrite = _flag("overwrite", options.overwrite)
    weights = None if options.vggish_weights is None else str(options.vggish_weights)
    if random_init and weights:
        raise ConfigError("random_init=true and vggish_weights are both set; choose one")
    if random_init:
        log.warning("warning: random_init=true: embeddings come from an untrained VGGish")
        if isinstance(options.seed, bool) or not isinstance(options.seed, int):
            raise ConfigError(f"seed must be an integer, got {options.seed!r}")
        torch.manual_seed(options.seed)  # a random VGGish is still reproducible
        vggish = VGGish()
    elif weights:
        vggish = VGGish.from_state_dict_file(weights)
    else:
        raise ConfigError("vggish_weights=PATH (torchvggish vggish-10086976.pth) is required, or random_init=true")
    start = time.perf_counter()
    written = kept = 0
    for _, was_written in write_embeddings(
        root,
        subset,
        out,
        vggish=vggish,
        overwrite=overwrite,
        device=str(options.device),
    ):
        written += was_written
        kept += not was_written
    log.info(
        f"embeddings: {written} written, {kept} kept (already present) under {out} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
