"""Build a ``QDFormer`` from the plain ``model`` config (``model.init_from``: `avseg.models.init_from`).

``build_qdformer(model_cfg)`` reads these keys of the ``model`` config (other top-level keys, e.g.
the optimiser settings of the LightningModule, are ignored here):

- ``dim`` (model width C), ``num_classes`` (1 for AVS, 70 for AVSS), ``ms_deform_backend``
  (``auto | torch | triton``), ``aux_loss`` (default true), ``init_from`` (null or a path);
- sub-configs ``backbone``, ``audio_encoder``, ``decomposition``, ``fusion``, ``decoder``, each with a
  ``_target_`` and keyword arguments, instantiated with ``hydra.utils.instantiate``. The builder
  passes the shared sizes: ``dim`` to audio_encoder / decomposition, ``res2_channels`` (from the
  backbone) to fusion, ``num_classes`` and ``mask_dim`` (from fusion) to the decoder. A sub-config
  that sets one of these itself (or ``dim`` / ``ms_deform_backend`` in fusion and decoder,
  ``num_levels`` in the decoder) to a different value is a ConfigError (no silent override).
- the decomposition gets its codebook keys (``beta``, ``vq_loss_form``, ...: `QUANTIZER_KEYS`) as
  one `QuantizerOptions`, ``quantizer_options=`` (`QuantizerOptions.from_config`), see
  `build_decomposition`;
- fusion and decoder each get one `DeformableLayerSpec` (``spec=``) for their deformable layers:
  ``dim`` and ``ms_deform_backend`` from the model, ``num_heads`` (default 8), ``num_points`` (4),
  ``ffn_dim`` (fusion 1024, decoder 2048), ``dropout`` (0.1) from the part's own keys, and
  ``num_levels`` from ``model.fusion`` (default 4; the decoder reads the fusion's levels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from avseg.errors import AvsegError, ConfigError
from avseg.models.init_from import load_init_from
from avseg.models.layers.deformable import DeformableLayerSpec
from avseg.models.layers.source_head import SourceHead
from avseg.models.neck import MultiLevelProjection
from avseg.models.options import Problem, at_least, boolean, choice, is_int, present, raise_first
from avseg.models.qdformer import QDFormer
from avseg.models.quantizer import QUANTIZER_KEYS, QuantizerOptions

MS_DEFORM_BACKENDS = ("auto", "torch", "triton")
_DIM_ALLOWED = "a positive multiple of 32 (GroupNorm(32) layers)"
# the keys of model.fusion / model.decoder that go into their DeformableLayerSpec
_SPEC_KEYS = ("dim", "ms_deform_backend", "num_levels", "num_heads", "num_points", "ffn_dim", "dropout")
REQUIRED_KEYS = ("dim", "num_classes", "backbone", "audio_encoder", "decomposition", "fusion", "decoder")


def _plain(cfg: Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: (_plain(v) if isinstance(v, (Mapping, DictConfig)) else v) for k, v in cfg.items()}


def _check_target(name: str, sub: Any) -> None:
    if not isinstance(sub, Mapping) or "_target_" not in sub:
        raise ConfigError(f"model.{name}: expected a config with a `_target_`, got {sub!r}")


def _check_shared(name: str, sub: Mapping, shared: Mapping) -> None:
    for key, value in shared.items():
        if key in sub and sub[key] is not None and sub[key] != value:
            raise ConfigError(
                f"model.{name}.{key}: set to {sub[key]!r} but the model's shared value is {value!r}; "
                f"remove it from model.{name} (the builder passes it)"
            )


def _layer_spec(sub: Mapping, *, dim: int, backend: str, num_levels: int, ffn_dim: int) -> DeformableLayerSpec:
    """The `DeformableLayerSpec` of ``model.fusion`` / ``model.decoder`` (``ffn_dim``: the part's default)."""
    return DeformableLayerSpec(
        dim=dim,
        ffn_dim=sub.get("ffn_dim", ffn_dim),
        dropout=sub.get("dropout", 0.1),
        num_levels=num_levels,
        num_heads=sub.get("num_heads", 8),
        num_points=sub.get("num_points", 4),
        backend=backend,
    )


def _instantiate(
    name: str, sub: Mapping, shared: Mapping, *, parts: Mapping[str, object] | None = None, taken: Sequence[str] = ()
) -> object:
    """``sub`` built with the ``shared`` keywords (a key ``sub`` sets itself must agree); ``parts``:
    objects the builder made from ``sub``'s keys ``taken``, passed instead of those keys."""
    _check_shared(name, sub, shared)
    try:
        if parts is None:
            return hydra.utils.instantiate(dict(sub), **shared)
        rest = {key: value for key, value in sub.items() if key not in taken}
        return hydra.utils.instantiate(rest, _partial_=True)(**parts, **shared)
    except InstantiationException as exc:
        # surface the project's own errors (missing weights file, bad key) unwrapped
        if isinstance(exc.__cause__, AvsegError):
            raise exc.__cause__ from None
        raise


def _with_spec(name: str, sub: Mapping, shared: Mapping, spec: DeformableLayerSpec) -> object:
    """``model.fusion`` / ``model.decoder`` built with ``spec=`` in place of the keys it holds."""
    _check_shared(name, sub, {"dim": spec.dim, "ms_deform_backend": spec.backend, "num_levels": spec.num_levels})
    return _instantiate(name, sub, shared, parts={"spec": spec}, taken=_SPEC_KEYS)


def build_decomposition(sub: Mapping, *, dim: int) -> nn.Module:
    """``model.decomposition`` (with its ``_target_``) -> the decomposition of model width ``dim``;
    its codebook keys (`QUANTIZER_KEYS`) become one `QuantizerOptions`, ``quantizer_options=``
    (`QuantizerOptions.from_config`)."""
    _check_target("decomposition", sub)
    options = QuantizerOptions.from_config(sub, prefix="model.decomposition.")
    parts = {"quantizer_options": options}
    return _instantiate("decomposition", sub, {"dim": dim}, parts=parts, taken=QUANTIZER_KEYS)


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
    for name in REQUIRED_KEYS[2:]:
        _check_target(name, cfg[name])
    dim = int(cfg["dim"])
    num_classes = int(cfg["num_classes"])
    backend = cfg.get("ms_deform_backend", "auto")

    backbone = _instantiate("backbone", cfg["backbone"], {})
    audio_encoder = _instantiate("audio_encoder", cfg["audio_encoder"], {"dim": dim})
    decomposition = build_decomposition(cfg["decomposition"], dim=dim)
    neck = MultiLevelProjection(in_channels=backbone.out_channels[1:], dim=dim)
    spec = partial(_layer_spec, dim=dim, backend=backend, num_levels=cfg["fusion"].get("num_levels", 4))
    fusion = _with_spec(
        "fusion", cfg["fusion"], {"res2_channels": backbone.out_channels[0]}, spec(cfg["fusion"], ffn_dim=1024)
    )
    decoder = _with_spec(
        "decoder",
        cfg["decoder"],
        {"num_classes": num_classes, "mask_dim": fusion.mask_dim},
        spec(cfg["decoder"], ffn_dim=2048),
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


__all__ = ["build_qdformer", "build_decomposition", "check_model_options", "load_init_from", "MS_DEFORM_BACKENDS"]
