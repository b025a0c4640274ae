"""Build a ``QDFormer`` from the plain ``model`` config (``model.init_from``: `avseg.models.init_from`).

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

from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from avseg.errors import AvsegError, ConfigError
from avseg.models.init_from import load_init_from
from avseg.models.layers.source_head import SourceHead
from avseg.models.neck import MultiLevelProjection
from avseg.models.options import Problem, at_least, boolean, choice, is_int, present, raise_first
from avseg.models.qdformer import QDFormer

MS_DEFORM_BACKENDS = ("auto", "torch", "triton")
_DIM_ALLOWED = "a positive multiple of 32 (GroupNorm(32) layers)"
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


def check_model_options(options: Mapping[str, Any]) -> list[Problem]:
    """The problems of the ``model`` keys the builder reads itself that ``options`` holds."""
    checks = {
        "dim": lambda key, value: (
            None if is_int(value) and value > 0 and value % 32 == 0 else Problem(key, value, _DIM_ALLOWED)
        ),
        "num_classes": at_least(1),
        "ms_deform_backend": choice(MS_DEFORM_BACKENDS),
        "aux_loss": boolean,
    }
    return present(options, checks, "model.")


def build_qdformer(model_cfg: Mapping, *, source_head: bool = False) -> QDFormer:
    """``model`` config (plain dict or DictConfig) -> ``QDFormer`` (see the module docstring).

    ``source_head``: add the sub-space source head (`SourceHead`, ``num_classes`` + 1 outputs); the
    LightningModule asks for it when ``model.loss.weight_source`` > 0."""
    cfg = _plain(model_cfg)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"model: missing keys {missing} (need {list(REQUIRED_KEYS)})")
    raise_first(check_model_options(cfg))
    dim = int(cfg["dim"])
    num_classes = int(cfg["num_classes"])
    backend = cfg.get("ms_deform_backend", "auto")

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
        source_head=SourceHead(dim=dim, num_classes=num_classes) if source_head else None,
    )
    if cfg.get("init_from"):
        load_init_from(net, cfg["init_from"])
    return net


__all__ = ["build_qdformer", "check_model_options", "load_init_from", "MS_DEFORM_BACKENDS"]
