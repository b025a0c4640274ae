"""Build a ``QDFormer`` from the plain ``model`` config; ``model.init_from`` checkpoint import.

``build_qdformer(model_cfg)`` reads these keys of the ``model`` config (other top-level keys, e.g.
the optimiser settings of the LightningModule, are ignored here):

- ``dim`` (model width C), ``num_classes`` (1 for AVS, 70 for AVSS), ``ms_deform_backend``
  (``auto | torch | triton``), ``aux_loss`` (default true), ``init_from`` (null or a path);
- sub-configs ``backbone``, ``audio_encoder``, ``decomposition``, ``fusion``, ``decoder``, each with a
  ``_target_`` and keyword arguments, instantiated with ``hydra.utils.instantiate``. The builder
  passes the shared sizes: ``dim`` to audio_encoder / decomposition / fusion / decoder,
  ``res2_channels`` (from the backbone) and ``ms_deform_backend`` to fusion, ``num_classes``,
  ``mask_dim`` (from fusion), ``num_levels`` and ``ms_deform_backend`` to the decoder. A sub-config
  that sets one of these itself to a different value is a ConfigError (no silent override).
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import hydra.utils
from hydra.errors import InstantiationException
import torch
from omegaconf import DictConfig, OmegaConf

from avseg.errors import AvsegError, CheckpointError, ConfigError
from avseg.models.neck import MultiLevelProjection
from avseg.models.qdformer import QDFormer

REQUIRED_KEYS = ("dim", "num_classes", "backbone", "audio_encoder", "decomposition", "fusion", "decoder")


def _plain(cfg: Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: (_plain(v) if isinstance(v, (Mapping, DictConfig)) else v) for k, v in cfg.items()}


def _instantiate(name: str, sub: Mapping, shared: Mapping) -> object:
    if not isinstance(sub, Mapping) or "_target_" not in sub:
        raise ConfigError(f"model.{name}: expected a config with a `_target_`, got {sub!r}")
    for key, value in shared.items():
        if key in sub and sub[key] is not None and sub[key] != value:
            raise ConfigError(
                f"model.{name}.{key}: set to {sub[key]!r} but the model's shared value is {value!r}; "
                f"remove it from model.{name} (the builder passes it)"
            )
    try:
        return hydra.utils.instantiate(dict(sub), **shared)
    except InstantiationException as exc:
        # surface the project's own errors (missing weights file, bad key) unwrapped
        if isinstance(exc.__cause__, AvsegError):
            raise exc.__cause__ from None
        raise


def build_qdformer(model_cfg: Mapping) -> QDFormer:
    """``model`` config (plain dict or DictConfig) -> ``QDFormer`` (see the module docstring)."""
    cfg = _plain(model_cfg)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"model: missing keys {missing} (need {list(REQUIRED_KEYS)})")
    dim = int(cfg["dim"])
    num_classes = int(cfg["num_classes"])
    if dim <= 0 or dim % 32 != 0:
        raise ConfigError(f"model.dim: {dim} must be a positive multiple of 32 (GroupNorm(32) layers)")
    if num_classes < 1:
        raise ConfigError(f"model.num_classes: {num_classes} must be >= 1")
    backend = cfg.get("ms_deform_backend", "auto")
    if backend not in ("auto", "torch", "triton"):
        raise ConfigError(f"model.ms_deform_backend: {backend!r} is not one of auto | torch | triton")

    backbone = _instantiate("backbone", cfg["backbone"], {})
    audio_encoder = _instantiate("audio_encoder", cfg["audio_encoder"], {"dim": dim})
    decomposition = _instantiate("decomposition", cfg["decomposition"], {"dim": dim})
    neck = MultiLevelProjection(in_channels=backbone.out_channels[1:], dim=dim)
    fusion = _instantiate(
        "fusion",
        cfg["fusion"],
        {"dim": dim, "res2_channels": backbone.out_channels[0], "ms_deform_backend": backend},
    )
    decoder = _instantiate(
        "decoder",
        cfg["decoder"],
        {
            "dim": dim,
            "num_classes": num_classes,
            "mask_dim": fusion.mask_dim,
            "num_levels": 4,
            "ms_deform_backend": backend,
        },
    )
    net = QDFormer(
        backbone=backbone,
        audio_encoder=audio_encoder,
        decomposition=decomposition,
        neck=neck,
        fusion=fusion,
        decoder=decoder,
        num_classes=num_classes,
        aux_loss=bool(cfg.get("aux_loss", True)),
    )
    if cfg.get("init_from"):
        load_init_from(net, cfg["init_from"])
    return net


# --------------------------------------------------------------------------------------------
# model.init_from: ReferFormer-family checkpoints (r50_pretrained.pth: backbone + deformable
# transformer). Key mapping table: checkpoint regex -> this model's key template.
REFERFORMER_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^backbone\.0\.body\.(.+)$", r"backbone.body.\1"),
    (r"^input_proj\.(\d+)\.(.+)$", r"neck.proj.\1.\2"),
    (r"^transformer\.level_embed$", r"fusion.encoder.level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.(.+)$", r"fusion.encoder.layers.\1.\2"),
    (r"^transformer\.decoder\.layers\.(\d+)\.(.+)$", r"decoder.layers.\1.\2"),
    (r"^transformer\.reference_points\.(.+)$", r"decoder.reference_points.\1"),
)

# Checkpoint keys that are expected to have no counterpart here (text branch, heads sized for
# another task, ReferFormer's own pixel decoder); anything else unmapped is an error.
REFERFORMER_ALLOWED_UNEXPECTED: tuple[str, ...] = (
    r"^text_encoder\.",
    r"^resizer\.",
    r"^fusion_module\.",
    r"^text_pos\.",
    r"^pixel_decoder\.",
    r"^controller\.",
    r"^class_embed\.",
    r"^bbox_embed\.",
    r"^query_embed\.",
    r"^transformer\.decoder\.(class_embed|bbox_embed)\.",
    r"^backbone\.0\.body\.fc\.",
    r"\.num_batches_tracked$",
)

# Keys of this model that a ReferFormer checkpoint does not provide (left at their init):
# the audio branch, the audio-visual fusion parts, the FPN and the heads.
REFERFORMER_ALLOWED_MISSING: tuple[str, ...] = (
    r"^audio_encoder\.",
    r"^decomposition\.",
    r"^fusion\.(early_fusion|dual|out16|out8|reduce8|lateral4|out4|mask_proj)\.",
    r"^decoder\.(query_pos|extra_content|class_embed|bbox_embed|mask_head)\.",
    r"\.num_batches_tracked$",
)

_LAYER_KEY = re.compile(r"^(fusion\.encoder|decoder)\.layers\.(\d+)\.")


@dataclass
class InitReport:
    """What ``load_init_from`` did: checkpoint keys loaded (as model keys), checkpoint keys skipped
    (allowed-unexpected or layers beyond this model's depth), model keys left at their init."""

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def grouped(keys: list[str]) -> str:
            groups = Counter(".".join(k.split(".")[:-1][:3]) or k for k in keys)  # module path, 3 levels deep
            return "\n".join(f"    {name}.* ({count})" for name, count in sorted(groups.items()))

        return (
            f"init_from {self.path}\n"
            f"  loaded: {len(self.loaded)} tensors\n{grouped(self.loaded)}\n"
            f"  skipped (in checkpoint, not used): {len(self.skipped)}\n{grouped(self.skipped)}\n"
            f"  left at init (not in checkpoint): {len(self.left_at_init)}\n{grouped(self.left_at_init)}"
        )


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(path, "init_from checkpoint does not exist")
    try:
        # ReferFormer checkpoints may carry their argparse.Namespace `args`: a plain attribute bag.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise CheckpointError(path, f"cannot be read as a weights-only torch file: {exc}") from exc
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "expected a state dict, or a dict with the state dict under `model`")
    return dict(state)


