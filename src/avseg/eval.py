"""``python -m avseg.eval ckpt_path=PATH [data=...] [split=test] [perturb=none|mute|swap|noise]
[perturb_snr_db=10] [save_masks=true]``: the official AVSBench metrics of a trained checkpoint.

The model comes from the checkpoint alone (`AVSLitModule.load_trained`: ``weights_only=True``, no
pretrained-weight files read again). The checkpoint holds the model config but not the data config,
so the data config is, in this order: the command line's when it names any ``data`` option
(``data=s4``, ``data.root=...``); else the training run's (``<run dir>/.hydra/config.yaml`` next to
``<run dir>/checkpoints/<ckpt>``, so ``python -m avseg.eval ckpt_path=<run>/checkpoints/best.ckpt``
evaluates on the data the model was trained for); else ``conf/eval.yaml``'s default.

The evaluation datasets are built by the data module's own `AVSDataModule.build`, run through
``net`` + `binary_logits` / `semantic_scores` at ground-truth size in a plain loop under
``torch.inference_mode()``, and fed to `BinaryAVSMetric` / `SemanticAVSMetric` with
``frame_index = index * T + t``. The official binary F-score depends on the test batch:
``frames_per_batch`` = evaluation batch (clips) x T, 4 x 5 = 20 by default (docs/EVALUATION.md).

Outputs in the Hydra run directory: ``metrics.json`` (atomic; ``test/miou``, ``test/fscore``,
``test/fscore_global`` (binary), ``perturb``, ``perturb_snr_db``, ``ckpt_path``, ...) and, with
``save_masks=true``, PNG masks in the official naming under ``<run dir>/pred_masks/``.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from einops import rearrange
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from avseg.cli import run_main
from avseg.config_validation import validate_config
from avseg.errors import ConfigError

__all__ = [
    "main",
    "run",
    "resolve_device",
    "load_model",
    "model_audio_input",
    "training_run_config",
    "names_data",
    "mask_relpaths",
    "write_binary_mask_png",
    "write_colour_mask_png",
    "evaluate_dataset",
    "format_eval_table",
]

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# small pieces shared with avseg.predict


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def load_model(ckpt_path: str | os.PathLike, device: torch.device) -> Any:
    """The trained `AVSLitModule` of a checkpoint, in eval mode on ``device``."""
    from avseg.lit.module import AVSLitModule

    module = AVSLitModule.load_trained(Path(os.path.expanduser(os.fspath(ckpt_path))), map_location="cpu")
    return module.to(device).eval()


def model_audio_input(module: Any) -> str:
    """``log_mel`` or ``embeddings``: what the model's audio encoder eats (its stored config)."""
    encoder = dict(module.hparams.get("audio_encoder") or {})
    return str(encoder.get("input", "log_mel"))


def training_run_config(ckpt_path: str | os.PathLike) -> Path | None:
    """``<run dir>/.hydra/config.yaml`` of the training run a checkpoint belongs to, if present."""
    ckpt = Path(os.path.expanduser(os.fspath(ckpt_path))).resolve()
    for run_dir in (ckpt.parent.parent, ckpt.parent):
        candidate = run_dir / ".hydra" / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Temp file in the target folder, then ``os.replace``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_bytes(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def write_binary_mask_png(path: Path, mask: np.ndarray | torch.Tensor) -> None:
    """A binary mask [H, W] (nonzero = foreground) as the official single-channel 0/255 PNG."""
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"write_binary_mask_png: expected [H, W], got {mask.shape}")
    write_bytes_atomic(path, _png_bytes(np.where(mask != 0, 255, 0).astype(np.uint8), "L"))


def write_colour_mask_png(path: Path, labels: np.ndarray | torch.Tensor) -> None:
    """Class indices [H, W] as an AVSS colour PNG (PASCAL-VOC colours, RGB)."""
    from avseg.data.palette import encode_colour_mask

    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"write_colour_mask_png: expected [H, W], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"write_colour_mask_png: class indices must be in 0..255, got {labels.min()}..{labels.max()}")
    write_bytes_atomic(path, _png_bytes(np.ascontiguousarray(encode_colour_mask(labels.astype(np.int64))), "RGB"))


def mask_relpaths(dataset: Any, index: int) -> list[tuple[int, Path]]:
    """(frame t, path relative to ``pred_masks/``) for the real frames of clip ``index``, in the
    official naming: S4 ``<category>/<name>/<name>_<k>.png`` (k = t + 1), MS3
    ``<name>/<name>_<k>.png``, AVSS ``<uid>/<t>.png``."""
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


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# evaluation loop


