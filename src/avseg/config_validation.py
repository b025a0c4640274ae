"""Start-up validation of a composed Hydra config, before any data or weights file is read.

``validate_config(cfg)`` checks every section the config has (``model``, ``data``, ``trainer``,
``callbacks``, and the top-level keys of ``train.yaml`` / ``eval.yaml``), collects EVERY violation
(one line each, naming the full key, the value given and the allowed values) and raises one
`avseg.errors.ConfigError` listing them all, so a typo costs one restart, not one per key.
``config_problems(cfg)`` returns the same lines without raising.

What is checked (docs/RELIABILITY.md has the table):

- ``model.decomposition``, ``model.fusion``, ``model.decoder``, ``model.loss``: the allowed values
  each component states once, in its ``check_options`` classmethod (`avseg.models.options`; the
  section's ``_target_`` class, or the default one), which its constructor runs too; ``model.dim``,
  ``ms_deform_backend``, ``aux_loss``: `avseg.models.build.check_model_options`.
- ``model`` across sections: ``num_classes`` 1 for the binary subsets (s4, ms3, avs) and 70 for
  avss (71 classes with background, which has no logit); ``loss.weight_similarity`` > 0 needs
  ``fusion.audio_similarity_dim`` > 0; ``loss.weight_source`` > 0 needs avss (per-source class
  labels); files named by ``init_from``, ``backbone.weights`` and
  ``audio_encoder.vggish_weights`` exist (the latter only when the encoder reads log-mel and is
  not randomly initialised); ``metric.frames_per_batch`` null or a positive multiple of the clip
  length T (5 for s4 / ms3 / avs, 10 for avss).
- ``data``: ``subset`` in s4 | ms3 | avss | avs and equal to the experiment's ``expected_subset``;
  real data (``synth`` null): ``root`` (``roots.s4`` / ``roots.ms3`` for avs) an existing folder
  holding its metadata CSV; ``audio_source`` / ``mask_source`` values, ``embeddings_dir`` existing
  when embeddings are read; ``pkl`` on SynthAVS needs ``synth.write_pkl``; sizes and counts.
- ``trainer``: ``accelerator`` (Lightning's registry + auto / gpu), ``devices``, ``num_nodes``,
  ``strategy`` (a registered name or a ``_target_`` naming a Lightning Strategy; the nccl backend
  needs GPUs), ``precision`` (Lightning's accepted values), ``max_epochs`` / ``min_epochs`` /
  ``max_steps`` (not both unlimited; min <= max), clipping, accumulation, logging interval,
  ``limit_*_batches``, ``deterministic``.
- top level: ``seed`` an int, ``skip_nonfinite`` a bool, ``ckpt_path`` null, an existing file (or, training, ``auto``),
  ``callbacks.checkpoint.every_n_train_steps`` an int >= 0; eval's ``split``, ``perturb``,
  ``perturb_snr_db``, ``device``, ``batch_size``.

Unknown keys are left to the components that own them (they report them with their own
`ConfigError`); this module adds the cross-section checks and the ones that must come before any
data is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avseg.data.layout import LAYOUTS, SPLITS, SUBSET_MEMBERS
from avseg.data.perturb import PERTURBATIONS
from avseg.errors import ConfigError
from avseg.models.build import check_model_options
from avseg.models.options import Problem, boolean, int_at_least, is_int, is_number, number_in, one_of

__all__ = ["validate_config", "config_problems", "SUBSETS", "CLIP_LENGTH", "OBJECT_CLASSES", "METADATA_CSV"]

# The subsets a data config names (avseg.data.layout), each with the layout of its first tree.
_SUBSET_LAYOUTS = {name: LAYOUTS[members[0]] for name, members in SUBSET_MEMBERS.items()}
SUBSETS = tuple(_SUBSET_LAYOUTS)
# frames per clip (T) and object classes of the class head (no background logit) per subset
CLIP_LENGTH = {name: layout.num_frames for name, layout in _SUBSET_LAYOUTS.items()}
OBJECT_CLASSES = {name: layout.object_classes for name, layout in _SUBSET_LAYOUTS.items()}
METADATA_CSV = {name: layout.metadata_csv for name, layout in LAYOUTS.items()}
AUDIO_SOURCES = {
    name: ("wav", "pkl", "embeddings") if layout.has_pkl else ("wav", "embeddings")
    for name, layout in _SUBSET_LAYOUTS.items()
}
MASK_SOURCES = ("rgb", "semantic")
# the model sections whose component states its allowed values (``check_options``): default class
_COMPONENTS = {
    "model.audio_encoder": "avseg.models.audio.AudioEncoder",
    "model.decomposition": "avseg.models.decomposition.AudioDecomposition",
    "model.fusion": "avseg.models.fusion.AudioVisualFusion",
    "model.decoder": "avseg.models.decoder.SemanticGuidedDecoder",
    "model.loss": "avseg.models.criterion.SetCriterion",
    "data": "avseg.lit.datamodule.AVSDataModule",
    "model": "avseg.lit.module.AVSLitModule",
}
GRADIENT_CLIP_ALGORITHMS = ("norm", "value")

_ABSENT = object()  # a key the config does not have (as opposed to a key set to null)


class _Reader:
    """Reads keys of a composed config, recording unresolvable or missing values as problems."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.problems: list[str] = []

    def get(self, key: str, default: Any = _ABSENT) -> Any:
        """The resolved value (plain Python containers), ``default`` when absent (a required ``???``
        recorded as a problem); ``_ABSENT`` (with a problem recorded) when it cannot be resolved."""
        try:
            if OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_missing=False) is _ABSENT:
                if self._is_missing(key):
                    self.problems.append(f"{key}: required, but not set (???); give {key}=...")
                return default
            value = OmegaConf.select(self.cfg, key, throw_on_resolution_failure=True)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as error:
            first_line = str(error).strip().splitlines()[0]
            self.problems.append(f"{key}: cannot be resolved ({first_line})")
            return _ABSENT
        return value

    def has(self, key: str) -> bool:
        return OmegaConf.select(
            self.cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False
        ) is not _ABSENT or self._is_missing(key)

    def _is_missing(self, key: str) -> bool:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(self.cfg, parent, throw_on_resolution_failure=False) if parent else self.cfg
        return isinstance(node, DictConfig) and leaf in node.keys() and OmegaConf.is_missing(node, leaf)

    def add(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(f"{key}={value!r}: allowed: {allowed}")


# ---------------------------------------------------------------------------------------------
# value predicates


def _report(r: _Reader, problem: Problem | None) -> bool:
    if problem is not None:
        r.problems.append(problem.line())
    return problem is None


def _int_at_least(r: _Reader, key: str, value: Any, low: int, *, nullable: bool = False, note: str = "") -> bool:
    return value is _ABSENT or _report(r, int_at_least(key, value, low, nullable=nullable, note=note))


def _number_in(
    r: _Reader, key: str, value: Any, check: Callable[[float], bool], allowed: str, *, nullable: bool = False
) -> None:
    if value is not _ABSENT:
        _report(r, number_in(key, value, check, allowed, nullable=nullable))


def _one_of(r: _Reader, key: str, value: Any, allowed: Sequence[Any]) -> bool:
    return value is _ABSENT or _report(r, one_of(key, value, allowed))


def _bool(r: _Reader, key: str, value: Any) -> None:
    if value is not _ABSENT:
        _report(r, boolean(key, value))


def _expand(path: Any) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(path))))


