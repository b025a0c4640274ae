"""``python -m avseg.train [experiment=NAME] [overrides]``: train, validate, test on the best checkpoint.

With no arguments it runs the embedded default: SynthAVS multi-source data generated on first use,
a small QDFormer, CPU; it prints M_J / M_F on the synthetic test split and where the outputs went.
Every run but ``fast_dev_run`` writes ``metrics.json`` (one flat object of the final logged
metrics, and ``test/ckpt_path`` / ``test/ckpt_step``: the checkpoint the test metrics come from) in
its Hydra run directory, next to ``checkpoints/last.ckpt`` (always the final training state, however
``fit`` ended) and ``checkpoints/best.ckpt``.

``ckpt_path=auto`` resumes from the run directory's ``checkpoints/last.ckpt`` when there is one; a
SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0) does so with ``ckpt_path=null`` too.
See docs/TRAINING.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from avseg.cli import run_main
from avseg.config_validation import validate_config
from avseg.errors import CheckpointError

__all__ = ["main", "run", "resolve_ckpt_path"]

log = logging.getLogger(__name__)


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _single_console_log() -> None:
    """Lightning adds its own console handler when imported before Hydra configured logging;
    Hydra's root handlers (console + the run's log file) already show its messages."""
    import logging

    if not logging.getLogger().handlers:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)


def resolve_ckpt_path(ckpt_path: Any, output_dir: Path) -> str | None:
    """The checkpoint ``fit`` resumes from. ``auto``: ``<output_dir>/checkpoints/last.ckpt`` if it
    exists, else none (a fresh start). ``null`` in a requeued SLURM job (``SLURM_RESTART_COUNT`` >
    0): the same as ``auto``, so a preempted job continues where it stopped. Logged either way."""
    own = output_dir / "checkpoints" / "last.ckpt"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if ckpt_path is None and restarts > 0:
        if own.is_file():
            log.info("SLURM restart %d of job %s: resuming from %s", restarts, os.environ.get("SLURM_JOB_ID"), own)
            return str(own)
        log.warning("SLURM restart %d, but %s does not exist: starting from scratch", restarts, own)
        return None
    if ckpt_path == "auto":
        if own.is_file():
            log.info("ckpt_path=auto: resuming from %s", own)
            return str(own)
        log.info("ckpt_path=auto: %s does not exist, starting from scratch", own)
        return None
    return None if ckpt_path is None else str(ckpt_path)


def _checkpoint_step(path: str) -> int:
    """The global step stored in a checkpoint file (read with the safe loader)."""
    from avseg.lit.checkpoint_io import load_checkpoint_file

    return int(load_checkpoint_file(path, map_location="cpu")["global_step"])


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test on the best (or, with ``test_ckpt=last``, the last) checkpoint; returns the final
    metrics (also in metrics.json)."""
    import lightning.pytorch as pl

    from avseg.lit.callbacks import LastCheckpoint
    from avseg.lit.runtime import (
        build_callbacks,
        build_loggers,
        format_result_table,
        scalar_metrics,
        write_metrics_json,
    )

    validate_config(cfg)
    _single_console_log()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = hydra.utils.instantiate(cfg.data)
    # Read the data first: a missing dataset stops the run at once with the path it looked for
    # (and how to get the data), before any weights file is opened. Lightning's own setup call
    # inside fit() rebuilds the (cheap) dataset indexes.
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.model, skip_nonfinite=bool(cfg.skip_nonfinite))
    callbacks = build_callbacks(cfg.get("callbacks"))
    run_name = f"{cfg.task_name}-{hydra_cfg.job.num}" if multirun else f"{cfg.task_name}-{output_dir.name}"
    loggers = build_loggers(
        cfg.get("logger"), run_name=run_name, sweep_group=Path(hydra_cfg.sweep.dir).name if multirun else None
    )
    if not loggers:  # the learning-rate monitor needs a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path is not None:
        module.checkpoint_source = str(ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    final: dict[str, Any] = scalar_metrics(trainer.callback_metrics)

    best = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor == "val/miou"), None)
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    test_ckpt: str | None = None
    if best is not None and best.best_model_path and best.best_model_score is not None:
        final["val/miou_best"] = float(best.best_model_score)
    test_choice = str(cfg.get("test_ckpt", "best"))
    if cfg.get("test", True):
        if not trainer.fast_dev_run and test_choice == "last":
            if last is None or not Path(last.last_model_path).is_file():
                raise CheckpointError(
                    output_dir / "checkpoints",
                    "test_ckpt=last but no last checkpoint was written (callbacks.checkpoint null?); use "
                    "test_ckpt=best",
                )
            test_ckpt = last.last_model_path
            # last.ckpt is written at the step fit ended on (LastCheckpoint): check it is that state
            if _checkpoint_step(test_ckpt) != trainer.global_step:
                raise CheckpointError(
                    test_ckpt,
                    f"holds step {_checkpoint_step(test_ckpt)}, but training ended at step {trainer.global_step}: "
                    "not the final state (test_ckpt=last)",
                )
        elif not trainer.fast_dev_run:
            if best is None or not best.best_model_path:
                raise CheckpointError(
                    output_dir / "checkpoints",
                    "no best checkpoint by val/miou to test (validation disabled, or callbacks.best_checkpoint null?); "
                    "run with test=false or enable validation",
                )
            test_ckpt = best.best_model_path
        module.checkpoint_source = test_ckpt
        trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=True)
        final.update(scalar_metrics(trainer.callback_metrics))
        if test_ckpt is not None:
            final["test/ckpt_path"] = str(test_ckpt)
            final["test/ckpt_step"] = _checkpoint_step(test_ckpt)
    final["train/nonfinite_skipped"] = float(module.nonfinite_skipped)

    if trainer.is_global_zero:
        where = [f"run directory : {output_dir}"]
        if not trainer.fast_dev_run:
            write_metrics_json(output_dir / "metrics.json", final)
            where.append(f"metrics      : {output_dir / 'metrics.json'}")
            if best is not None and best.best_model_path:
                where.append(f"best ckpt    : {best.best_model_path}")
            if last is not None:
                where.append(f"last ckpt    : {last.last_model_path}")
            if test_ckpt is not None:
                where.append(f"tested       : {test_choice} ({test_ckpt}, step {final['test/ckpt_step']})")
        for logger in loggers:
            where.append(
                f"{type(logger).__name__:<13}: {getattr(logger, 'log_dir', None) or getattr(logger, 'save_dir', '')}"
            )
        subset = _select(cfg, "data.subset")
        chosen = "last checkpoint" if test_choice == "last" else "best checkpoint by val/miou"
        if test_ckpt is not None:
            chosen += f": {test_ckpt}, step {final['test/ckpt_step']}"
        synth = _select(cfg, "data.synth")
        kind = (
            ""
            if not synth
            else (", SynthAVS real assets" if _select(cfg, "data.synth.assets") == "real" else ", synthetic")
        )
        title = f"Test results ({subset}{kind}; {chosen})"
        if cfg.get("test", True):
            log.info("%s", "\n" + format_result_table(final, title=title))
        log.info("%s", "\n".join(where))
    return final


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float] | None:
    from avseg.lit.runtime import finish_wandb

    try:
        # a bad input or config: one clear `error:` line, not a deep stack trace (avseg.cli)
        return run_main(run, cfg)
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
