"""Inference, once: loading a trained model, choosing the device, and the one predictor
(network -> postprocess -> scores -> labels) behind every path that runs a trained model: the
Lightning validation / test / predict steps (`avseg.lit.module`), ``python -m avseg.eval``,
``python -m avseg.predict`` and ``python -m avseg.analysis``.

- `predict_scores`: the network on a batch, then `binary_logits` (S4 / MS3: logits [B, T, H, W]) or
  `semantic_scores` (AVSS: scores [B, T, 71, H, W]) at the requested size; padded frames
  (``frame_valid`` false: AVSBench-semantic clips shorter than 10 s, the last clip of a video in
  ``avseg.predict``) are set to background (`padded_as_background`). The network itself gives a
  padded frame no audio (zero audio codes, `avseg.models.qdformer.QDFormer`), so neither the
  global codes of its clip nor anything else reaches it.
- `scores_to_labels`: [B, T, H, W] long labels (logit > 0, i.e. sigmoid > 0.5; or the argmax class).
- `update_metric`: every frame (padded AVSS frames included, as the official evaluation scores them)
  into an official metric with its global position ``clip index * T + t``.
- `evaluation_loader` / `evaluate_dataset`: the evaluation batching (clips in dataset order,
  ``batch_size`` clips per batch: the batches of the data module's own test loader) and the loop
  ``avseg.eval`` / ``avseg.analysis`` run.

Exact agreement. ``avseg.eval`` on a checkpoint gives the same numbers as the training run's own
test stage: the same batches through the same function. On a CPU the float rounding of PyTorch's
matrix products and convolutions depends on the number of intra-op threads
(``torch.get_num_threads()``, set by ``OMP_NUM_THREADS``): a 1x1 convolution of the tiny demo model
differs by 1e-6 between 1 and 2 threads, which moved its test F-score by 6e-5 (measured on an
Intel Xeon). Evaluate with the thread count the training process had; ``metrics.json`` records
it (``cpu_threads``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from avseg.data.layout import LAYOUTS
from avseg.errors import ConfigError

__all__ = [
    "NUM_AVSS_CLASSES",
    "resolve_device",
    "load_model",
    "model_audio_input",
    "training_run_config",
    "padded_as_background",
    "predict_scores",
    "batch_scores",
    "scores_to_labels",
    "frame_indices",
    "update_metric",
    "new_metric",
    "evaluation_loader",
    "evaluate_dataset",
]

NUM_AVSS_CLASSES = LAYOUTS["avss"].num_mask_classes  # 71, background included


# ---------------------------------------------------------------------------------------------
# the trained model and where it runs


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def load_model(ckpt_path: str | os.PathLike, device: torch.device) -> Any:
    """The trained `AVSLitModule` of a checkpoint, in eval mode on ``device`` (weights only, no
    pretrained-weight files read again: `AVSLitModule.load_trained`)."""
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


# ---------------------------------------------------------------------------------------------
# the predictor


def padded_as_background(scores: Tensor, frame_valid: Tensor | None, *, semantic: bool) -> Tensor:
    """Padded frames (``frame_valid`` [B, T] false) predicted as background everywhere.

    Binary logits [B, T, H, W]: the lowest finite logit (sigmoid 0, below every F-score threshold).
    Semantic scores [B, T, C, H, W]: background 1, every object class 0 (argmax 0)."""
    if frame_valid is None:
        return scores
    padded = ~frame_valid.to(device=scores.device, dtype=torch.bool)
    if not bool(padded.any()):
        return scores
    if padded.shape != scores.shape[:2]:
        raise ValueError(
            f"padded_as_background: frame_valid {tuple(frame_valid.shape)} does not match scores {tuple(scores.shape)}"
        )
    scores = scores.clone()
    if semantic:
        background = torch.zeros(scores.shape[2], dtype=scores.dtype, device=scores.device)
        background[0] = 1
        scores[padded] = background[:, None, None].expand(-1, *scores.shape[-2:])
    else:
        scores[padded] = torch.finfo(scores.dtype).min
    return scores


def predict_scores(
    net: torch.nn.Module,
    frames: Tensor,
    audio: Tensor,
    frame_valid: Tensor | None,
    *,
    semantic: bool,
    size: int | tuple[int, int],
) -> Tensor:
    """The network on one batch, post-processed at ``size``: binary logits [B, T, H, W] or semantic
    scores [B, T, 71, H, W]; padded frames are background (`padded_as_background`).

    frames [B, T, 3, S, S], audio [B, T, 1, 96, 64] or [B, T, 128], frame_valid [B, T] bool."""
    from avseg.models.postprocess import binary_logits, semantic_scores

    outputs = net(frames, audio, frame_valid)
    b = frames.shape[0]
    if semantic:
        scores = rearrange(semantic_scores(outputs, size), "(b t) c h w -> b t c h w", b=b)
    else:
        scores = rearrange(binary_logits(outputs, size), "(b t) h w -> b t h w", b=b)
    return padded_as_background(scores, frame_valid, semantic=semantic)


def scores_to_labels(scores: Tensor, *, semantic: bool) -> Tensor:
    """[B, T, H, W] long labels from `predict_scores`: 0/1 (logit > 0) or the argmax class."""
    if semantic:
        return scores.argmax(dim=2)
    return (scores > 0).long()


def batch_scores(
    net: torch.nn.Module, batch: Mapping[str, Any], *, semantic: bool, size: tuple[int, int] | None = None
) -> Tensor:
    """`predict_scores` on a collated batch (already on the network's device) at ``size``
    (default: the masks' size if the batch has masks, else the frames')."""
    frames = batch["frames"]
    if size is None:
        size = tuple(batch["masks"].shape[-2:]) if "masks" in batch else tuple(frames.shape[-2:])
    return predict_scores(net, frames, batch["audio"], batch.get("frame_valid"), semantic=semantic, size=size)


# ---------------------------------------------------------------------------------------------
# metrics


def new_metric(*, semantic: bool, frames_per_batch: int) -> Any:
    """The official metric: `SemanticAVSMetric` (71 classes) or `BinaryAVSMetric` (F-score batches
    of ``frames_per_batch`` frames)."""
    from avseg.metrics import BinaryAVSMetric, SemanticAVSMetric

    if semantic:
        return SemanticAVSMetric(num_classes=NUM_AVSS_CLASSES)
    return BinaryAVSMetric(frames_per_batch=frames_per_batch)


def frame_indices(index: Tensor, num_frames: int) -> Tensor:
    """Global frame positions ``clip index * T + t`` [B * T] of clips ``index`` [B]."""
    t = torch.arange(num_frames, device=index.device)
    return (index.long()[:, None] * num_frames + t).reshape(-1)


def update_metric(metric: Any, scores: Tensor, batch: Mapping[str, Any]) -> None:
    """Every frame of the batch (padded AVSS frames included, as the official evaluation does) with
    its global position, so DDP padding / interleaving cannot change the result."""
    masks = batch["masks"]
    index = batch["index"].to(scores.device)
    flat = rearrange(scores, "b t ... -> (b t) ...")
    metric.update(
        flat.float(), rearrange(masks, "b t h w -> (b t) h w").to(scores.device), frame_indices(index, masks.shape[1])
    )


# ---------------------------------------------------------------------------------------------
# the evaluation loop


def evaluation_loader(dataset: Any, *, batch_size: int, num_workers: int = 0, **options: Any) -> Any:
    """Clips in dataset order, ``batch_size`` per batch: the batching of the data module's test
    loader (`AVSDataModule.test_dataloader`), which the official binary F-score depends on."""
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips

    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_clips, **options
    )


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


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
    """The official metrics of a trained ``module`` (an `AVSLitModule`) on ``dataset``: every
    frame, padded AVSS frames included (as background). With ``masks_dir``, writes each real
    frame's predicted mask in the official naming (`avseg.io.mask_relpaths`)."""
    from avseg.io import mask_relpaths, write_label_png

    semantic = bool(module.semantic)
    metric = new_metric(semantic=semantic, frames_per_batch=frames_per_batch).to(device)
    net = module.net.eval()
    with torch.inference_mode():
        for batch in evaluation_loader(dataset, batch_size=batch_size, num_workers=num_workers):
            batch = _to(batch, device)
            scores = batch_scores(net, batch, semantic=semantic)
            update_metric(metric, scores, batch)
            if masks_dir is not None:
                labels = scores_to_labels(scores, semantic=semantic).cpu()
                for row, clip_index in enumerate(batch["index"].tolist()):
                    for frame, relpath in mask_relpaths(dataset, clip_index):
                        write_label_png(masks_dir / relpath, labels[row, frame], semantic=semantic)
    return {name: float(value) for name, value in metric.compute().items()}