def _existing_file(r: _Reader, key: str, value: Any, what: str) -> None:
    if value is _ABSENT or value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not _expand(value).is_file():
        r.problems.append(f"{key}={value!r}: no such file; allowed: null or the path of an existing {what}")


# ---------------------------------------------------------------------------------------------
# sections


def _subset(r: _Reader) -> str | None:
    """``data.subset`` when it is one (the data module's check reports it otherwise)."""
    subset = r.get("data.subset")
    return subset if subset in SUBSETS and isinstance(subset, str) else None


def _options(r: _Reader, key: str) -> dict[str, Any]:
    """The keys of the section ``key``, each resolved on its own (unresolvable ones reported)."""
    node = OmegaConf.select(r.cfg, key, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig):
        return {}
    options = {name: r.get(f"{key}.{name}") for name in node.keys()}
    return {name: value for name, value in options.items() if value is not _ABSENT}


def _check_component(r: _Reader, key: str, **shared: Any) -> None:
    """The component's own ``check_options`` on the section ``key`` (its ``_target_``, or the
    default class of `_COMPONENTS`); a target that does not import is left to the builder."""
    options = _options(r, key)
    check = _component_check(options.pop("_target_", _COMPONENTS[key]))
    r.problems.extend(problem.line() for problem in check(options, **shared))


