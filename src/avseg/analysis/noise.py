"""``python -m avseg.analysis noise``: M_J / M_F against the SNR of white noise added at evaluation
(``perturb=noise``) for one or more checkpoints, optionally averaged over the checkpoints of one
label (seeds); a markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avseg.analysis.common import evaluate, fmt, markdown_table, single_metric, write_bytes_atomic, write_json
from avseg.errors import ConfigError

__all__ = [
    "parse_snr_list",
    "checkpoint_label",
    "noise_table_markdown",
    "average_curves",
    "plot_noise_curves",
    "run_noise",
]

log = logging.getLogger(__name__)


def parse_snr_list(given: str | Sequence[object]) -> list[float | None]:
    """``"clean,20,10,-5"`` or ``["clean", 20, 10, -5]`` (``snrs=[clean,20,10,-5]``) ->
    [None, 20.0, 10.0, -5.0] (None = clean audio, perturb=none)."""
    text = str(given) if isinstance(given, str) else ",".join(str(word) for word in given)
    values: list[float | None] = []
    for word in text.strip("[]() ").split(","):
        word = word.strip()
        if not word:
            continue
        if word.lower() == "clean":
            values.append(None)
            continue
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(f"snrs=[{text}]: {word!r} is neither 'clean' nor a number (dB)") from None
        if not math.isfinite(value):
            raise ConfigError(f"snrs=[{text}]: {word!r} is not a finite number")
        values.append(value)
    if not values:
        raise ConfigError(f"snrs=[{text}]: give at least one SNR, e.g. snrs=[clean,20,10,5,0,-5]")
    if len(set(values)) != len(values):
        raise ConfigError(f"snrs=[{text}]: an SNR is listed twice")
    return values


def _snr_name(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g}"


def checkpoint_label(ckpt_path: str) -> str:
    """A short label for a checkpoint: its decomposition variant (from the stored model config)."""
    from avseg.lit.checkpoint_io import load_checkpoint_file

    checkpoint = load_checkpoint_file(Path(os.path.expanduser(ckpt_path)), map_location="cpu")
    hparams = checkpoint.get("hyper_parameters") or {}
    variant = (hparams.get("decomposition") or {}).get("variant")
    return str(variant) if variant else Path(ckpt_path).stem


def noise_table_markdown(curves: Mapping[str, Mapping[str, Mapping[str, float]]], snrs: Sequence[float | None]) -> str:
    """Rows: checkpoint label x metric; columns: the SNRs. ``curves[label][snr name] = {miou, fscore}``
    (plus ``miou_std`` / ``fscore_std`` for averaged curves: cells ``mean ± std``)."""
    header = ["model", "metric", *[("clean" if s is None else f"{s:g} dB") for s in snrs]]
    rows = []
    for label, points in curves.items():
        for metric, name in (("miou", "M_J"), ("fscore", "M_F")):
            cells = []
            for snr in snrs:
                point = points[_snr_name(snr)]
                std = point.get(f"{metric}_std")
                cells.append(fmt(point[metric]) + ("" if std is None else f" ± {fmt(std)}"))
            rows.append([label, name, *cells])
    return markdown_table(header, rows)


def average_curves(
    curves: Sequence[Mapping[str, Mapping[str, float]]], labels: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Curves of the checkpoints sharing a label (e.g. the seeds of one variant) -> one curve per
    label, in order of first appearance: mean and sample std (ddof = 1; nan for one checkpoint) of
    M_J and M_F at every SNR, and ``n``."""
    grouped: dict[str, list[Mapping[str, Mapping[str, float]]]] = {}
    for label, curve in zip(labels, curves):
        grouped.setdefault(label, []).append(curve)
    averaged: dict[str, dict[str, dict[str, float]]] = {}
    for label, members in grouped.items():
        averaged[label] = {}
        for snr_name in members[0]:
            point: dict[str, float] = {"n": len(members)}
            for metric in ("miou", "fscore"):
                values = np.asarray([m[snr_name][metric] for m in members], dtype=np.float64)
                point[metric] = float(values.mean())
                point[f"{metric}_std"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
            averaged[label][snr_name] = point
    return averaged


def plot_noise_curves(
    curves: Mapping[str, Mapping[str, Mapping[str, float]]], snrs: Sequence[float | None], *, title: str
) -> bytes:
    """PNG bytes: M_J and M_F (two panels) against the SNR, one line per checkpoint; the x axis is
    categorical in the given order (``clean`` first by default)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 3.8), dpi=110)
    positions = np.arange(len(snrs))
    ticks = ["clean" if s is None else f"{s:g}" for s in snrs]
    for axis_index, (metric, name) in enumerate((("miou", "M_J (mIoU)"), ("fscore", "M_F (F-score)"))):
        axis = figure.add_subplot(1, 2, axis_index + 1)
        for label, points in curves.items():
            values = [points[_snr_name(s)][metric] for s in snrs]
            stds = [points[_snr_name(s)].get(f"{metric}_std") for s in snrs]
            if all(std is not None and math.isfinite(std) for std in stds):
                axis.errorbar(positions, values, yerr=stds, marker="o", capsize=3, label=f"{label} (mean ± std)")
            else:
                axis.plot(positions, values, marker="o", label=label)
        axis.set_xticks(positions, ticks)
        axis.set_xlabel("SNR of added white noise (dB)")
        axis.set_ylabel(name)
        axis.set_ylim(0.0, 1.0)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def run_noise(
    ckpt_paths: Sequence[str],
    overrides: Sequence[str],
    *,
    snrs: Sequence[float | None],
    output_dir: Path,
    labels: Sequence[str] | None = None,
    name: str = "noise_robustness",
    average: bool = False,
) -> dict[str, Any]:
    """M_J / M_F against SNR for each checkpoint; writes ``<name>.md``, ``<name>.json``, ``<name>.png``
    in ``output_dir`` and each eval's metrics under ``output_dir/<name>_runs/``. With ``average``,
    checkpoints sharing a label (by default their decomposition variant: e.g. three seeds of
    ``pq`` and three of ``none``) become one curve, mean ± std (``average_curves``)."""
    if not ckpt_paths:
        raise ConfigError("noise: give at least one checkpoint, ckpt_paths=[...]")
    if any(o.split("=", 1)[0].lstrip("+~") in ("perturb", "perturb_snr_db") for o in overrides):
        raise ConfigError("noise sets perturb / perturb_snr_db itself: use snrs=[clean,20,10,...] instead")
    if labels is None:
        labels = [checkpoint_label(p) for p in ckpt_paths]
        if not average:
            # the same variant twice: number them so the curves stay apart
            labels = [f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    if len(labels) != len(ckpt_paths) or (not average and len(set(labels)) != len(labels)):
        raise ConfigError(
            f"labels={list(labels)}: one label per checkpoint ({len(ckpt_paths)}), distinct unless average=true"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = output_dir / f"{name}_runs"
    per_checkpoint: list[dict[str, dict[str, float]]] = []
    info: dict[str, Any] = {}
    with open(output_dir / f"{name}_eval_log.txt", "w") as log_file:
        for index, ckpt in enumerate(ckpt_paths):
            curve: dict[str, dict[str, float]] = {}
            for snr in snrs:
                perturb = "none" if snr is None else "noise"
                result = evaluate(
                    ckpt, overrides, runs_dir / f"{index}" / _snr_name(snr), perturb=perturb, snr_db=snr, log=log_file
                )
                curve[_snr_name(snr)] = {
                    "miou": single_metric(result, "miou"),
                    "fscore": single_metric(result, "fscore"),
                }
                info = result
            per_checkpoint.append(curve)
    curves = average_curves(per_checkpoint, labels) if average else dict(zip(labels, per_checkpoint))
    title = f"Noise robustness on {info['data_subset']} {info['split']} ({info['num_clips']} clips)"
    table = noise_table_markdown(curves, snrs)
    checkpoints = "\n".join(f"- {label}: `{ckpt}`" for label, ckpt in zip(labels, ckpt_paths))
    how = " Curves: mean ± sample std over the checkpoints of each label." if average else ""
    text = (
        f"# {title}\n\nWhite noise added to the waveform at evaluation (perturb=noise).{how}"
        f"\n\n{checkpoints}\n\n{table}\n"
    )
    payload = {
        "snr_db": [_snr_name(s) for s in snrs],
        "labels": list(labels),
        "checkpoints": [
            {"label": label, "ckpt_path": ckpt, "curve": curve}
            for label, ckpt, curve in zip(labels, ckpt_paths, per_checkpoint)
        ],
        "average": average,
        "curves": curves,
        "data_subset": info["data_subset"],
        "split": info["split"],
        "num_clips": info["num_clips"],
        "data_config": info["data_config"],
    }
    write_bytes_atomic(output_dir / f"{name}.md", text.encode())
    write_json(output_dir / f"{name}.json", payload)
    write_bytes_atomic(output_dir / f"{name}.png", plot_noise_curves(curves, snrs, title=title))
    log.info(text + f"\noutputs: {output_dir / name}.{{md,json,png}}")
    return payload
