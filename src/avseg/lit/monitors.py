"""Monitoring callbacks: codebook usage per epoch and mask overlays of fixed validation clips.

- `CodebookMonitor`: per-epoch codebook usage (histogram to wandb, used/dead counts to every logger).
- `MaskOverlayLogger`: predicted and ground-truth masks over a few fixed validation clips.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from avseg.io import overlay_labels, write_png_atomic

log = logging.getLogger(__name__)

__all__ = ["CodebookMonitor", "MaskOverlayLogger", "overlay_masks"]


def _wandb_loggers(trainer: Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class CodebookMonitor(Callback):
    """Per-epoch codebook usage: ``train/codebook_used_epoch`` and ``train/codebook_dead_epoch``
    (codes never selected during the epoch) to every logger, and the usage histogram to wandb.

    The module accumulates ``code_usage_epoch`` (float [N] counts) from the quantiser's ``usage``
    each training step; per-step perplexity / dead counts are logged by the module itself.
    """

    def __init__(self, *, histogram_every_n_epochs: int = 1) -> None:
        super().__init__()
        self.histogram_every_n_epochs = int(histogram_every_n_epochs)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if hasattr(pl_module, "code_usage_epoch"):
            pl_module.code_usage_epoch = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        usage = getattr(pl_module, "code_usage_epoch", None)
        if usage is None:
            return
        usage = usage.detach().float()
        if trainer.world_size > 1:
            usage = pl_module.all_gather(usage).reshape(-1, usage.numel()).sum(0)
        used = int((usage > 0).sum())
        pl_module.log("train/codebook_used_epoch", float(used), rank_zero_only=True, sync_dist=False)
        pl_module.log("train/codebook_dead_epoch", float(usage.numel() - used), rank_zero_only=True, sync_dist=False)
        every = self.histogram_every_n_epochs
        if not trainer.is_global_zero or every <= 0 or trainer.current_epoch % every != 0:
            return
        for logger in _wandb_loggers(trainer):
            import wandb

            counts = usage.cpu().numpy()
            edges = np.arange(counts.size + 1, dtype=np.float64)
            logger.experiment.log(
                {
                    "train/codebook_usage": wandb.Histogram(np_histogram=(counts, edges)),
                    "trainer/global_step": trainer.global_step,
                }
            )


_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def overlay_masks(frame: torch.Tensor, mask: torch.Tensor, *, semantic: bool, alpha: float = 0.5) -> np.ndarray:
    """An ImageNet-normalised frame [3, H, W] with a label mask [H, W] blended on
    (`avseg.io.overlay_labels`): uint8 [H, W, 3]."""
    image = (frame.detach().cpu().float() * _IMAGENET_STD + _IMAGENET_MEAN).clamp(0, 1)
    image = (image * 255.0).to(torch.uint8)
    return overlay_labels(image, mask.detach().cpu(), semantic=semantic, alpha=alpha).permute(1, 2, 0).numpy()


class MaskOverlayLogger(Callback):
    """Ground truth (left) and prediction (right) overlays for the first ``num_clips`` clips of the
    (unshuffled, hence fixed) validation set, every ``every_n_epochs`` epochs, to wandb; with
    ``save_png=true`` also as PNG files in ``<run dir>/overlays/``.

    Uses the ``pred_labels`` [B, T, H, W] that ``AVSLitModule.validation_step`` returns.
    """

    def __init__(self, *, num_clips: int = 4, every_n_epochs: int = 1, save_png: bool = False) -> None:
        super().__init__()
        self.num_clips = int(num_clips)
        self.every_n_epochs = int(every_n_epochs)
        self.save_png = bool(save_png)
        self._rows: list[tuple[str, np.ndarray]] = []

    def _active(self, trainer: Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and self.num_clips > 0
            and self.every_n_epochs > 0
            and trainer.current_epoch % self.every_n_epochs == 0
            and (bool(_wandb_loggers(trainer)) or self.save_png)
        )

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer) or len(self._rows) >= self.num_clips or not isinstance(outputs, dict):
            return
        predictions = outputs.get("pred_labels")
        if predictions is None:
            return
        semantic = bool(getattr(pl_module, "semantic", False))
        frames, masks, frame_valid = batch["frames"], batch["masks"], batch["frame_valid"]
        for clip in range(frames.shape[0]):
            if len(self._rows) >= self.num_clips:
                break
            tiles = []
            for t in range(frames.shape[1]):
                if not bool(frame_valid[clip, t]):
                    continue
                truth = overlay_masks(frames[clip, t], masks[clip, t], semantic=semantic)
                predicted = overlay_masks(frames[clip, t], predictions[clip, t], semantic=semantic)
                tiles.append(np.concatenate([truth, predicted], axis=1))
            if tiles:
                self._rows.append((str(batch["video_id"][clip]), np.concatenate(tiles, axis=0)))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._rows or not self._active(trainer):
            return
        captions = [f"{video_id} (left: ground truth, right: prediction)" for video_id, _ in self._rows]
        images = [image for _, image in self._rows]
        for logger in _wandb_loggers(trainer):
            logger.log_image(key="val/overlays", images=images, caption=captions, step=trainer.global_step)
        if self.save_png:
            folder = Path(trainer.default_root_dir) / "overlays"
            for video_id, image in self._rows:
                safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in video_id)
                write_png_atomic(folder / f"epoch{trainer.current_epoch:03d}_{safe_id}.png", image)
        self._rows = []