def _component_check(target: Any) -> Callable[..., list[Problem]]:
    """The ``check_options`` of the class ``target`` names (a `_COMPONENTS` key: its default
    class); no check when it has none or does not import (left to the builder)."""
    try:
        from hydra.utils import get_class

        check = getattr(get_class(str(_COMPONENTS.get(target, target))), "check_options", None)
    except Exception:  # noqa: BLE001 - hydra wraps import failures in several types; the builder names them
        check = None
    return check if check is not None else lambda options, **shared: []


def _check_model(r: _Reader, subset: str | None) -> None:
    if not r.has("model"):
        return
    model = {name: r.get(f"model.{name}") for name in ("dim", "ms_deform_backend", "aux_loss")}
    problems = check_model_options({name: value for name, value in model.items() if value is not _ABSENT})
    r.problems.extend(problem.line() for problem in problems)
    dim = model["dim"]
    dim_ok = not any(problem.key == "model.dim" for problem in problems) and dim is not _ABSENT
    for key in _COMPONENTS:
        if key.startswith("model.") and r.has(key):
            _check_component(r, key, **({"dim": dim if dim_ok else None} if key == "model.decomposition" else {}))

    num_classes = r.get("model.num_classes")
    if num_classes is not _ABSENT:
        if subset is not None:
            expected = OBJECT_CLASSES[subset]
            if num_classes != expected or isinstance(num_classes, bool):
                task = "semantic (71 classes, background has no logit)" if subset == "avss" else "binary"
                r.add("model.num_classes", num_classes, f"{expected} for data.subset={subset} ({task})")
        elif num_classes not in (1, 70) or isinstance(num_classes, bool):
            r.add("model.num_classes", num_classes, "1 (binary: s4, ms3, avs) | 70 (semantic: avss)")

    similarity = r.get("model.fusion.audio_similarity_dim", 0)
    weight_similarity = r.get("model.loss.weight_similarity")
    if is_number(weight_similarity) and weight_similarity > 0 and not (is_int(similarity) and similarity > 0):
        r.add(
            "model.loss.weight_similarity",
            weight_similarity,
            "0 unless model.fusion.audio_similarity_dim > 0 (the loss supervises that similarity map)",
        )
    weight_source = r.get("model.loss.weight_source")
    if is_number(weight_source) and weight_source > 0 and subset is not None and subset != "avss":
        r.add(
            "model.loss.weight_source",
            weight_source,
            f"0 for data.subset={subset} (binary masks name no source classes; the source loss needs avss labels)",
        )
    _existing_file(r, "model.init_from", r.get("model.init_from"), "checkpoint (the ReferFormer-family weights)")

    if r.has("model.backbone"):
        weights = r.get("model.backbone.weights")
        random_init = r.get("model.backbone.random_init", False)
        _bool(r, "model.backbone.random_init", random_init)
        _existing_file(r, "model.backbone.weights", weights, "backbone state dict (nothing is downloaded)")
        if weights is None and random_init is False:
            r.problems.append(
                "model.backbone.weights=None: allowed: the path of a local state dict, or set "
                "model.backbone.random_init=true to train from scratch"
            )
    if r.has("model.audio_encoder"):
        audio_input = r.get("model.audio_encoder.input")
        random_init = r.get("model.audio_encoder.random_init", False)
        weights = r.get("model.audio_encoder.vggish_weights")
        if audio_input == "log_mel":
            _existing_file(r, "model.audio_encoder.vggish_weights", weights, "torchvggish state dict (vggish.pth)")
            if weights is None and random_init is False:
                r.problems.append(
                    "model.audio_encoder.vggish_weights=None: allowed: the path of a torchvggish state dict, "
                    "or model.audio_encoder.random_init=true"
                )
        audio_source = r.get("data.audio_source")
        if audio_input == "embeddings" and audio_source not in (_ABSENT, "embeddings"):
            r.add("data.audio_source", audio_source, "embeddings (model.audio_encoder.input=embeddings)")
        if audio_input == "log_mel" and audio_source == "embeddings":
            r.add("data.audio_source", audio_source, "wav | pkl (model.audio_encoder.input=log_mel)")

    # the module's own checks (scheduler, metric), then frames_per_batch against the clip length
    own = {name: r.get(f"model.{name}", None) for name in ("scheduler", "metric")}
    own_problems = _component_check(r.get("model._target_", "model"))(own)
    r.problems.extend(problem.line() for problem in own_problems)
    fpb, frames = (own["metric"] or {}).get("frames_per_batch"), CLIP_LENGTH.get(subset) if subset else None
    if not own_problems and is_int(fpb) and frames and fpb % frames:
        allowed = f"null (eval batch x T) or a positive multiple of the clip length T={frames}"
        r.add("model.metric.frames_per_batch", fpb, allowed)


