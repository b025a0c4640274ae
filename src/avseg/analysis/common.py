"""What the analysis commands share: composing the eval config, running one evaluation (the
``avseg.eval`` body, `avseg.evaluation`), the checkpoint's module and evaluation dataset, the
SynthAVS sidecar and the generator's plans, and the output helpers (markdown tables, atomic JSON)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from avseg.errors import ConfigError, DataError
from avseg.evaluation import SPLITS, choose_data_config, evaluate_checkpoint
from avseg.inference import load_model, resolve_device
from avseg.io import json_safe, write_bytes_atomic, write_json_atomic

__all__ = [
    "CONF_DIR",
    "SIDECAR_NAME",
    "write_bytes_atomic",
    "write_json",
    "fmt",
    "markdown_table",
    "default_output_dir",
    "compose_eval",
    "choose_data_config",
    "logged_to",
    "evaluate",
    "single_metric",
    "load_synth_sources",
    "analysis_dataset",
    "AnalysisInputs",
    "load_analysis_inputs",
    "synth_plans",
]

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
SIDECAR_NAME = "synth_sources.json"


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as sorted, indented JSON (NaN -> null), atomically."""
    write_json_atomic(path, json_safe(payload))


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_output_dir(command: str) -> Path:
    """``$AVSEG_OUTPUTS/analysis/<command>/<timestamp>`` (``outputs/`` without the variable), the
    layout of the Hydra run directories."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{time.time_ns() // 1000 % 1_000_000:06d}"
    return Path(os.environ.get("AVSEG_OUTPUTS", "outputs")) / "analysis" / command / stamp


def compose_eval(overrides: Sequence[str]) -> Any:
    """The composed ``conf/eval.yaml`` with ``overrides`` (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not (CONF_DIR / "eval.yaml").is_file():
        raise ConfigError(f"{CONF_DIR}: no eval.yaml; avseg.analysis needs the repository's conf/ folder")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="analysis"):
            return compose("eval", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"bad override in {list(overrides)}: {str(error).strip().splitlines()[0]}") from error


@contextlib.contextmanager
def logged_to(stream: TextIO | None, name: str = "avseg.evaluation") -> Iterator[None]:
    """While inside: the records of logger ``name`` go to ``stream`` only (not to the console)."""
    if stream is None:
        yield
        return
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = (logger.propagate, logger.level)
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


def evaluate(
    ckpt_path: str,
    overrides: Sequence[str],
    output_dir: Path,
    *,
    perturb: str,
    snr_db: float | None = None,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """One `avseg.evaluation.evaluate_checkpoint` (what ``python -m avseg.eval`` runs) on
    ``ckpt_path``; its report goes to ``log`` (when given)."""
    extra = [f"perturb={perturb}"] + ([f"perturb_snr_db={snr_db}"] if snr_db is not None else [])
    cfg = compose_eval([f"ckpt_path={ckpt_path}", *overrides, *extra])
    with logged_to(log):
        return evaluate_checkpoint(cfg, output_dir=output_dir, overrides=list(overrides))


def single_metric(result: Mapping[str, Any], name: str) -> float:
    """``<split>/<name>`` of a single-set eval result (two test sets are not supported here)."""
    keys = [k for k in result if k.endswith(f"/{name}") and k.count("/") == 1]
    if len(keys) != 1:
        found = sorted(k for k in result if k.endswith(f"/{name}"))
        raise ConfigError(
            f"the evaluation gave {found or 'no'} {name} values; avseg.analysis needs exactly one test set "
            "(for subset 'avs' pick one: data.test_sets=[s4] or [ms3])"
        )
    value = result[keys[0]]
    return float("nan") if value is None else float(value)


def load_synth_sources(root: str | os.PathLike) -> dict[str, Any]:
    """The SynthAVS sidecar ``<root>/synth_sources.json``; DataError when absent or malformed."""
    path = Path(root) / SIDECAR_NAME
    if not path.is_file():
        raise DataError(
            path,
            "no SynthAVS sidecar here: the decomposition analysis needs a SynthAVS tree (data=synth_ms3 / synth_s4 / "
            "synth_avss)",
        )
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable sidecar: {error}") from error
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("clips"), dict):
        raise DataError(path, "malformed sidecar: no 'clips' mapping")
    return sidecar


