"""Evaluating a trained checkpoint on a data config: the body of ``python -m avseg.eval`` (docs/EVALUATION.md),
also run by ``python -m avseg.analysis`` (reliance, noise), which must not import another command.

The model comes from the checkpoint alone (`avseg.inference.load_model`: ``weights_only=True``, no
pretrained-weight files read again). The checkpoint holds the model config but not the data config,
so the data config is, in this order: the command line's when it names any ``data`` option
(``data=s4``, ``data.root=...``); else the training run's (``<run dir>/.hydra/config.yaml`` next to
``<run dir>/checkpoints/<ckpt>``); else ``conf/eval.yaml``'s default (`choose_data_config`).

The evaluation datasets are built by the data module's own `AVSDataModule.build` and run through
`avseg.inference.evaluate_dataset`: the batches of the training run's test stage through the same
predictor and metric update as its test step, so a clean evaluation reproduces the run's logged test
metrics exactly (with the same number of CPU threads: `avseg.inference`). The official binary F-score
depends on the test batch: ``frames_per_batch`` = evaluation batch (clips) x T, 4 x 5 = 20 by default.

Outputs in ``output_dir``: ``metrics.json`` (atomic; ``<split>/miou``, ``<split>/fscore``,
``<split>/fscore_global`` (binary), ``perturb``, ``perturb_snr_db``, ``ckpt_path``, ``cpu_threads``, ...)
and, with ``save_masks=true``, PNG masks in the official naming under ``<output_dir>/pred_masks/``.
The result table goes to the ``avseg.evaluation`` logger (Hydra's run log and the console).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from avseg.config_validation import validate_config
from avseg.errors import ConfigError
from avseg.inference import evaluate_dataset, load_model, model_audio_input, resolve_device, training_run_config
from avseg.io import json_safe, write_json_atomic

__all__ = ["SPLITS", "evaluate_checkpoint", "choose_data_config", "names_data", "format_eval_table"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def format_eval_table(rows: Sequence[tuple[str, Mapping[str, float]]], *, title: str) -> str:
    """One row per evaluated set: M_J (miou), M_F (official fscore), M_F global (binary)."""
    header = ("set", "M_J (mIoU)", "M_F (F-score)", "M_F global")
    cells = [
        (name, f"{m['miou']:.4f}", f"{m['fscore']:.4f}", f"{m['fscore_global']:.4f}" if "fscore_global" in m else "-")
        for name, m in rows
    ]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(4)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [title, line, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", line]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths)) + " |" for cell in cells]
    out.append(line)
    return "\n".join(out)


def names_data(overrides: Sequence[str]) -> bool:
    """Does a command line name any data option (``data=...``, ``data.x=...``, ``+data...``)?"""
    return any(str(o).lstrip("+~").split("=", 1)[0].split(".", 1)[0] == "data" for o in overrides)


def choose_data_config(cfg: DictConfig, overrides: Sequence[str]) -> str:
    """Replaces ``cfg.data`` by the training run's data config when the command line names no data
    option and the run's ``.hydra/config.yaml`` exists; returns where the data config came from."""
    if names_data(overrides):
        return "command line"
    train_config = training_run_config(cfg.ckpt_path)
    if train_config is None:
        return "conf/eval.yaml default"
    stored = OmegaConf.load(train_config)
    if "data" not in stored:
        raise ConfigError(
            f"{train_config}: the training run's config has no 'data' node; give data=... on the command line"
        )
    with open_dict(cfg):
        cfg.data = stored.data
    return str(train_config)