def _check_data_root(r: _Reader, key: str, root: Any, subset: str) -> None:
    if root is None:
        r.problems.append(
            f"{key}=None: allowed: the folder holding {METADATA_CSV[subset]} (real data), or a data=synth_* config"
        )
        return
    if not isinstance(root, (str, os.PathLike)):
        r.add(key, root, f"the path of the folder holding {METADATA_CSV[subset]}")
        return
    folder = _expand(root)
    if not folder.is_dir():
        r.problems.append(
            f"{key}={str(root)!r}: no such folder; allowed: the folder holding {METADATA_CSV[subset]} "
            "(set AVSEG_DATA or data.root; docs/DATA.md)"
        )
    elif not (folder / METADATA_CSV[subset]).is_file():
        r.problems.append(
            f"{key}={str(root)!r}: has no {METADATA_CSV[subset]}; allowed: the folder holding it (docs/DATA.md)"
        )


def _check_data(r: _Reader, subset: str | None) -> None:
    if not r.has("data"):
        return
    expected = r.get("expected_subset", None)
    if expected not in (_ABSENT, None) and subset is not None and subset != expected:
        r.problems.append(
            f"data.subset={subset!r}: this experiment expects data.subset={expected}; "
            f"allowed: data={expected} (or one of its variants), or another experiment"
        )
    synth = r.get("data.synth", None)
    root = r.get("data.root", None)
    roots = r.get("data.roots", None)
    if synth not in (_ABSENT, None):
        if isinstance(synth, Mapping):
            _int_at_least(r, "data.synth.image_size", synth.get("image_size", _ABSENT), 8)
            _int_at_least(r, "data.synth.num_classes", synth.get("num_classes", _ABSENT), 1)
            clips = synth.get("clips_per_split", _ABSENT)
            if clips is not _ABSENT and not (
                isinstance(clips, Mapping) and all(is_int(v) and v >= 1 for v in clips.values())
            ):
                r.add("data.synth.clips_per_split", clips, "a mapping train/val/test -> an integer >= 1")
        pkl_allowed = subset is not None and "pkl" in AUDIO_SOURCES[subset]
        if (
            pkl_allowed
            and r.get("data.audio_source", None) == "pkl"
            and isinstance(synth, Mapping)
            and not synth.get("write_pkl", False)
        ):
            r.add(
                "data.audio_source",
                "pkl",
                "wav | embeddings, or set data.synth.write_pkl=true (SynthAVS writes no .pkl otherwise)",
            )
    elif subset is not None:  # the named roots exist (which ones the subset needs: the data module's check)
        members = SUBSET_MEMBERS[subset]
        if len(members) == 1:
            named = {"data.root": (root, subset)} if root not in (_ABSENT, None) else {}
        else:
            complete = isinstance(roots, Mapping) and set(roots) == set(members)
            named = {f"data.roots.{m}": (roots[m], m) for m in members} if complete else {}
        for key, (folder, member) in named.items():
            _check_data_root(r, key, folder, member)

    if subset is not None:
        audio_source = r.get("data.audio_source")
        _one_of(r, "data.audio_source", audio_source, AUDIO_SOURCES[subset])
        embeddings_dir = r.get("data.embeddings_dir", None)
        if audio_source == "embeddings":
            if embeddings_dir in (_ABSENT, None):
                r.problems.append(
                    "data.embeddings_dir=None: allowed: the folder of precomputed .npy embeddings "
                    "(data.audio_source=embeddings)"
                )
            elif not _expand(embeddings_dir).is_dir():
                r.problems.append(
                    f"data.embeddings_dir={str(embeddings_dir)!r}: no such folder; allowed: the folder of precomputed "
                    ".npy embeddings"
                )
    _one_of(r, "data.mask_source", r.get("data.mask_source"), MASK_SOURCES)
    _int_at_least(r, "data.image_size", r.get("data.image_size"), 8)
    # the data module's own checks (subset, root / roots / synth, sizes, repeats)
    keys = ("subset", "batch_size", "eval_batch_size", "num_workers", "repeats")
    own = {name: r.get(f"data.{name}") for name in keys} | {"root": root, "roots": roots, "synth": synth}
    own = {name: value for name, value in own.items() if value is not _ABSENT}
    r.problems.extend(problem.line() for problem in _component_check(r.get("data._target_", "data"))(own))
    if r.get("data.num_workers", 0) == 0 and r.get("data.persistent_workers", False) is True:
        r.add("data.persistent_workers", True, "false when data.num_workers=0 (there are no workers to keep)")
    if r.get("data.num_workers", 0) == 0 and r.get("data.prefetch_factor", None) not in (None, _ABSENT):
        r.add("data.prefetch_factor", r.get("data.prefetch_factor"), "null when data.num_workers=0")