def analysis_dataset(cfg: Any, split: str) -> tuple[Any, Any]:
    """(data module, the single evaluation dataset of ``split``) of a composed eval config."""
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    names = list(datamodule.test_set_names if split == "test" else datamodule.val_set_names)
    if split == "train":
        names = list(datamodule.members)
    if len(names) != 1:
        raise ConfigError(
            f"data.subset={datamodule.subset!r} has {len(names)} sets {names}; pick one (data.test_sets=[...])"
        )
    return datamodule, datamodule.build(names[0], split, train=False)


@dataclass
class AnalysisInputs:
    """What the decomposition analysis works on: the trained module, its data and the sidecar."""

    module: Any
    datamodule: Any
    dataset: Any
    sidecar: dict[str, Any] | None
    split: str
    device: torch.device
    batch_size: int
    data_source: str


def load_analysis_inputs(ckpt_path: str, overrides: Sequence[str] = (), *, need_sidecar: bool = True) -> AnalysisInputs:
    """The checkpoint's module (eval mode), the evaluation dataset of ``split`` (data config chosen
    as `avseg.eval` does) and, with ``need_sidecar``, the SynthAVS sidecar of that tree."""
    cfg = compose_eval([f"ckpt_path={ckpt_path}", *overrides])
    data_source = choose_data_config(cfg, overrides)
    split = str(cfg.split)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: allowed values are {' | '.join(SPLITS)}")
    device = resolve_device(str(cfg.device))
    module = load_model(ckpt_path, device)
    datamodule, dataset = analysis_dataset(cfg, split)
    if bool(module.semantic) != bool(datamodule.semantic):
        raise ConfigError(
            f"data.subset={datamodule.subset!r} does not fit the checkpoint {ckpt_path} (binary vs semantic); pick "
            "data=..."
        )
    sidecar = load_synth_sources(dataset.root) if need_sidecar else None
    batch_size = int(cfg.batch_size) if cfg.get("batch_size") is not None else int(datamodule.eval_batch_size)
    return AnalysisInputs(
        module=module,
        datamodule=datamodule,
        dataset=dataset,
        sidecar=sidecar,
        split=split,
        device=device,
        batch_size=batch_size,
        data_source=data_source,
    )


def synth_plans(
    sidecar: Mapping[str, Any], subset: str, split: str, video_ids: Sequence[str], where: Path
) -> list[Any]:
    """The generator's plans of ``video_ids`` (re-drawn from the sidecar's resolved options; each
    clip has its own seeded generator), checked against the sidecar's sounding lists."""
    from avseg.data.synth import catalogue_for, plan_clip

    options = dict(sidecar.get("options") or {})
    if sidecar.get("subset") != subset or not options:
        raise DataError(
            where, f"the sidecar describes subset {sidecar.get('subset')!r} without options; expected {subset!r}"
        )
    options["snr_db"] = tuple(options["snr_db"])
    options["num_classes"] = int(options["num_classes"])
    catalogue = catalogue_for(options)  # synthetic shapes and tones, or the real drawings and sounds
    plans = []
    for video_id in video_ids:
        entry = sidecar["clips"].get(video_id)
        if entry is None:
            raise DataError(where, f"clip {video_id!r} is not in the sidecar")
        index = int(video_id.rsplit("-", 1)[1].split("_", 1)[0])
        plan = plan_clip(options=options, catalogue=catalogue, subset=subset, split=split, index=index)
        redrawn = [
            sorted(plan.classes[j].name for j in np.flatnonzero(plan.sounding[:, t])) for t in range(plan.num_frames)
        ]
        recorded = [sorted(x["class"] for x in second) for second in entry["sounding"]]
        if redrawn != recorded:
            raise DataError(
                where,
                f"clip {video_id!r}: re-drawing it from the sidecar's options does not give its recorded sources "
                "(another generator version?)",
            )
        plans.append(plan)
    return plans