def evaluate_checkpoint(cfg: DictConfig, *, output_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path``; writes ``output_dir/metrics.json`` (and masks). ``overrides``:
    the command line's overrides (a data option there wins over the training run's data config)."""
    from avseg.data.perturb import PerturbedDataset, WhiteNoise, check_perturbation

    started = time.perf_counter()
    if cfg.get("ckpt_path") in (None, "", "???"):
        raise ConfigError("ckpt_path is required: python -m avseg.eval ckpt_path=<run dir>/checkpoints/best.ckpt")
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt_path)))
    split = str(cfg.split)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: allowed values are {' | '.join(SPLITS)}")
    perturb = str(cfg.perturb)
    snr_db = cfg.get("perturb_snr_db")
    data_source = choose_data_config(cfg, overrides)
    validate_config(cfg)  # every bad key at once, before any data or weights are read
    audio_source = str(cfg.data.get("audio_source", "wav"))
    check_perturbation(perturb, audio_source=audio_source, snr_db=snr_db)
    device = resolve_device(str(cfg.device))
    output_dir = Path(output_dir)

    module = load_model(ckpt_path, device)
    transform = WhiteNoise(snr_db=float(snr_db), seed=int(cfg.perturb_seed)) if perturb == "noise" else None
    datamodule = hydra.utils.instantiate(cfg.data, eval_audio_transform=transform)
    if bool(module.semantic) != bool(datamodule.semantic):
        kind = "semantic (AVSS, 71 classes)" if module.semantic else "binary (S4 / MS3)"
        raise ConfigError(
            f"data.subset={datamodule.subset!r} does not fit the checkpoint {ckpt_path}: it is a {kind} model; "
            "pick a data config of the same kind (data=...)"
        )
    wants = model_audio_input(module)
    fits = {"log_mel": ("wav", "pkl"), "embeddings": ("embeddings",)}.get(wants, ())
    if audio_source not in fits:
        raise ConfigError(
            f"data.audio_source={audio_source!r} does not fit the checkpoint {ckpt_path}: its audio encoder takes "
            f"{wants!r} input (data.audio_source={' | '.join(fits)})"
        )
    names = list(datamodule.test_set_names if split == "test" else datamodule.val_set_names)
    if split == "train":
        names = list(datamodule.members)
    batch_size = int(cfg.batch_size) if cfg.get("batch_size") is not None else int(datamodule.eval_batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: an int >= 1 (null = data.eval_batch_size)")
    frames_per_batch = batch_size * int(datamodule.num_frames)
    num_workers = int(cfg.num_workers) if cfg.get("num_workers") is not None else int(datamodule.num_workers)

    results: dict[str, Any] = {}
    rows: list[tuple[str, dict[str, float]]] = []
    masks_root = output_dir / "pred_masks" if bool(cfg.save_masks) else None
    num_clips = 0
    for name in names:
        dataset = datamodule.build(name, split, train=False)
        if masks_root is not None and _is_within(masks_root, dataset.root):
            raise ConfigError(
                f"save_masks: the output folder {masks_root} lies inside the data tree {dataset.root}; run from "
                "elsewhere (hydra.run.dir=...)"
            )
        if perturb in ("mute", "swap"):
            dataset = PerturbedDataset(dataset, mode=perturb, seed=int(cfg.perturb_seed))
        num_clips += len(dataset)
        masks_dir = None if masks_root is None else (masks_root if len(names) == 1 else masks_root / name)
        metrics = evaluate_dataset(
            module,
            dataset,
            batch_size=batch_size,
            frames_per_batch=frames_per_batch,
            device=device,
            num_workers=num_workers,
            masks_dir=masks_dir,
        )
        prefix = split if len(names) == 1 else f"{split}/{name}"
        results.update({f"{prefix}/{key}": value for key, value in metrics.items()})
        rows.append((prefix, metrics))

    payload: dict[str, Any] = json_safe(results)  # NaN (a set without a score) -> null
    payload.update(
        {
            "perturb": perturb,
            "perturb_snr_db": float(snr_db) if perturb == "noise" else None,
            "perturb_seed": int(cfg.perturb_seed) if perturb != "none" else None,
            "ckpt_path": str(ckpt_path),
            "split": split,
            "data_subset": str(datamodule.subset),
            "data_config": data_source,
            "frames_per_batch": frames_per_batch if not module.semantic else None,
            "num_clips": num_clips,
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        }
    )
    write_json_atomic(output_dir / "metrics.json", payload)
    what = f"perturb={perturb}" + (f" at {float(snr_db):g} dB SNR" if perturb == "noise" else "")
    title = (
        f"Evaluation of {ckpt_path} on {datamodule.subset} {split} ({num_clips} clips; {what}; "
        f"F-score batch {frames_per_batch if not module.semantic else '-'} frames)"
    )
    lines = [
        "",
        format_eval_table(rows, title=title),
        f"data config  : {data_source}",
        f"metrics      : {output_dir / 'metrics.json'}",
    ]
    if masks_root is not None:
        lines.append(f"masks        : {masks_root}")
    lines.append(f"time         : {time.perf_counter() - started:.1f} s")
    log.info("\n".join(lines))
    return payload