_EXTRA_ACCELERATORS = ("auto", "gpu")
_EXTRA_STRATEGIES = ("auto",)


def _lightning_names() -> tuple[tuple[str, ...], tuple[str, ...], tuple[Any, ...]]:
    """(accelerators, strategies, precisions) that the installed Lightning accepts."""
    from typing import get_args

    import lightning.fabric.connector as connector
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerators = _EXTRA_ACCELERATORS + tuple(sorted(AcceleratorRegistry.available_accelerators()))
    strategies = _EXTRA_STRATEGIES + tuple(StrategyRegistry.available_strategies())
    precisions = (
        get_args(connector._PRECISION_INPUT_STR)
        + get_args(connector._PRECISION_INPUT_STR_ALIAS)
        + get_args(connector._PRECISION_INPUT_INT)
    )
    return accelerators, strategies, precisions


def _valid_devices(value: Any) -> bool:
    if is_int(value):
        return value >= 1 or value == -1
    if isinstance(value, str):
        text = value.strip()
        if text in ("auto", "-1"):
            return True
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return (
            bool(parts)
            and all(p.isdigit() for p in parts)
            and (len(parts) > 1 or text.endswith(",") or int(parts[0]) >= 1)
        )
    if isinstance(value, list):
        return bool(value) and all(is_int(v) and v >= 0 for v in value) and len(set(value)) == len(value)
    return False


def _limit_batches(r: _Reader, key: str, value: Any) -> None:
    if value is _ABSENT or value is None:
        return
    if is_int(value) and value >= 0:
        return
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return
    r.add(key, value, "null, an integer >= 0 (batches) or a float in [0, 1] (fraction)")


