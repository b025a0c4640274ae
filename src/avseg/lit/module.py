"""``AVSLitModule``: QDFormer training, validation, test and prediction in Lightning.

Hydra instantiates it from the ``model`` config with ``_recursive_: false``; every key arrives as
a typed keyword-only argument. The network keys (``dim``, ``num_classes``, ``backbone``,
``audio_encoder``, ``decomposition``, ``fusion``, ``decoder``, ``init_from``, ``ms_deform_backend``,
``aux_loss``) go to `avseg.models.build.build_qdformer`; the keys below belong to training and are
read here (all optional; defaults are the ReferFormer-family recipe of docs/METHOD.md section 1.9):

- ``semantic``: AVSS (71-class semantic masks) or binary AVS; default ``num_classes > 1``.
- ``loss``: `SetCriterion` weights (``weight_class`` 2, ``weight_bbox`` 5, ``weight_giou`` 2,
  ``weight_mask`` 2, ``weight_dice`` 5, ``weight_vq`` 0.5, ``weight_distill`` 1, ``weight_similarity`` 0,
  ``weight_source`` 0 (> 0 also builds the model's sub-space source head), focal and
  ``mask_resolution`` options), flat keys that `SetCriterion.from_config` groups (the five matched
  terms' weights into `avseg.models.terms.TermWeights`, ``focal_*`` into ``FocalLoss``).
- ``matcher``: `HungarianMatcher` costs; ``null`` -> costs equal to the loss weights (built once,
  by `avseg.models.matcher.build_matcher` inside the criterion).
- ``optim``: AdamW ``lr`` 1e-4, ``backbone_lr`` 5e-5, ``weight_decay`` 5e-4, ``betas``.
- ``scheduler``: ``type: step`` (MultiStepLR: ``milestones``, ``gamma``, ``interval`` epoch|step)
  or ``type: none``.
- ``metric``: ``frames_per_batch`` of the official binary F-score batches; ``null`` (default) =
  the data module's evaluation batch (``eval_batch_size`` clips x T frames: 4 x 5 = 20 officially).
- ``compile``: ``false`` | ``true`` | torch.compile options: compile the network's parts
  (`avseg.lit.compilation`).
- ``skip_nonfinite``: a batch with a NaN/Inf loss term is skipped and counted
  (``train/nonfinite_skipped``) instead of stopping the run (the top-level config switch).

Every argument is stored with ``save_hyperparameters`` as plain values (the same flat layout as
the ``model`` config, so checkpoints written before the arguments were typed load unchanged), and
``AVSLitModule.load_from_checkpoint(path)`` rebuilds the module without Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from avseg.errors import AvsegError, CheckpointError, ConfigError
from avseg.inference import NUM_AVSS_CLASSES, batch_scores, new_metric, scores_to_labels, update_metric
from avseg.lit.compilation import compile_network, compile_options
from avseg.metrics import BinaryAVSMetric, SemanticAVSMetric
from avseg.models.build import build_qdformer
from avseg.models.criterion import SetCriterion
from avseg.models.options import Problem, choice, int_at_least, present

__all__ = ["AVSLitModule", "NonFiniteLossError"]

_HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_")
# the arguments that go to `build_qdformer`, and those read here, in the order they are stored
NETWORK_SECTIONS = ("backbone", "audio_encoder", "decomposition", "fusion", "decoder")
NETWORK_KEYS = ("dim", "num_classes", "init_from", "ms_deform_backend", "aux_loss", *NETWORK_SECTIONS)
TRAINING_KEYS = ("semantic", "loss", "matcher", "optim", "scheduler", "metric", "skip_nonfinite", "compile")

_DEFAULT_OPTIM = {"lr": 1e-4, "backbone_lr": 5e-5, "weight_decay": 5e-4, "betas": [0.9, 0.999], "eps": 1e-8}
_DEFAULT_SCHEDULER = {"type": "step", "milestones": [], "gamma": 0.1, "interval": "epoch"}
_DEFAULT_METRIC: dict[str, Any] = {"frames_per_batch": None}


class NonFiniteLossError(AvsegError, FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig / nested mappings -> plain dicts, lists and scalars (resolved)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merged(defaults: dict[str, Any], given: Any, key: str) -> dict[str, Any]:
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise ConfigError(f"model.{key}: expected a mapping, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"model.{key}: unknown keys {unknown}; allowed: {sorted(defaults)}")
    return {**defaults, **dict(given)}


class AVSLitModule(LightningModule):
    """QDFormer + set criterion + official AVSBench metrics. See the module docstring for the keys."""

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> list[Problem]:
        """The problems of the ``model.scheduler`` and ``model.metric`` values ``options`` holds
        (absent ones are not checked); run by the constructor and, at start-up, by
        `avseg.config_validation` (which adds the clip-length check of ``frames_per_batch``)."""
        sections = {
            "scheduler": {"type": choice(("step", "none")), "interval": choice(("epoch", "step"))},
            "metric": {"frames_per_batch": lambda key, value: int_at_least(key, value, 1, nullable=True)},
        }
        problems: list[Problem] = []
        for name, checks in sections.items():
            if isinstance(options.get(name), Mapping):
                problems += present(options[name], checks, f"model.{name}.")
        return problems

    def __init__(
        self,
        *,
        dim: int,
        backbone: Mapping[str, Any],
        audio_encoder: Mapping[str, Any],
        decomposition: Mapping[str, Any],
        fusion: Mapping[str, Any],
        decoder: Mapping[str, Any],
        num_classes: int,
        init_from: str | None = None,
        ms_deform_backend: str = "auto",
        aux_loss: bool = True,
        semantic: bool | None = None,
        loss: Mapping[str, Any] | None = None,
        matcher: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        metric: Mapping[str, Any] | None = None,
        skip_nonfinite: bool = False,
        compile: bool | Mapping[str, Any] | None = False,
        **hydra_keys: Any,
    ) -> None:
        """
        Args:
            dim, backbone, audio_encoder, decomposition, fusion, decoder, num_classes, init_from,
                ms_deform_backend, aux_loss: the network config, built by
                `avseg.models.build.build_qdformer` (which checks it).
            semantic, loss, matcher, optim, scheduler, metric, skip_nonfinite, compile: training
                (see the module docstring).
            hydra_keys: only Hydra's own keys (``_target_``, ``_recursive_``, ...), ignored, so a
                composed ``model`` config can be passed as ``AVSLitModule(**cfg)``.
        """
        super().__init__()
        unknown = sorted(set(hydra_keys) - set(_HYDRA_KEYS))
        if unknown:
            raise TypeError(f"AVSLitModule got unexpected keyword arguments {unknown}")
        arguments = locals()
        net_cfg = {key: arguments[key] for key in NETWORK_KEYS}
        # plain values only, so that load_from_checkpoint / load_trained rebuild without Hydra
        self.save_hyperparameters({key: _plain(arguments[key]) for key in (*NETWORK_KEYS, *TRAINING_KEYS)})
        num_classes = int(num_classes)
        self.semantic = bool(num_classes > 1 if semantic is None else semantic)
        if self.semantic and num_classes + 1 != NUM_AVSS_CLASSES:
            raise ConfigError(
                f"model.num_classes={num_classes}: semantic (AVSS) training scores "
                f"{NUM_AVSS_CLASSES} classes, so num_classes must be {NUM_AVSS_CLASSES - 1}"
            )
        self.optim_cfg = _merged(_DEFAULT_OPTIM, _plain(optim), "optim")
        self.scheduler_cfg = _merged(_DEFAULT_SCHEDULER, _plain(scheduler), "scheduler")
        self.metric_cfg = _merged(_DEFAULT_METRIC, _plain(metric), "metric")
        problems = self.check_options({"scheduler": self.scheduler_cfg, "metric": self.metric_cfg})
        if problems:
            raise ConfigError(problems[0].line())
        for key in ("lr", "backbone_lr"):
            if not float(self.optim_cfg[key]) >= 0:
                raise ConfigError(f"model.optim.{key}={self.optim_cfg[key]}: must be >= 0")
        self.skip_nonfinite = bool(skip_nonfinite)

        # the source head exists only for the source loss (model.loss.weight_source, docs/MODEL.md)
        weight_source = (_plain(loss) or {}).get("weight_source", 0.0)
        self.net = build_qdformer(net_cfg, source_head=isinstance(weight_source, (int, float)) and weight_source > 0)
        compile_kwargs = compile_options(_plain(compile))
        if compile_kwargs is not None:
            compile_network(self.net, compile_kwargs)
        # the matcher is built from model.matcher by the criterion (`avseg.models.matcher.build_matcher`)
        self.criterion = SetCriterion.from_config(
            _plain(loss) or {}, num_classes=num_classes, semantic=self.semantic, matcher=_plain(matcher) or None
        )

        fpb = self.metric_cfg["frames_per_batch"]
        self.frames_per_batch = 20 if fpb is None else int(fpb)
        self.val_set_names: list[str] = ["val"]
        self.test_set_names: list[str] = ["test"]
        self.val_metrics = torch.nn.ModuleDict({"val": self._new_metric()})
        self.test_metrics = torch.nn.ModuleDict({"test": self._new_metric()})
        # filled by the hooks, read by callbacks / eval
        self.code_usage_epoch: Tensor | None = None
        self.nonfinite_skipped = 0
        self.last_test_metrics: dict[str, float] = {}
        self.checkpoint_source: str | None = None

    # ----------------------------------------------------------------------------------------
    # building blocks

    def _new_metric(self) -> BinaryAVSMetric | SemanticAVSMetric:
        return new_metric(semantic=self.semantic, frames_per_batch=self.frames_per_batch)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and int(data_classes) != int(self.hparams.get("num_classes", 1)):
            raise ConfigError(
                f"model.num_classes={self.hparams.get('num_classes', 1)} does not fit the data "
                f"(subset {getattr(datamodule, 'subset', '?')!r} has {data_classes} object classes): set "
                f"model.num_classes={data_classes}"
            )
        if self.metric_cfg["frames_per_batch"] is None:
            clips, frames = getattr(datamodule, "eval_batch_size", None), getattr(datamodule, "num_frames", None)
            if clips is not None and frames is not None:
                # the official protocol: one F-score batch = one evaluation batch of clips
                self.frames_per_batch = int(clips) * int(frames)
        self.configure_eval_sets(
            val=list(getattr(datamodule, "val_set_names", None) or ["val"]),
            test=list(getattr(datamodule, "test_set_names", None) or ["test"]),
        )

    def configure_eval_sets(self, *, val: list[str], test: list[str]) -> None:
        """One metric per validation / test data loader (the data module returns them in this order;
        it checks ``data.val_sets`` / ``data.test_sets``)."""
        self.val_set_names, self.test_set_names = list(val), list(test)
        self.val_metrics = torch.nn.ModuleDict({name: self._new_metric() for name in val}).to(self.device)
        self.test_metrics = torch.nn.ModuleDict({name: self._new_metric() for name in test}).to(self.device)

    def forward(self, frames: Tensor, audio: Tensor, frame_valid: Tensor | None = None) -> dict[str, Any]:
        return self.net(frames, audio, frame_valid)

    def infer(self, batch: Mapping[str, Any], size: tuple[int, int] | None = None) -> Tensor:
        """Evaluation-ready predictions of a batch at ``size`` (default: the masks' size if the batch
        has masks, else the frames'): binary logits [B, T, H, W] or semantic scores [B, T, 71, H, W],
        padded frames as background. The one predictor of every inference path (`avseg.inference`)."""
        return batch_scores(self.net, batch, semantic=self.semantic, size=size)

    def labels_from(self, predictions: Tensor) -> Tensor:
        """[B, T, H, W] long labels: 0/1 (sigmoid > 0.5) or the argmax class."""
        return scores_to_labels(predictions, semantic=self.semantic)

    # ----------------------------------------------------------------------------------------
    # training

    def _nonfinite_terms(self, terms: Mapping[str, Tensor]) -> list[str]:
        names = [name for name, value in terms.items() if name != "loss" and not bool(torch.isfinite(value).all())]
        if not names and not bool(torch.isfinite(terms["loss"]).all()):
            names = ["loss"]
        return names

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        outputs = self.net(batch["frames"], batch["audio"], batch["frame_valid"])
        terms = self.criterion(outputs, batch["masks"], batch["label_valid"])
        bad_terms = self._nonfinite_terms(terms)
        distributed = self.trainer.world_size > 1
        any_bad = (
            self.trainer.strategy.reduce_boolean_decision(bool(bad_terms), all=False)
            if distributed
            else bool(bad_terms)
        )
        if any_bad:
            where = f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
            if not self.skip_nonfinite:
                detail = (
                    ", ".join(f"{name}={float(terms[name].detach().float().mean())}" for name in bad_terms)
                    or "on another rank"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at {where}: {detail}. The last good checkpoint is untouched; "
                    "set skip_nonfinite=true to skip such batches instead"
                )
            self.nonfinite_skipped += 1
            self.log(
                "train/nonfinite_skipped",
                float(self.nonfinite_skipped),
                on_step=True,
                on_epoch=False,
                rank_zero_only=True,
            )
            if not distributed:
                return None  # Lightning skips the backward pass and the optimizer step
            # DDP needs every rank to run backward: a zero loss touching every trainable parameter
            # (the optimizer still steps with zero gradients).
            return sum(
                (p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device)
            )

        batch_size = int(batch["frames"].shape[0])
        loss = terms["loss"].detach()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=distributed)
        for name, value in terms.items():
            if name == "loss":
                continue
            term = name.removeprefix("loss_")
            self.log(f"train/{term}", value.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        quant = outputs.get("quant") or {}
        for key, name in (("perplexity", "codebook_perplexity"), ("dead_codes", "codebook_dead")):
            if key in quant:
                self.log(
                    f"train/{name}", quant[key].detach().float(), on_step=True, on_epoch=False, batch_size=batch_size
                )
        usage = quant.get("usage")
        if isinstance(usage, Tensor) and usage.numel() > 0:
            usage = usage.detach().float()
            self.code_usage_epoch = usage.clone() if self.code_usage_epoch is None else self.code_usage_epoch + usage
        return terms["loss"]

    def configure_optimizers(self) -> Any:
        backbone, rest = [], []
        for name, parameter in self.net.named_parameters():
            if not parameter.requires_grad:
                continue
            (backbone if name.startswith("backbone.") else rest).append(parameter)
        groups = [{"params": rest, "lr": float(self.optim_cfg["lr"]), "name": "main"}]
        if backbone:
            groups.append({"params": backbone, "lr": float(self.optim_cfg["backbone_lr"]), "name": "backbone"})
        optimizer = torch.optim.AdamW(
            groups,
            lr=float(self.optim_cfg["lr"]),
            weight_decay=float(self.optim_cfg["weight_decay"]),
            betas=tuple(float(b) for b in self.optim_cfg["betas"]),
            eps=float(self.optim_cfg["eps"]),
        )
        if self.scheduler_cfg["type"] == "none":
            return optimizer
        milestones = sorted(int(m) for m in self.scheduler_cfg["milestones"])
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=milestones, gamma=float(self.scheduler_cfg["gamma"])
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_cfg["interval"], "frequency": 1},
        }

    # ----------------------------------------------------------------------------------------
    # evaluation

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        predictions = self.infer(batch)
        update_metric(self.val_metrics[self._set_name(self.val_set_names, dataloader_idx)], predictions, batch)
        return {"pred_labels": self.labels_from(predictions)}

    @staticmethod
    def _set_name(names: list[str], dataloader_idx: int) -> str:
        if dataloader_idx >= len(names):
            raise ConfigError(f"data: evaluation data loader {dataloader_idx} has no name; the sets are {names}")
        return names[dataloader_idx]

    def _log_results(self, prefix: str, results: Mapping[str, Tensor]) -> dict[str, float]:
        logged = {}
        for name, value in results.items():
            key = f"{prefix}/{name}"
            # the metric has already gathered every rank's frames: no further reduction
            self.log(key, value.float(), sync_dist=False, rank_zero_only=False)
            logged[key] = float(value)
        return logged

    def _compute_sets(self, stage: str, names: list[str], metrics: torch.nn.ModuleDict) -> dict[str, float]:
        """Logs ``<stage>/<metric>`` for one set; for several, ``<stage>/<set>/<metric>`` and (val
        only, for checkpoint selection) ``val/<metric>`` = the mean over the sets."""
        logged: dict[str, float] = {}
        per_set: dict[str, list[Tensor]] = {}
        for name in names:
            results = metrics[name].compute()
            metrics[name].reset()
            prefix = stage if len(names) == 1 else f"{stage}/{name}"
            logged.update(self._log_results(prefix, results))
            for key, value in results.items():
                per_set.setdefault(key, []).append(value.float())
        if len(names) > 1 and stage == "val":
            mean = {key: torch.stack(values).mean() for key, values in per_set.items()}
            logged.update(self._log_results(stage, mean))
        return logged

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in self.val_metrics.values():
                metric.reset()
            return
        self._compute_sets("val", self.val_set_names, self.val_metrics)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        predictions = self.infer(batch)
        update_metric(self.test_metrics[self._set_name(self.test_set_names, dataloader_idx)], predictions, batch)
        return {"pred_labels": self.labels_from(predictions)}

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics = self._compute_sets("test", self.test_set_names, self.test_metrics)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per clip: ``pred_labels`` [B, T, H, W] long, ``probabilities`` (binary: foreground
        probability [B, T, H, W]; semantic: the class scores [B, T, 71, H, W]), plus the batch's
        ``video_id`` / ``index`` / ``frame_valid`` to name the outputs."""
        predictions = self.infer(batch)
        probabilities = predictions if self.semantic else predictions.sigmoid()
        return {
            "pred_labels": self.labels_from(predictions).cpu(),
            "probabilities": probabilities.float().cpu(),
            "video_id": list(batch.get("video_id", [])),
            "index": batch["index"].cpu() if "index" in batch else None,
            "frame_valid": batch["frame_valid"].cpu() if "frame_valid" in batch else None,
        }

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Like ``nn.Module.load_state_dict`` but a checkpoint from another model config is one clear
        `CheckpointError` (how many keys are missing / unexpected / of another shape, with examples)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
            for k in own
            if k in state_dict and isinstance(state_dict[k], Tensor) and state_dict[k].shape != own[k].shape
        ]
        if mismatched or (strict and (missing or unexpected)):
            groups = (
                ("missing keys", missing, ", "),
                ("unexpected keys", unexpected, ", "),
                ("keys of another shape", mismatched, "; "),
            )
            parts = [f"{len(keys)} {what} (e.g. {sep.join(keys[:3])})" for what, keys, sep in groups if keys]
            raise CheckpointError(
                self.checkpoint_source or "checkpoint",
                "its weights do not fit this model config (trained with another model config?): " + ", ".join(parts),
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def load_trained(cls, path: str | Path, map_location: Any = "cpu", **overrides: Any) -> AVSLitModule:
        """A trained module from a checkpoint, for evaluation / prediction: loads with
        ``weights_only=True`` and does not read pretrained-weight files again (the checkpoint holds
        every weight), so a checkpoint copied to another machine works. Errors name the file."""
        from avseg.lit.checkpoint_io import load_checkpoint_file

        checkpoint = load_checkpoint_file(path, map_location=map_location)
        for key in ("state_dict", "hyper_parameters"):
            if key not in checkpoint:
                raise CheckpointError(path, f"not an avseg training checkpoint: no {key!r} entry")
        hparams = dict(checkpoint["hyper_parameters"])
        hparams.update(overrides)
        for key, sub in (("backbone", "weights"), ("audio_encoder", "vggish_weights")):
            if isinstance(hparams.get(key), dict) and sub in hparams[key]:
                hparams[key] = {**hparams[key], sub: None, "random_init": True}
        hparams["init_from"] = None
        from hydra.errors import InstantiationException

        try:
            module = cls(**hparams)
        except (ConfigError, TypeError, ValueError, InstantiationException) as error:
            # InstantiationException: e.g. a key that only a newer avseg knows (an unexpected keyword)
            detail = " ".join(str(error).split())  # Hydra's message spans lines
            raise CheckpointError(path, f"its stored model config cannot be built: {detail}") from error
        module.checkpoint_source = str(path)
        module.load_state_dict(checkpoint["state_dict"])
        module.eval()
        return module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["avseg"] = {"nonfinite_skipped": int(self.nonfinite_skipped), "semantic": bool(self.semantic)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = int(checkpoint.get("avseg", {}).get("nonfinite_skipped", 0))