def _map_key(key: str) -> str | None:
    for pattern, template in REFERFORMER_KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, template, key)
    return None


def load_init_from(net: QDFormer, path: str | os.PathLike, *, verbose: bool = True) -> InitReport:
    """Initialise ``net`` from a ReferFormer-family checkpoint via ``REFERFORMER_KEY_MAP``.

    Errors (``CheckpointError`` naming the file and the keys): a checkpoint key that maps nowhere
    and is not in ``REFERFORMER_ALLOWED_UNEXPECTED``; a mapped key absent from this model (other
    than layers beyond this model's depth); a shape mismatch; a model key not provided by the
    checkpoint and not in ``REFERFORMER_ALLOWED_MISSING``. Prints and returns an ``InitReport``.
    """
    path = os.fspath(path)
    state = _read_checkpoint(path)
    own = net.state_dict()
    depth = {"fusion.encoder": len(net.fusion.encoder.layers), "decoder": len(net.decoder.layers)}
    report = InitReport(path=path)
    to_load: dict[str, torch.Tensor] = {}
    unknown, absent, wrong_shape = [], [], []
    for key, value in state.items():
        if any(re.search(p, key) for p in REFERFORMER_ALLOWED_UNEXPECTED):
            report.skipped.append(key)
            continue
        target = _map_key(key)
        if target is None:
            unknown.append(key)
            continue
        if target not in own:
            layer = _LAYER_KEY.match(target)
            if layer and int(layer.group(2)) >= depth[layer.group(1)]:
                report.skipped.append(key)
            elif target.endswith("num_batches_tracked"):
                report.skipped.append(key)
            else:
                absent.append(f"{key} -> {target}")
            continue
        if own[target].shape != value.shape:
            wrong_shape.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
            continue
        to_load[target] = value
    not_provided = [k for k in own if k not in to_load]
    disallowed_missing = [k for k in not_provided if not any(re.search(p, k) for p in REFERFORMER_ALLOWED_MISSING)]
    problems = []
    if unknown:
        problems.append(f"unexpected checkpoint keys (not in the mapping or the allow-list): {sorted(unknown)}")
    if absent:
        problems.append(f"mapped keys this model does not have: {sorted(absent)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {sorted(wrong_shape)}")
    if disallowed_missing:
        problems.append(f"model keys the checkpoint does not provide: {sorted(disallowed_missing)}")
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    net.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.left_at_init = sorted(not_provided)
    if verbose:
        print(report.summary())
    return report