def _check_trainer(r: _Reader) -> None:
    if not r.has("trainer"):
        return
    accelerators, strategies, precisions = _lightning_names()
    accelerator = r.get("trainer.accelerator")
    _one_of(r, "trainer.accelerator", accelerator, accelerators)
    devices = r.get("trainer.devices")
    if devices is not _ABSENT and not _valid_devices(devices):
        r.add("trainer.devices", devices, "auto | -1 (all) | an integer >= 1 | a list of device indices | '0,1'")
    _int_at_least(r, "trainer.num_nodes", r.get("trainer.num_nodes"), 1)

    strategy = r.get("trainer.strategy")
    if strategy is not _ABSENT:
        if isinstance(strategy, str):
            _one_of(r, "trainer.strategy", strategy, strategies)
        elif isinstance(strategy, Mapping) and "_target_" in strategy:
            _check_strategy_target(r, strategy, accelerator)
        else:
            r.add(
                "trainer.strategy",
                strategy,
                f"a Lightning strategy name ({' | '.join(strategies[:6])} | ...) or a mapping with _target_",
            )

    precision = r.get("trainer.precision")
    if precision is not _ABSENT and (precision not in precisions or isinstance(precision, bool)):
        r.add("trainer.precision", precision, " | ".join(str(p) for p in precisions))
    elif accelerator == "cpu" and precision in (
        "16-mixed",
        "16",
        16,
        "transformer-engine",
        "transformer-engine-float16",
    ):
        # Lightning would silently switch fp16 AMP to bf16 on CPU; say so instead
        r.add(
            "trainer.precision",
            precision,
            "32-true | 64-true | bf16-mixed | bf16-true | 16-true on trainer.accelerator=cpu",
        )

    max_epochs = r.get("trainer.max_epochs", None)
    min_epochs = r.get("trainer.min_epochs", None)
    max_steps = r.get("trainer.max_steps", -1)
    epochs_ok = max_epochs in (_ABSENT, None) or (is_int(max_epochs) and (max_epochs >= 1 or max_epochs == -1))
    if not epochs_ok:
        r.add("trainer.max_epochs", max_epochs, "null, -1 (no epoch limit) or an integer >= 1")
    steps_ok = max_steps in (_ABSENT, None) or (is_int(max_steps) and (max_steps >= 1 or max_steps == -1))
    if not steps_ok:
        r.add("trainer.max_steps", max_steps, "-1 (no step limit) or an integer >= 1")
    if epochs_ok and steps_ok and max_epochs == -1 and max_steps in (-1, None, _ABSENT):
        r.problems.append(
            "trainer.max_epochs=-1 with trainer.max_steps=-1: allowed: at least one finite limit (training would never "
            "stop)"
        )
    if min_epochs not in (_ABSENT, None):
        if not is_int(min_epochs) or min_epochs < 0:
            r.add("trainer.min_epochs", min_epochs, "null or an integer >= 0")
        elif is_int(max_epochs) and max_epochs >= 1 and min_epochs > max_epochs:
            r.add("trainer.min_epochs", min_epochs, f"an integer <= trainer.max_epochs={max_epochs}")

    _number_in(
        r,
        "trainer.gradient_clip_val",
        r.get("trainer.gradient_clip_val"),
        lambda v: v >= 0,
        "a number >= 0",
        nullable=True,
    )
    _one_of(
        r,
        "trainer.gradient_clip_algorithm",
        r.get("trainer.gradient_clip_algorithm", None) or _ABSENT,
        GRADIENT_CLIP_ALGORITHMS,
    )
    _int_at_least(r, "trainer.accumulate_grad_batches", r.get("trainer.accumulate_grad_batches"), 1)
    _int_at_least(r, "trainer.log_every_n_steps", r.get("trainer.log_every_n_steps"), 1, nullable=True)
    _int_at_least(r, "trainer.check_val_every_n_epoch", r.get("trainer.check_val_every_n_epoch"), 1, nullable=True)
    _int_at_least(r, "trainer.num_sanity_val_steps", r.get("trainer.num_sanity_val_steps"), -1, nullable=True)
    for stage in ("train", "val", "test", "predict"):
        _limit_batches(r, f"trainer.limit_{stage}_batches", r.get(f"trainer.limit_{stage}_batches"))
    val_interval = r.get("trainer.val_check_interval")
    _limit_batches(r, "trainer.val_check_interval", val_interval)
    deterministic = r.get("trainer.deterministic")
    if deterministic not in (_ABSENT, None, True, False, "warn"):
        r.add("trainer.deterministic", deterministic, "true | false | warn | null")
    fast_dev_run = r.get("trainer.fast_dev_run")
    if fast_dev_run is not _ABSENT and not (
        isinstance(fast_dev_run, bool) or (is_int(fast_dev_run) and fast_dev_run >= 0)
    ):
        r.add("trainer.fast_dev_run", fast_dev_run, "true | false | an integer >= 0 (batches)")


