"""``python -m avseg.train [experiment=NAME] [overrides]``: train, validate, test on the best checkpoint.

With no arguments it runs the embedded default: SynthAVS multi-source data generated on first use,
a small QDFormer, CPU; it prints M_J / M_F on the synthetic test split and where the outputs went.
Every run but ``fast_dev_run`` writes ``metrics.json`` (one flat object of the final logged
metrics) in its Hydra run directory, next to ``checkpoints/last.ckpt`` and ``checkpoints/best.ckpt``.
See docs/TRAINING.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from avseg.errors import AvsegError, CheckpointError, ConfigError

__all__ = ["main", "run", "validate_config", "avseg_cause"]


def avseg_cause(error: BaseException) -> AvsegError | None:
    """The project's own error behind ``error`` (Hydra's instantiate wraps exceptions), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, AvsegError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def validate_config(cfg: DictConfig) -> None:
    """Start-up checks before any data is read: every violation is one line naming the key and the
    allowed values; all of them are reported together as one `ConfigError`."""
    problems: list[str] = []
    dim = _select(cfg, "model.dim")
    dec = _select(cfg, "model.decomposition") or {}
    variant = dec.get("variant")
    variants = ("pq", "pq_split", "vq", "none")
    if variant not in variants:
        problems.append(f"model.decomposition.variant={variant!r}: allowed values are {' | '.join(variants)}")
    k, n = dec.get("num_subspaces"), dec.get("codebook_size")
    if not isinstance(k, int) or k < 1:
        problems.append(f"model.decomposition.num_subspaces={k!r}: an int >= 1")
    if not isinstance(n, int) or n < 1:
        problems.append(f"model.decomposition.codebook_size={n!r}: an int >= 1")
    elif isinstance(k, int) and k >= 1 and variant != "vq" and n < k:
        problems.append(f"model.decomposition.codebook_size={n}: must be >= num_subspaces ({k})")
    if variant == "pq_split" and isinstance(k, int) and k >= 1 and isinstance(dim, int) and dim % k != 0:
        problems.append(f"model.decomposition.num_subspaces={k}: pq_split chunks must divide model.dim={dim}")
    beta = dec.get("beta")
    if beta is not None and not (isinstance(beta, (int, float)) and beta >= 0):
        problems.append(f"model.decomposition.beta={beta!r}: a number >= 0")
    data_classes = {"s4": 1, "ms3": 1, "avs": 1, "avss": 70}
    subset = _select(cfg, "data.subset")
    if subset not in data_classes:
        problems.append(f"data.subset={subset!r}: allowed values are {' | '.join(data_classes)}")
    elif _select(cfg, "model.num_classes") != data_classes[subset]:
        problems.append(
            f"model.num_classes={_select(cfg, 'model.num_classes')!r}: must be {data_classes[subset]} for data.subset={subset}"
        )
    expected = _select(cfg, "expected_subset")
    if expected is not None and subset != expected:
        problems.append(f"data.subset={subset!r}: this experiment expects data.subset={expected}")
    for key in ("data.batch_size", "data.eval_batch_size"):
        value = _select(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{key}={value!r}: an int >= 1")
    fpb = _select(cfg, "model.metric.frames_per_batch")
    frames = {"s4": 5, "ms3": 5, "avs": 5, "avss": 10}.get(subset)
    if fpb is not None and frames is not None and (not isinstance(fpb, int) or fpb < 1 or fpb % frames):
        problems.append(f"model.metric.frames_per_batch={fpb!r}: null or a positive multiple of the clip length ({frames})")
    clip = _select(cfg, "trainer.gradient_clip_val")
    if clip is not None and not (isinstance(clip, (int, float)) and clip >= 0):
        problems.append(f"trainer.gradient_clip_val={clip!r}: null or a number >= 0")
    accelerators = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
    accelerator = _select(cfg, "trainer.accelerator")
    if accelerator not in accelerators:
        problems.append(f"trainer.accelerator={accelerator!r}: allowed values are {' | '.join(accelerators)}")
    max_epochs = _select(cfg, "trainer.max_epochs")
    if max_epochs is not None and (not isinstance(max_epochs, int) or max_epochs < -1 or max_epochs == 0):
        problems.append(f"trainer.max_epochs={max_epochs!r}: an int >= 1 (or -1 for no limit)")
    every = _select(cfg, "callbacks.checkpoint.every_n_train_steps")
    if every is not None and (not isinstance(every, int) or every < 0):
        problems.append(f"callbacks.checkpoint.every_n_train_steps={every!r}: an int >= 0 (0 = epoch ends only)")
    if not isinstance(_select(cfg, "skip_nonfinite"), bool):
        problems.append(f"skip_nonfinite={_select(cfg, 'skip_nonfinite')!r}: true | false")
    ckpt = _select(cfg, "ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).expanduser().is_file():
        problems.append(f"ckpt_path={ckpt}: no such file (give <run dir>/checkpoints/last.ckpt to resume)")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


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


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test on the best checkpoint; returns the final metrics (also in metrics.json)."""
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
    loggers = build_loggers(cfg.get("logger"), run_name=run_name, sweep_group=Path(hydra_cfg.sweep.dir).name if multirun else None)
    if not loggers:  # the learning-rate monitor needs a logger to write to
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        module.checkpoint_source = str(ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    final = scalar_metrics(trainer.callback_metrics)

    best = next((c for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.monitor == "val/miou"), None)
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    test_ckpt: str | None = None
    if best is not None and best.best_model_path and best.best_model_score is not None:
        final["val/miou_best"] = float(best.best_model_score)
    if cfg.get("test", True):
        if not trainer.fast_dev_run:
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
    final["train/nonfinite_skipped"] = float(module.nonfinite_skipped)

    if trainer.is_global_zero:
        where = [f"run directory : {output_dir}"]
        if not trainer.fast_dev_run:
            write_metrics_json(output_dir / "metrics.json", final)
            where.append(f"metrics      : {output_dir / 'metrics.json'}")
            where.append(f"best ckpt    : {test_ckpt}")
            if last is not None:
                where.append(f"last ckpt    : {last.last_model_path}")
        for logger in loggers:
            where.append(f"{type(logger).__name__:<13}: {getattr(logger, 'log_dir', None) or getattr(logger, 'save_dir', '')}")
        subset = _select(cfg, "data.subset")
        title = f"Test results ({subset}{', synthetic' if _select(cfg, 'data.synth') else ''}; best checkpoint by val/miou)"
        if cfg.get("test", True):
            print("\n" + format_result_table(final, title=title))
        print("\n".join(where), flush=True)
    return final


@hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, float] | None:
    from avseg.lit.runtime import finish_wandb

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return run(cfg)
    except Exception as error:
        cause = avseg_cause(error)
        if cause is None or multirun:
            raise  # multirun: Hydra records the job as failed (summary.csv) and runs the other jobs
        # a bad input or config: one clear message, not a deep stack trace
        print(f"\nerror: {cause}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        finish_wandb()


if __name__ == "__main__":
    main()