def evaluate_dataset(
    module: Any,
    dataset: Any,
    *,
    batch_size: int,
    frames_per_batch: int,
    device: torch.device,
    num_workers: int = 0,
    masks_dir: Path | None = None,
) -> dict[str, float]:
    """The official metrics of ``module`` on ``dataset`` (every frame, padded AVSS frames included,
    as the official evaluation does). With ``masks_dir``, writes each real frame's predicted mask."""
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips
    from avseg.metrics import BinaryAVSMetric, SemanticAVSMetric
    from avseg.models.postprocess import binary_logits, semantic_scores

    semantic = bool(module.semantic)
    metric = SemanticAVSMetric(num_classes=71) if semantic else BinaryAVSMetric(frames_per_batch=frames_per_batch)
    metric = metric.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_clips)
    net = module.net.eval()
    with torch.inference_mode():
        for batch in loader:
            frames = batch["frames"].to(device)
            masks = batch["masks"].to(device)
            frame_valid = batch["frame_valid"].to(device)
            outputs = net(frames, batch["audio"].to(device), frame_valid)
            b, t = masks.shape[:2]
            size = tuple(masks.shape[-2:])
            predictions = semantic_scores(outputs, size) if semantic else binary_logits(outputs, size)
            frame_index = batch["index"].to(device).long()[:, None] * t + torch.arange(t, device=device)
            metric.update(predictions.float(), rearrange(masks, "b t h w -> (b t) h w"), frame_index.reshape(-1))
            if masks_dir is not None:
                labels = predictions.argmax(dim=1) if semantic else (predictions > 0).long()
                labels = rearrange(labels, "(b t) h w -> b t h w", b=b).cpu()
                for row, clip_index in enumerate(batch["index"].tolist()):
                    for frame, relpath in mask_relpaths(dataset, clip_index):
                        writer = write_colour_mask_png if semantic else write_binary_mask_png
                        writer(masks_dir / relpath, labels[row, frame])
    return {name: float(value) for name, value in metric.compute().items()}


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


# ---------------------------------------------------------------------------------------------
# entry point


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
        raise ConfigError(f"{train_config}: the training run's config has no 'data' node; give data=... on the command line")
    with open_dict(cfg):
        cfg.data = stored.data
    return str(train_config)


def run(cfg: DictConfig, *, output_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path``; writes ``output_dir/metrics.json`` (and masks). ``overrides``:
    the command line's overrides (a data option there wins over the training run's data config)."""
    from avseg.data.perturb import PerturbedDataset, WhiteNoise, check_perturbation
    from avseg.lit.callbacks import write_json_atomic

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
            raise ConfigError(f"save_masks: the output folder {masks_root} lies inside the data tree {dataset.root}; run from elsewhere (hydra.run.dir=...)")
        if perturb in ("mute", "swap"):
            dataset = PerturbedDataset(dataset, mode=perturb, seed=int(cfg.perturb_seed))
        num_clips += len(dataset)
        masks_dir = None if masks_root is None else (masks_root if len(names) == 1 else masks_root / name)
        metrics = evaluate_dataset(
            module, dataset, batch_size=batch_size, frames_per_batch=frames_per_batch, device=device,
            num_workers=num_workers, masks_dir=masks_dir,
        )
        prefix = split if len(names) == 1 else f"{split}/{name}"
        results.update({f"{prefix}/{key}": value for key, value in metrics.items()})
        rows.append((prefix, metrics))

    payload: dict[str, Any] = {
        key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in results.items()
    }
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
        }
    )
    write_json_atomic(output_dir / "metrics.json", payload)
    what = f"perturb={perturb}" + (f" at {float(snr_db):g} dB SNR" if perturb == "noise" else "")
    title = (
        f"Evaluation of {ckpt_path} on {datamodule.subset} {split} ({num_clips} clips; {what}; "
        f"F-score batch {frames_per_batch if not module.semantic else '-'} frames)"
    )
    print("\n" + format_eval_table(rows, title=title))
    print(f"data config  : {data_source}")
    print(f"metrics      : {output_dir / 'metrics.json'}")
    if masks_root is not None:
        print(f"masks        : {masks_root}")
    print(f"time         : {time.perf_counter() - started:.1f} s", flush=True)
    return payload


@hydra.main(config_path="../../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    hydra_cfg = HydraConfig.get()
    # a bad input or config: one clear `error:` line, not a deep stack trace (avseg.cli)
    return run_main(
        run, cfg, output_dir=Path(hydra_cfg.runtime.output_dir), overrides=list(hydra_cfg.overrides.task)
    )


if __name__ == "__main__":
    main()