def _check_strategy_target(r: _Reader, strategy: Mapping[str, Any], accelerator: Any) -> None:
    target = strategy["_target_"]
    try:
        from hydra.utils import get_class
        from lightning.pytorch.strategies import Strategy

        cls = get_class(str(target))
    except Exception as error:  # noqa: BLE001 - hydra wraps import failures in several types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        r.problems.append(
            f"trainer.strategy._target_={target!r}: cannot be imported ({first_line}); allowed: a "
            "lightning.pytorch.strategies class"
        )
        return
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        r.add("trainer.strategy._target_", target, "a subclass of lightning.pytorch.strategies.Strategy")
    backend = strategy.get("process_group_backend")
    if backend not in (None, "nccl", "gloo", "mpi", "ucc", "xccl", "hccl"):
        r.add("trainer.strategy.process_group_backend", backend, "null | nccl | gloo | mpi | ucc")
    elif backend == "nccl" and accelerator == "cpu":
        r.add(
            "trainer.strategy.process_group_backend", backend, "gloo on trainer.accelerator=cpu (nccl needs CUDA GPUs)"
        )


def _check_top_level(r: _Reader) -> None:
    seed = r.get("seed")
    if seed is not _ABSENT and not is_int(seed):
        r.add("seed", seed, "an integer")
    _bool(r, "skip_nonfinite", r.get("skip_nonfinite"))
    _bool(r, "test", r.get("test"))
    _one_of(r, "test_ckpt", r.get("test_ckpt"), ("best", "last"))
    ckpt = r.get("ckpt_path", None)
    training = r.has("trainer")
    if ckpt not in (_ABSENT, None) and not (training and ckpt == "auto"):  # auto: avseg.train.resolve_ckpt_path
        if not isinstance(ckpt, (str, os.PathLike)) or not _expand(ckpt).is_file():
            hint = "<run dir>/checkpoints/last.ckpt to resume" if training else "a checkpoint written by avseg.train"
            allowed = "null, auto or an existing checkpoint file" if training else "null or an existing checkpoint file"
            r.problems.append(f"ckpt_path={ckpt!r}: no such file; allowed: {allowed} ({hint})")
    every = r.get("callbacks.checkpoint.every_n_train_steps", None)
    if every not in (_ABSENT, None):
        _int_at_least(r, "callbacks.checkpoint.every_n_train_steps", every, 0, note=" (0: at epoch ends only)")
    # avseg.eval
    if r.has("perturb"):
        _one_of(r, "split", r.get("split"), SPLITS)
        _one_of(r, "perturb", r.get("perturb"), PERTURBATIONS)
        _number_in(r, "perturb_snr_db", r.get("perturb_snr_db"), lambda v: True, "a finite number (dB)")
        _int_at_least(r, "batch_size", r.get("batch_size"), 1, nullable=True)
        _int_at_least(r, "num_workers", r.get("num_workers"), 0, nullable=True)
    device = r.get("device")
    if device is not _ABSENT:
        if not isinstance(device, str) or not (
            device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
        ):
            r.add("device", device, "auto | cpu | cuda | cuda:N")


def config_problems(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """Every violation in ``cfg``, one line each (``key=value: allowed: ...``); [] when valid."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    reader = _Reader(cfg)
    subset = _subset(reader)
    _check_model(reader, subset)
    _check_data(reader, subset)
    _check_trainer(reader)
    _check_top_level(reader)
    # one line per problem, each once, in the order found
    return list(dict.fromkeys(reader.problems))


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise one `ConfigError` listing every violation in ``cfg``; return None when it is valid.

    Reads no data and opens no weights file (it only asks whether the named paths exist), so
    ``avseg.train`` / ``avseg.eval`` call it first thing.
    """
    problems = config_problems(cfg)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"invalid configuration ({count}):\n  " + "\n  ".join(problems))
