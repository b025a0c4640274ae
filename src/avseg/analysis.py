"""``python -m avseg.analysis <command> ...``: does the model listen, how robust is it to noise, do
the quantised sub-space codes line up with the true sources, and what does an ablation sweep say.

Commands (docs/ANALYSIS.md):

- ``reliance ckpt_path=PATH [eval overrides] [--require-drop 0.5]``: `avseg.eval` with perturb
  ``none``, ``mute`` and ``swap`` on the checkpoint's data; a table of M_J / M_F and their relative
  drops. With ``--require-drop D`` the exit status is 3 unless M_J loses at least the fraction D
  under mute AND under swap.
- ``noise ckpt_path=A [ckpt_path=B ...] [snr=clean,20,10,5,0,-5]``: M_J and M_F against the SNR of
  white noise added at evaluation (``perturb=noise``) for one or more checkpoints; writes a
  markdown table, a JSON file and a PNG plot (matplotlib, Agg).
- ``decomposition ckpt_path=PATH [split=test] [clips=multi|all]``: on SynthAVS clips, the
  quantised code indices (``quant["local_indices"]`` [B, T, K] per second, ``quant["global_indices"]``
  [B, K] per clip) against the true sounding classes of ``synth_sources.json``: normalised mutual
  information, purity and the number of codes used, per sub-space, pooled over sub-spaces and for
  the joint K-tuple. ``pq``, ``pq_split`` and ``vq``; "not applicable" for ``none``.
- ``data-baselines [ckpt_path=PATH | data overrides]``: on a binary SynthAVS split, the M_J / M_F
  of rule-based predictors: every visible object (the best a model ignoring the audio can do), and
  an ideal listener with clean, muted and swapped audio (what the data allows mute / swap to cost).
- ``selectivity ckpt_path=PATH``: on a binary SynthAVS split, the share of the pixels of "heard"
  objects (whose class sounds in the audio the model is given), of the other objects and of the
  background that the model predicts foreground, with the audio clean, muted and swapped: whether
  the model selects by sound, whatever the relative M_J drops say.
- ``ablation-summary SWEEP_DIR [SWEEP_DIR ...]``: groups the rows of the sweeps' ``summary.csv``
  by their overrides minus the seed and writes mean +- std per group (markdown and CSV).

Arguments: ``key=value`` words (``ckpt_path``, ``snr``, ``clips`` and any `conf/eval.yaml` key or
data override, e.g. ``split=val``, ``data.synth.clips_per_split.test=64``, ``device=cpu``) and
``--flags``. The data config is chosen as `avseg.eval` chooses it: the command line's when it
names any ``data`` option, else the training run's (``<run dir>/.hydra/config.yaml``).

Exit status: 0 done, 1 a project error (bad data / checkpoint / config; one ``error: ...`` line),
2 bad arguments, 3 ``--require-drop`` not met. Every output file is written atomically (temp file
in the same folder + ``os.replace``).

The information measures are implemented here with numpy (`normalized_mutual_information`,
`purity`, `chance_nmi`), so they can be checked against hand-computed values.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from avseg.errors import AvsegError, ConfigError, DataError

__all__ = [
    "main",
    "contingency_table",
    "entropy",
    "mutual_information",
    "normalized_mutual_information",
    "purity",
    "chance_nmi",
    "source_label",
    "load_synth_sources",
    "ClipCodes",
    "collect_clip_codes",
    "audio_features",
    "analysis_dataset",
    "AnalysisInputs",
    "load_analysis_inputs",
    "decomposition_tables",
    "format_decomposition_tables",
    "audio_token_spread",
    "reliance_rows",
    "reliance_verdict",
    "format_reliance_table",
    "parse_snr_list",
    "noise_table_markdown",
    "plot_noise_curves",
    "summarise_sweeps",
    "format_summary_markdown",
    "run_reliance",
    "run_noise",
    "run_decomposition",
    "run_ablation_summary",
    "data_baselines",
    "pixel_selectivity",
    "run_selectivity",
    "run_data_baselines",
    "EXIT_REQUIREMENT",
]

EXIT_USAGE = 2
EXIT_REQUIREMENT = 3
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SIDECAR_NAME = "synth_sources.json"
DEFAULT_SNRS = ("clean", "20", "10", "5", "0", "-5")


# =============================================================================================
# information measures (numpy only)


def contingency_table(codes: Sequence[Hashable], labels: Sequence[Hashable]) -> np.ndarray:
    """Counts [number of distinct codes, number of distinct labels] of the pairs (code_i, label_i);
    rows / columns in order of first appearance."""
    if len(codes) != len(labels):
        raise ValueError(f"codes ({len(codes)}) and labels ({len(labels)}) differ in length")
    code_ids: dict[Hashable, int] = {}
    label_ids: dict[Hashable, int] = {}
    rows = np.fromiter((code_ids.setdefault(c, len(code_ids)) for c in codes), dtype=np.int64, count=len(codes))
    cols = np.fromiter((label_ids.setdefault(v, len(label_ids)) for v in labels), dtype=np.int64, count=len(labels))
    table = np.zeros((len(code_ids), len(label_ids)), dtype=np.int64)
    np.add.at(table, (rows, cols), 1)
    return table


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative ``counts``."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        raise ValueError("entropy of an empty distribution")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mutual_information(table: np.ndarray) -> float:
    """I(U; V) in nats from a contingency table [|U|, |V|] of counts."""
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if total <= 0:
        raise ValueError("mutual information of an empty table")
    joint = table / total
    pu = joint.sum(axis=1, keepdims=True)
    pv = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(max((joint[nz] * np.log(joint[nz] / (pu @ pv)[nz])).sum(), 0.0))


def normalized_mutual_information(codes: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """NMI(U; V) = I(U; V) / ((H(U) + H(V)) / 2) (arithmetic normalisation), in [0, 1].

    Conventions: two single-value partitions are identical (1.0); if exactly one side has a single
    value there is no shared information (0.0). No samples raises ValueError.
    """
    if len(codes) == 0:
        raise ValueError("normalized_mutual_information: no samples")
    table = contingency_table(codes, labels)
    h_codes = entropy(table.sum(axis=1))
    h_labels = entropy(table.sum(axis=0))
    if h_codes == 0.0 and h_labels == 0.0:
        return 1.0
    denominator = (h_codes + h_labels) / 2.0
    return float(min(mutual_information(table) / denominator, 1.0))


def purity(codes: Sequence[Hashable], label_sets: Sequence[Iterable[Hashable]]) -> float:
    """Share of samples whose label set holds their code's majority class.

    Each code j is given the class c_j found most often among the label sets of its samples;
    purity = (1/n) * sum_j #{i : code_i = j and c_j in label_set_i}. With one label per sample
    (sets of one element) this is the usual cluster purity; with several sounding sources a code
    counts as right when its class is among them.
    """
    if len(codes) != len(label_sets):
        raise ValueError(f"codes ({len(codes)}) and label sets ({len(label_sets)}) differ in length")
    if len(codes) == 0:
        raise ValueError("purity: no samples")
    per_code: dict[Hashable, dict[Hashable, int]] = {}
    for code, labels in zip(codes, label_sets):
        counts = per_code.setdefault(code, {})
        for label in set(labels):
            counts[label] = counts.get(label, 0) + 1
    hits = sum(max(counts.values(), default=0) for counts in per_code.values())
    return hits / len(codes)


def chance_nmi(codes: Sequence[Hashable], labels: Sequence[Hashable], *, permutations: int = 50, seed: int = 0) -> float:
    """Mean NMI after randomly permuting ``labels`` (``permutations`` seeded draws): what NMI
    reaches by chance with these code and label marginals (NMI is biased upward when there are
    many codes and few samples)."""
    if permutations < 1:
        raise ValueError("chance_nmi: permutations must be >= 1")
    rng = np.random.default_rng(seed)
    labels = list(labels)
    values = []
    for _ in range(permutations):
        order = rng.permutation(len(labels))
        values.append(normalized_mutual_information(codes, [labels[i] for i in order]))
    return float(np.mean(values))


def source_label(classes: Iterable[str]) -> str:
    """Canonical label of a set of sounding classes: sorted names joined by ``+``."""
    names = sorted(set(classes))
    return "+".join(names) if names else "(silence)"


# =============================================================================================
# small shared pieces


def _write_atomic(path: Path, data: bytes) -> None:
    from avseg.lit.checkpoint_io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path, payload: Any) -> None:
    _write_atomic(path, (json.dumps(_json_safe(payload), indent=2, sort_keys=True) + "\n").encode())


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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


def choose_data_config(cfg: Any, overrides: Sequence[str]) -> str:
    """The data config `avseg.eval` would use (command line, else the training run's, else the
    eval default), set on ``cfg``; returns where it came from."""
    from avseg.eval import choose_data_config as eval_choose_data_config

    return eval_choose_data_config(cfg, overrides)


def _evaluate(
    ckpt_path: str, overrides: Sequence[str], output_dir: Path, *, perturb: str, snr_db: float | None = None, log: io.TextIOBase | None = None
) -> dict[str, Any]:
    """One `avseg.eval.run` on ``ckpt_path``; its printout goes to ``log`` (when given)."""
    from avseg.eval import run

    extra = [f"perturb={perturb}"] + ([f"perturb_snr_db={snr_db}"] if snr_db is not None else [])
    cfg = compose_eval([f"ckpt_path={ckpt_path}", *overrides, *extra])
    target = log if log is not None else sys.stdout
    with contextlib.redirect_stdout(target):
        return run(cfg, output_dir=output_dir, overrides=list(overrides))


def _metric(result: Mapping[str, Any], name: str) -> float:
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


# =============================================================================================
# reliance


def audio_token_spread(net: Any, dataset: Any, *, batch_size: int = 4, device: torch.device | str = "cpu") -> dict[str, float]:
    """How much the audio tokens F_a (without their sine position code, which is the same in every
    clip) differ between the real seconds of ``dataset``, relative to their size:
    ``spread = sqrt(sum_c var_c / mean ||x||^2)`` over all real seconds, plus the same for the raw
    VGGish embeddings. A spread of a few per cent or less means the network downstream hardly sees
    the audio, whatever it learns."""
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips
    from avseg.models.layers.position import sine_position_1d

    encoder = net.audio_encoder
    tokens_all, embeddings_all = [], []
    net = net.eval().to(device)
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_clips):
            audio, frame_valid = batch["audio"].to(device), batch["frame_valid"].to(device)
            tokens = encoder(audio, frame_valid)  # [B, T, C], or [B, T, M, C] with band tokens
            position = sine_position_1d(tokens.shape[1], tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)
            if tokens.dim() == 4:  # band tokens: remove the time code and the learnt band embedding
                tokens = tokens - position[:, None] - encoder.band_embed.to(tokens.dtype)
            else:
                tokens = tokens - position
            valid = frame_valid.bool()
            tokens_all.append(tokens[valid].reshape(-1, tokens.shape[-1]).double().cpu())
            embedding = encoder.embed(audio, frame_valid)[valid]
            embeddings_all.append(embedding.reshape(-1, embedding.shape[-1]).double().cpu())

    def spread(x: torch.Tensor) -> float:
        return float((x.var(dim=0, unbiased=False).sum() / x.pow(2).sum(dim=1).mean().clamp_min(1e-30)).sqrt())

    return {"token_spread": spread(torch.cat(tokens_all)), "embedding_spread": spread(torch.cat(embeddings_all))}


def reliance_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (perturb, M_J, M_F, relative drops against ``none``) from eval results per perturbation."""
    clean_j = _metric(results["none"], "miou")
    clean_f = _metric(results["none"], "fscore")
    rows = []
    for perturb, result in results.items():
        miou, fscore = _metric(result, "miou"), _metric(result, "fscore")
        rows.append(
            {
                "perturb": perturb,
                "miou": miou,
                "fscore": fscore,
                "miou_drop": (clean_j - miou) / clean_j if clean_j > 0 else float("nan"),
                "fscore_drop": (clean_f - fscore) / clean_f if clean_f > 0 else float("nan"),
            }
        )
    return rows


def reliance_verdict(rows: Sequence[Mapping[str, Any]], required_drop: float) -> tuple[bool, str]:
    """Does M_J lose at least ``required_drop`` (a fraction) under mute AND swap? (ok, reason)."""
    by_name = {row["perturb"]: row for row in rows}
    missing = [p for p in ("mute", "swap") if p not in by_name]
    if missing:
        raise ValueError(f"reliance_verdict: no rows for {missing}")
    failures = []
    for perturb in ("mute", "swap"):
        drop = by_name[perturb]["miou_drop"]
        if not math.isfinite(drop):
            failures.append(f"{perturb}: relative drop undefined (clean M_J is 0)")
        elif drop < required_drop:
            failures.append(f"{perturb}: M_J drops by {drop:.1%} < {required_drop:.0%}")
    if failures:
        return False, "; ".join(failures)
    return True, f"M_J drops by at least {required_drop:.0%} under mute and swap"


def format_reliance_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("perturb", "M_J (mIoU)", "M_F (F-score)", "M_J drop", "M_F drop")
    body = [
        (
            row["perturb"],
            _fmt(row["miou"]),
            _fmt(row["fscore"]),
            "-" if row["perturb"] == "none" else (f"{row['miou_drop']:.1%}" if math.isfinite(row["miou_drop"]) else "n/a"),
            "-" if row["perturb"] == "none" else (f"{row['fscore_drop']:.1%}" if math.isfinite(row["fscore_drop"]) else "n/a"),
        )
        for row in rows
    ]
    return _markdown_table(header, body)


def run_reliance(ckpt_path: str, overrides: Sequence[str], *, output_dir: Path, require_drop: float | None = None) -> dict[str, Any]:
    """Evaluates with perturb none / mute / swap; writes ``reliance.md`` / ``reliance.json`` and each
    eval's ``<perturb>/metrics.json`` under ``output_dir``; returns the rows and the verdict."""
    if any(o.split("=", 1)[0].lstrip("+~") in ("perturb", "perturb_snr_db") for o in overrides):
        raise ConfigError("reliance runs perturb=none, mute and swap itself: drop perturb=... from the command line")
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    with open(output_dir / "eval_log.txt", "w") as log:
        for perturb in ("none", "mute", "swap"):
            results[perturb] = _evaluate(ckpt_path, overrides, output_dir / perturb, perturb=perturb, log=log)
    rows = reliance_rows(results)
    first = results["none"]
    inputs = load_analysis_inputs(ckpt_path, overrides, need_sidecar=False)
    spread = audio_token_spread(inputs.module.net, inputs.dataset, batch_size=inputs.batch_size, device=inputs.device)
    verdict = reliance_verdict(rows, require_drop) if require_drop is not None else None
    title = (
        f"Audio reliance of {ckpt_path}\n{first['data_subset']} {first['split']}, {first['num_clips']} clips, "
        f"F-score batch {first['frames_per_batch']} frames, swap/mute seed {results['mute']['perturb_seed']}"
    )
    table = format_reliance_table(rows)
    text = f"{title}\n\n{table}\n"
    text += (
        f"\naudio tokens F_a (position code removed) vary across seconds by {spread['token_spread']:.2%} of their RMS norm "
        f"(audio network embeddings: {spread['embedding_spread']:.2%}); near 0 the network cannot tell one sound from another\n"
    )
    if verdict is not None:
        text += f"\nrequire-drop {require_drop:g}: {'PASS' if verdict[0] else 'FAIL'} ({verdict[1]})\n"
    payload = {
        "ckpt_path": str(ckpt_path),
        "rows": rows,
        "data_subset": first["data_subset"],
        "split": first["split"],
        "num_clips": first["num_clips"],
        "data_config": first["data_config"],
        "require_drop": require_drop,
        "passed": None if verdict is None else verdict[0],
        **spread,
    }
    _write_atomic(output_dir / "reliance.md", text.encode())
    _write_json(output_dir / "reliance.json", payload)
    print(text + f"\noutputs: {output_dir}", flush=True)
    return payload


# =============================================================================================
# noise robustness


def parse_snr_list(text: str) -> list[float | None]:
    """``"clean,20,10,-5"`` -> [None, 20.0, 10.0, -5.0] (None = clean audio, perturb=none)."""
    values: list[float | None] = []
    for word in str(text).strip("[]() ").split(","):
        word = word.strip()
        if not word:
            continue
        if word.lower() == "clean":
            values.append(None)
            continue
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(f"snr={text!r}: {word!r} is neither 'clean' nor a number (dB)") from None
        if not math.isfinite(value):
            raise ConfigError(f"snr={text!r}: {word!r} is not a finite number")
        values.append(value)
    if not values:
        raise ConfigError(f"snr={text!r}: give at least one SNR, e.g. snr=clean,20,10,5,0,-5")
    if len(set(values)) != len(values):
        raise ConfigError(f"snr={text!r}: an SNR is listed twice")
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
                cells.append(_fmt(point[metric]) + ("" if std is None else f" ± {_fmt(std)}"))
            rows.append([label, name, *cells])
    return _markdown_table(header, rows)


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


def plot_noise_curves(curves: Mapping[str, Mapping[str, Mapping[str, float]]], snrs: Sequence[float | None], *, title: str) -> bytes:
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
    ckpt_paths: Sequence[str], overrides: Sequence[str], *, snrs: Sequence[float | None], output_dir: Path,
    labels: Sequence[str] | None = None, name: str = "noise_robustness", average: bool = False,
) -> dict[str, Any]:
    """M_J / M_F against SNR for each checkpoint; writes ``<name>.md``, ``<name>.json``, ``<name>.png``
    in ``output_dir`` and each eval's metrics under ``output_dir/<name>_runs/``. With ``average``,
    checkpoints sharing a label (by default their decomposition variant: e.g. three seeds of
    ``pq`` and three of ``none``) become one curve, mean ± std (``average_curves``)."""
    if not ckpt_paths:
        raise ConfigError("noise: give at least one ckpt_path=...")
    if any(o.split("=", 1)[0].lstrip("+~") in ("perturb", "perturb_snr_db") for o in overrides):
        raise ConfigError("noise sets perturb / perturb_snr_db itself: use snr=clean,20,10,... instead")
    if labels is None:
        labels = [checkpoint_label(p) for p in ckpt_paths]
        if not average:
            # the same variant twice: number them so the curves stay apart
            labels = [f"{label} ({i + 1})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    if len(labels) != len(ckpt_paths) or (not average and len(set(labels)) != len(labels)):
        raise ConfigError(
            f"--labels {list(labels)}: one label per checkpoint ({len(ckpt_paths)}), distinct unless --average"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = output_dir / f"{name}_runs"
    per_checkpoint: list[dict[str, dict[str, float]]] = []
    info: dict[str, Any] = {}
    with open(output_dir / f"{name}_eval_log.txt", "w") as log:
        for index, ckpt in enumerate(ckpt_paths):
            curve: dict[str, dict[str, float]] = {}
            for snr in snrs:
                perturb = "none" if snr is None else "noise"
                result = _evaluate(ckpt, overrides, runs_dir / f"{index}" / _snr_name(snr), perturb=perturb, snr_db=snr, log=log)
                curve[_snr_name(snr)] = {"miou": _metric(result, "miou"), "fscore": _metric(result, "fscore")}
                info = result
            per_checkpoint.append(curve)
    curves = average_curves(per_checkpoint, labels) if average else dict(zip(labels, per_checkpoint))
    title = f"Noise robustness on {info['data_subset']} {info['split']} ({info['num_clips']} clips)"
    table = noise_table_markdown(curves, snrs)
    checkpoints = "\n".join(f"- {label}: `{ckpt}`" for label, ckpt in zip(labels, ckpt_paths))
    how = " Curves: mean ± sample std over the checkpoints of each label." if average else ""
    text = f"# {title}\n\nWhite noise added to the waveform at evaluation (perturb=noise).{how}\n\n{checkpoints}\n\n{table}\n"
    payload = {
        "snr_db": [_snr_name(s) for s in snrs],
        "labels": list(labels),
        "checkpoints": [{"label": label, "ckpt_path": ckpt, "curve": curve} for label, ckpt, curve in zip(labels, ckpt_paths, per_checkpoint)],
        "average": average,
        "curves": curves,
        "data_subset": info["data_subset"],
        "split": info["split"],
        "num_clips": info["num_clips"],
        "data_config": info["data_config"],
    }
    _write_atomic(output_dir / f"{name}.md", text.encode())
    _write_json(output_dir / f"{name}.json", payload)
    _write_atomic(output_dir / f"{name}.png", plot_noise_curves(curves, snrs, title=title))
    print(text + f"\noutputs: {output_dir / name}.{{md,json,png}}", flush=True)
    return payload


# =============================================================================================
# decomposition analysis


def load_synth_sources(root: str | os.PathLike) -> dict[str, Any]:
    """The SynthAVS sidecar ``<root>/synth_sources.json``; DataError when absent or malformed."""
    path = Path(root) / SIDECAR_NAME
    if not path.is_file():
        raise DataError(path, "no SynthAVS sidecar here: the decomposition analysis needs a SynthAVS tree (data=synth_ms3 / synth_s4 / synth_avss)")
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable sidecar: {error}") from error
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("clips"), dict):
        raise DataError(path, "malformed sidecar: no 'clips' mapping")
    return sidecar


def _sounding_per_second(sidecar: Mapping[str, Any], video_id: str, num_real: int, where: Path) -> list[frozenset[str]]:
    entry = sidecar["clips"].get(video_id)
    if entry is None:
        raise DataError(where, f"clip {video_id!r} is not in the sidecar")
    sounding = entry.get("sounding")
    if not isinstance(sounding, list) or len(sounding) < num_real:
        raise DataError(where, f"clip {video_id!r}: 'sounding' must list at least {num_real} seconds")
    try:
        return [frozenset(str(source["class"]) for source in second) for second in sounding[:num_real]]
    except (TypeError, KeyError) as error:
        raise DataError(where, f"clip {video_id!r}: malformed 'sounding' entry ({error})") from error


@dataclass
class ClipCodes:
    """The code assignments of one clip and its true sources (real frames only)."""

    video_id: str
    global_indices: np.ndarray  # [K]
    local_indices: np.ndarray  # [T_real, K]
    sounding: list[frozenset[str]] = field(default_factory=list)  # per real second

    @property
    def clip_sources(self) -> frozenset[str]:
        return frozenset().union(*self.sounding) if self.sounding else frozenset()


def audio_features(net: Any, audio: torch.Tensor, frame_valid: torch.Tensor | None = None, *, attention: bool = False) -> dict[str, torch.Tensor]:
    """The audio path of a QDFormer alone (as in its forward): ``entangled`` audio tokens F_a
    [B, T, C], the decomposition dict (``local_codes`` [B, T, K, C], indices, ...) and, with
    ``attention`` (not ``pq_split``), ``attention`` [B, K, T] from `AudioDecomposition.attention_maps`."""
    with torch.inference_mode():
        tokens = net.audio_encoder(audio, frame_valid)
        quant = net.decomposition(tokens, frame_valid)
        out = {"entangled": tokens, **quant}
        if attention:
            out["attention"] = net.decomposition.attention_maps(tokens, frame_valid)
    return out


def collect_clip_codes(net: Any, dataset: Any, sidecar: Mapping[str, Any], *, batch_size: int = 4, device: torch.device | str = "cpu") -> list[ClipCodes]:
    """Runs the audio path of ``net`` over ``dataset`` and pairs each clip's code indices with its
    sounding classes from ``sidecar`` (padded frames dropped)."""
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips

    variant = getattr(net.decomposition, "variant", None)
    if variant == "none":
        raise ConfigError("model/decomposition=none has no quantiser: code analysis is not applicable")
    where = Path(getattr(dataset, "root", ".")) / SIDECAR_NAME
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_clips)
    net = net.eval().to(device)
    clips: list[ClipCodes] = []
    for batch in loader:
        frame_valid = batch["frame_valid"].to(device)
        quant = audio_features(net, batch["audio"].to(device), frame_valid)
        global_indices = quant["global_indices"].cpu().numpy()
        local_indices = quant["local_indices"].cpu().numpy()
        valid = batch["frame_valid"].numpy().astype(bool)
        for row, video_id in enumerate(batch["video_id"]):
            num_real = int(valid[row].sum())
            if not valid[row, :num_real].all():
                raise DataError(where, f"clip {video_id!r}: a padded frame comes before a real one")
            clips.append(
                ClipCodes(
                    video_id=str(video_id),
                    global_indices=global_indices[row],
                    local_indices=local_indices[row, :num_real],
                    sounding=_sounding_per_second(sidecar, str(video_id), num_real, where),
                )
            )
    if any((c.global_indices < 0).any() or (c.local_indices < 0).any() for c in clips):
        raise ConfigError("the model returned code index -1 (no quantiser): code analysis is not applicable")
    return clips


def _code_rows(codes_per_sub: Sequence[Sequence[int]], label_sets: Sequence[frozenset[str]], *, permutations: int, seed: int) -> list[dict[str, Any]]:
    """Rows per sub-space, pooled and joint for one level (per-second or per-clip samples)."""
    k = len(codes_per_sub)
    labels = [source_label(s) for s in label_sets]
    single = [i for i, s in enumerate(label_sets) if len(s) == 1]

    def nmi(codes: Sequence[Hashable], names: Sequence[str]) -> float:
        # one label value (or none): nothing for a code to explain, so no NMI (not the 1.0 convention)
        return normalized_mutual_information(codes, names) if len(set(names)) >= 2 else float("nan")

    def row(name: str, codes: Sequence[Hashable], sets: Sequence[frozenset[str]], single_idx: Sequence[int]) -> dict[str, Any]:
        names = [source_label(s) for s in sets]
        single_codes = [codes[i] for i in single_idx]
        single_labels = [names[i] for i in single_idx]
        varied = len(set(names)) >= 2
        return {
            "subspace": name,
            "samples": len(codes),
            "codes_used": len(set(codes)),
            "nmi": nmi(codes, names),
            "nmi_chance": chance_nmi(codes, names, permutations=permutations, seed=seed) if varied else float("nan"),
            "nmi_single": nmi(single_codes, single_labels),
            "single_samples": len(single_idx),
            "purity": purity(codes, sets),
        }

    rows = [row(str(i + 1), list(codes_per_sub[i]), label_sets, single) for i in range(k)]
    if k > 1:
        pooled_codes = [c for codes in codes_per_sub for c in codes]
        pooled_sets = list(label_sets) * k
        n = len(label_sets)
        pooled_single = [j * n + i for j in range(k) for i in single]
        rows.append(row("pooled", pooled_codes, pooled_sets, pooled_single))
        joint = [tuple(int(codes[i]) for codes in codes_per_sub) for i in range(len(labels))]
        rows.append(row("joint", joint, label_sets, single))
    return rows


def decomposition_tables(clips: Sequence[ClipCodes], *, permutations: int = 50, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{"second": rows, "clip": rows}``: per real second, the local codes [T, K] against the
    classes sounding in that second; per clip, the global codes [K] against the classes sounding at
    any time in the clip. Each row: sub-space (1..K, ``pooled`` over sub-spaces, ``joint`` K-tuple),
    samples, codes used, NMI, its chance level, NMI on single-source samples, purity. NMI is
    reported as nan where the labels take fewer than two values (nothing to explain)."""
    if not clips:
        raise ValueError("decomposition_tables: no clips")
    k = int(clips[0].global_indices.shape[0])
    second_sets = [s for clip in clips for s in clip.sounding]
    second_codes = [[int(c) for clip in clips for c in clip.local_indices[:, i]] for i in range(k)]
    clip_sets = [clip.clip_sources for clip in clips]
    clip_codes = [[int(clip.global_indices[i]) for clip in clips] for i in range(k)]
    return {
        "second": _code_rows(second_codes, second_sets, permutations=permutations, seed=seed),
        "clip": _code_rows(clip_codes, clip_sets, permutations=permutations, seed=seed),
    }


def subspace_agreement(indices: np.ndarray) -> float:
    """Share of sub-space pairs (i < j) that picked the same codeword, averaged over samples.

    ``indices [samples, K]`` (one shared codebook, so equal indices are the same code). 0 when every
    sample's K codes differ, 1 when all K sub-spaces always agree: then the "decomposition" gives K
    copies of one code and the sub-spaces cannot stand for different sources. nan for K < 2.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"subspace_agreement: expected [samples, K], got shape {indices.shape}")
    k = indices.shape[1]
    if k < 2 or indices.shape[0] == 0:
        return float("nan")
    rows, cols = np.triu_indices(k, 1)
    return float((indices[:, rows] == indices[:, cols]).mean())


def format_decomposition_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    header = ("sub-space", "samples", "codes used", "NMI", "NMI chance", "NMI 1-source (n)", "purity")
    parts = []
    titles = {
        "second": "Per second: local codes (quant['local_indices']) vs the classes sounding in that second",
        "clip": "Per clip: global codes (quant['global_indices']) vs the classes sounding in the clip",
    }
    for level, rows in tables.items():
        body = [
            (
                r["subspace"], str(r["samples"]), str(r["codes_used"]), _fmt(r["nmi"]), _fmt(r["nmi_chance"]),
                f"{_fmt(r['nmi_single'])} ({r['single_samples']})", _fmt(r["purity"]),
            )
            for r in rows
        ]
        parts.append(f"{titles[level]}\n\n{_markdown_table(header, body)}")
    return "\n\n".join(parts)


def analysis_dataset(cfg: Any, split: str) -> tuple[Any, Any]:
    """(data module, the single evaluation dataset of ``split``) of a composed eval config."""
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    names = list(datamodule.test_set_names if split == "test" else datamodule.val_set_names)
    if split == "train":
        names = list(datamodule.members)
    if len(names) != 1:
        raise ConfigError(f"data.subset={datamodule.subset!r} has {len(names)} sets {names}; pick one (data.test_sets=[...])")
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
    from avseg.eval import SPLITS, load_model, resolve_device

    cfg = compose_eval([f"ckpt_path={ckpt_path}", *overrides])
    data_source = choose_data_config(cfg, overrides)
    split = str(cfg.split)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: allowed values are {' | '.join(SPLITS)}")
    device = resolve_device(str(cfg.device))
    module = load_model(ckpt_path, device)
    datamodule, dataset = analysis_dataset(cfg, split)
    if bool(module.semantic) != bool(datamodule.semantic):
        raise ConfigError(f"data.subset={datamodule.subset!r} does not fit the checkpoint {ckpt_path} (binary vs semantic); pick data=...")
    sidecar = load_synth_sources(dataset.root) if need_sidecar else None
    batch_size = int(cfg.batch_size) if cfg.get("batch_size") is not None else int(datamodule.eval_batch_size)
    return AnalysisInputs(
        module=module, datamodule=datamodule, dataset=dataset, sidecar=sidecar, split=split, device=device,
        batch_size=batch_size, data_source=data_source,
    )


def run_decomposition(
    ckpt_path: str, overrides: Sequence[str], *, output_dir: Path, clips: str = "multi", permutations: int = 50
) -> dict[str, Any]:
    """The code / source table of a checkpoint on its SynthAVS data; writes ``decomposition.md`` and
    ``decomposition.json`` in ``output_dir``. For ``none`` prints and records "not applicable"."""
    from avseg.eval import load_model

    if clips not in ("multi", "all"):
        raise ConfigError(f"clips={clips!r}: allowed values are multi | all")
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = load_model(ckpt_path, torch.device("cpu"))
    variant = str(getattr(probe.net.decomposition, "variant", "unknown"))
    decomposition_cfg = dict(probe.hparams.get("decomposition") or {})
    del probe
    header = f"Decomposition analysis of {ckpt_path} (model/decomposition={variant})"
    payload: dict[str, Any] = {"ckpt_path": str(ckpt_path), "variant": variant}
    if variant == "none":
        text = f"{header}\n\nnot applicable: model/decomposition=none has no quantiser (its code indices are -1)\n"
        payload["applicable"] = False
    else:
        inputs = load_analysis_inputs(ckpt_path, overrides)
        assert inputs.sidecar is not None
        assignments = collect_clip_codes(inputs.module.net, inputs.dataset, inputs.sidecar, batch_size=inputs.batch_size, device=inputs.device)
        if clips == "multi":
            assignments = [c for c in assignments if len(c.clip_sources) > 1]
            if not assignments:
                raise DataError(inputs.dataset.root, f"no multi-source clip in the {inputs.split} split (an S4-style tree?); use clips=all")
        tables = decomposition_tables(assignments, permutations=permutations)
        k = int(assignments[0].global_indices.shape[0])
        agreement = {
            "second": subspace_agreement(np.concatenate([c.local_indices for c in assignments])),
            "clip": subspace_agreement(np.stack([c.global_indices for c in assignments])),
        }
        classes = sorted({c for clip in assignments for c in clip.clip_sources})
        text = (
            f"{header}\n{inputs.datamodule.subset} {inputs.split}, {len(assignments)} {'multi-source ' if clips == 'multi' else ''}clips, "
            f"K = {k}, codebook size N = {decomposition_cfg.get('codebook_size', 'n/a')}, "
            f"local calibration {'on' if decomposition_cfg.get('local_calibration', True) else 'off'}, "
            f"{len(classes)} sounding classes; NMI chance = mean NMI over {permutations} label permutations\n\n"
            f"{format_decomposition_tables(tables)}\n\n"
            f"sub-space agreement (share of sub-space pairs on the same codeword; 1 = the K codes are copies): "
            f"per second {_fmt(agreement['second'])}, per clip {_fmt(agreement['clip'])}\n"
        )
        payload.update(
            {
                "applicable": True, "num_clips": len(assignments), "clips": clips, "num_subspaces": k,
                "codebook_size": decomposition_cfg.get("codebook_size"), "classes": classes, "tables": tables,
                "subspace_agreement": agreement,
                "data_subset": inputs.datamodule.subset, "split": inputs.split, "data_config": inputs.data_source,
            }
        )
    _write_atomic(output_dir / "decomposition.md", text.encode())
    _write_json(output_dir / "decomposition.json", payload)
    print(text + f"\noutputs: {output_dir}", flush=True)
    return payload


# =============================================================================================
# data-side baselines: what the data allows without audio, and what a perfect listener loses


def _plans_of(sidecar: Mapping[str, Any], subset: str, split: str, video_ids: Sequence[str], where: Path) -> list[Any]:
    """The generator's plans of ``video_ids`` (re-drawn from the sidecar's resolved options; each
    clip has its own seeded generator), checked against the sidecar's sounding lists."""
    from avseg.data.synth import class_catalogue, plan_clip

    options = dict(sidecar.get("options") or {})
    if sidecar.get("subset") != subset or not options:
        raise DataError(where, f"the sidecar describes subset {sidecar.get('subset')!r} without options; expected {subset!r}")
    options["snr_db"] = tuple(options["snr_db"])
    catalogue = class_catalogue(int(options["num_classes"]))
    plans = []
    for video_id in video_ids:
        entry = sidecar["clips"].get(video_id)
        if entry is None:
            raise DataError(where, f"clip {video_id!r} is not in the sidecar")
        index = int(video_id.rsplit("-", 1)[1].split("_", 1)[0])
        plan = plan_clip(options=options, catalogue=catalogue, subset=subset, split=split, index=index)
        redrawn = [sorted(plan.classes[j].name for j in np.flatnonzero(plan.sounding[:, t])) for t in range(plan.num_frames)]
        recorded = [sorted(x["class"] for x in second) for second in entry["sounding"]]
        if redrawn != recorded:
            raise DataError(where, f"clip {video_id!r}: re-drawing it from the sidecar's options does not give its recorded sources (another generator version?)")
        plans.append(plan)
    return plans


def data_baselines(dataset: Any, sidecar: Mapping[str, Any], *, seed: int = 0, frames_per_batch: int = 20) -> list[dict[str, Any]]:
    """M_J / M_F of rule-based predictors on a binary SynthAVS split (scored by the project's
    metric at the dataset's image size, clip index * T + t as frame index):

    - ``all visible objects``: every object pixel, sounding or not (the best a model that ignores the
      audio can do when every class sounds equally often);
    - ``ideal listener, clean``: the objects whose class sounds in that second (the ground truth);
    - ``ideal listener, mute``: nothing (silence names no class);
    - ``ideal listener, swap``: the objects whose class sounds in that second of the partner clip
      whose audio `avseg.eval` swaps in (same seeded derangement as ``perturb=swap``).
    """
    import torch.nn.functional as F

    from avseg.data.perturb import clip_signature, derangement
    from avseg.metrics import BinaryAVSMetric

    if getattr(dataset, "semantic", False) or getattr(dataset, "subset", None) not in ("s4", "ms3"):
        raise ConfigError("data-baselines works on binary SynthAVS trees (s4 / ms3)")
    where = Path(dataset.root) / SIDECAR_NAME
    video_ids = [str(v) for v in dataset.video_ids]
    split = str(dataset.split)
    plans = _plans_of(sidecar, dataset.subset, split, video_ids, where)
    partner = derangement([clip_signature(dataset, i) for i in range(len(dataset))], seed=seed, names=video_ids)
    size = int(dataset.image_size)

    def resized(mask: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        return (F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0] > 0.5)

    predictors = ("all visible objects", "ideal listener, clean", "ideal listener, mute", "ideal listener, swap")
    metrics = {name: BinaryAVSMetric(frames_per_batch=frames_per_batch) for name in predictors}
    for index, plan in enumerate(plans):
        other = plans[partner[index]]
        truth, masks = [], {name: [] for name in predictors}
        for t in range(plan.num_frames):
            truth.append(resized(plan.sounding_mask(t)))
            masks["all visible objects"].append(resized(plan.instances[t] > 0))
            masks["ideal listener, clean"].append(truth[-1])
            masks["ideal listener, mute"].append(torch.zeros(size, size, dtype=torch.bool))
            heard = {other.classes[j].name for j in np.flatnonzero(other.sounding[:, t])}
            ids = [j + 1 for j, spec in enumerate(plan.classes) if spec.name in heard]
            masks["ideal listener, swap"].append(resized(np.isin(plan.instances[t], ids)))
        target = torch.stack(truth).long()
        frame_index = index * plan.num_frames + torch.arange(plan.num_frames)
        for name in predictors:
            logits = torch.stack(masks[name]).float() * 20.0 - 10.0
            metrics[name].update(logits, target, frame_index)
    rows = []
    for name in predictors:
        values = metrics[name].compute()
        rows.append({"predictor": name, "miou": float(values["miou"]), "fscore": float(values["fscore"])})
    return rows


SELECTIVITY_KINDS = ("heard objects", "unheard objects", "background")


def pixel_selectivity(
    predict: Callable[[Mapping[str, Any]], torch.Tensor],
    dataset: Any,
    sidecar: Mapping[str, Any],
    *,
    seed: int = 0,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Where a binary model's foreground goes, with the audio clean, muted and swapped, on a
    binary SynthAVS split: for each kind of pixel, the share predicted foreground.

    - ``heard objects``: pixels of the objects whose class sounds in the audio the model is given,
      at that second (its own clip's for ``none``, the partner clip's for ``swap``, none for ``mute``);
    - ``unheard objects``: the other object pixels (silent distractors, and for ``swap`` the clip's
      own sources that the partner's audio does not contain);
    - ``background``.

    A model that listens selects heard over unheard objects by the same margin whatever audio it
    gets; one that segments "whatever usually sounds" keeps its masks when the audio changes.
    ``predict(batch) -> bool [B, T, H, W]`` at the dataset's image size. Partners: the seeded
    derangement of ``perturb=swap``.
    """
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips
    from avseg.data.perturb import PerturbedDataset, clip_signature, derangement

    if getattr(dataset, "semantic", False) or getattr(dataset, "subset", None) not in ("s4", "ms3"):
        raise ConfigError("selectivity works on binary SynthAVS trees (s4 / ms3)")
    where = Path(dataset.root) / SIDECAR_NAME
    video_ids = [str(v) for v in dataset.video_ids]
    plans = _plans_of(sidecar, dataset.subset, str(dataset.split), video_ids, where)
    partner = derangement([clip_signature(dataset, i) for i in range(len(dataset))], seed=seed, names=video_ids)
    size = int(dataset.image_size)
    rows = []
    for perturb in ("none", "mute", "swap"):
        source = dataset if perturb == "none" else PerturbedDataset(dataset, mode=perturb, seed=seed)
        hits = {kind: 0 for kind in SELECTIVITY_KINDS}
        totals = {kind: 0 for kind in SELECTIVITY_KINDS}
        for batch in DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=collate_clips):
            foreground = predict(batch).cpu()
            for row, index in enumerate(batch["index"].tolist()):
                plan = plans[index]
                played = plans[partner[index]] if perturb == "swap" else plan
                for t in range(plan.num_frames):
                    instances = torch.from_numpy(plan.instances[t].astype(np.int64))[None, None].float()
                    instances = torch.nn.functional.interpolate(instances, size=(size, size), mode="nearest")[0, 0].long()
                    heard = set() if perturb == "mute" else {played.classes[j].name for j in np.flatnonzero(played.sounding[:, t])}
                    heard_ids = torch.tensor([j + 1 for j, spec in enumerate(plan.classes) if spec.name in heard], dtype=torch.long)
                    is_heard = torch.isin(instances, heard_ids)
                    kinds = {
                        "heard objects": is_heard,
                        "unheard objects": (instances > 0) & ~is_heard,
                        "background": instances == 0,
                    }
                    predicted = foreground[row, t]
                    for kind, where_kind in kinds.items():
                        hits[kind] += int(predicted[where_kind].sum())
                        totals[kind] += int(where_kind.sum())
        rows.append(
            {
                "perturb": perturb,
                **{kind: (hits[kind] / totals[kind] if totals[kind] else None) for kind in SELECTIVITY_KINDS},
                "pixels": dict(totals),
            }
        )
    return rows


def run_selectivity(ckpt_path: str, overrides: Sequence[str], *, output_dir: Path) -> dict[str, Any]:
    """`pixel_selectivity` of a checkpoint on its SynthAVS evaluation split; writes
    ``selectivity.md`` / ``.json``."""
    from avseg.models.postprocess import binary_logits

    inputs = load_analysis_inputs(ckpt_path, overrides)
    assert inputs.sidecar is not None
    if inputs.module.semantic:
        raise ConfigError(f"selectivity works on binary checkpoints; {ckpt_path} is semantic (AVSS)")
    net = inputs.module.net.eval()
    device = inputs.device
    seed = int(compose_eval([f"ckpt_path={ckpt_path}", *overrides]).perturb_seed)

    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            outputs = net(batch["frames"].to(device), batch["audio"].to(device), batch["frame_valid"].to(device))
            size = tuple(batch["masks"].shape[-2:])
            return rearrange(binary_logits(outputs, size) > 0, "(b t) h w -> b t h w", b=batch["masks"].shape[0])

    rows = pixel_selectivity(predict, inputs.dataset, inputs.sidecar, seed=seed, batch_size=inputs.batch_size)
    table = _markdown_table(
        ("audio", *SELECTIVITY_KINDS),
        [(r["perturb"], *(_fmt(r[kind], 3) if r[kind] is not None else "n/a" for kind in SELECTIVITY_KINDS)) for r in rows],
    )
    text = (
        f"Share of each kind of pixel predicted foreground: {ckpt_path} on {inputs.datamodule.subset} {inputs.split} "
        f"({len(inputs.dataset)} clips; swap seed {seed}; heard = the objects whose class sounds in the audio given)\n\n{table}\n"
    )
    payload = {"ckpt_path": str(ckpt_path), "rows": rows, "split": inputs.split, "num_clips": len(inputs.dataset), "data_config": inputs.data_source}
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(output_dir / "selectivity.md", text.encode())
    _write_json(output_dir / "selectivity.json", payload)
    print(text + f"\noutputs: {output_dir}", flush=True)
    return payload


def run_data_baselines(words_ckpt: str | None, overrides: Sequence[str], *, output_dir: Path) -> dict[str, Any]:
    """`data_baselines` on the evaluation split of a checkpoint's data (or of the data overrides);
    writes ``data_baselines.md`` / ``.json``."""
    cfg = compose_eval([f"ckpt_path={words_ckpt}" if words_ckpt else "ckpt_path=none", *overrides])
    data_source = choose_data_config(cfg, overrides) if words_ckpt else ("command line" if overrides else "conf/eval.yaml default")
    split = str(cfg.split)
    datamodule, dataset = analysis_dataset(cfg, split)
    sidecar = load_synth_sources(dataset.root)
    batch_size = int(cfg.batch_size) if cfg.get("batch_size") is not None else int(datamodule.eval_batch_size)
    frames_per_batch = batch_size * int(datamodule.num_frames)
    rows = data_baselines(dataset, sidecar, seed=int(cfg.perturb_seed), frames_per_batch=frames_per_batch)
    table = _markdown_table(("predictor", "M_J (mIoU)", "M_F (F-score)"), [(r["predictor"], _fmt(r["miou"]), _fmt(r["fscore"])) for r in rows])
    text = (
        f"Rule-based baselines on {datamodule.subset} {split} ({len(dataset)} clips, {dataset.root}; "
        f"F-score batch {frames_per_batch} frames; swap seed {int(cfg.perturb_seed)})\n\n{table}\n"
    )
    payload = {"rows": rows, "data_subset": datamodule.subset, "split": split, "num_clips": len(dataset), "root": str(dataset.root), "data_config": data_source}
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(output_dir / "data_baselines.md", text.encode())
    _write_json(output_dir / "data_baselines.json", payload)
    print(text + f"\noutputs: {output_dir}", flush=True)
    return payload


# =============================================================================================
# ablation summary


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def split_overrides(text: str) -> list[str]:
    """Hydra's space-joined override string -> the overrides (spaces inside quotes, brackets or
    braces belong to the value: ``a='x y' b={k: 1}``)."""
    words: list[str] = []
    current: list[str] = []
    depth = 0
    quote = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(depth - 1, 0)
        elif char.isspace() and depth == 0:
            if current:
                words.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        words.append("".join(current))
    return words


def summarise_sweeps(
    sweep_dirs: Sequence[str | os.PathLike],
    *,
    metrics: Sequence[str] = ("test/miou", "test/fscore"),
    drop_keys: Sequence[str] = ("seed",),
    job_metrics: Callable[[Path, Mapping[str, str]], Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Rows of the sweeps' ``summary.csv`` grouped by their overrides minus ``drop_keys`` (the
    seed), in order of first appearance.

    Returns ``{"common": overrides shared by every job, "rows": [...]}``; each row holds
    ``overrides`` (the group's overrides minus the common ones and the dropped keys), ``runs``,
    ``failed``, ``seeds`` (the dropped values seen) and per metric ``(mean, std, n)`` over the jobs
    with status ``ok``: sample standard deviation (ddof = 1; nan for a single run).
    ``job_metrics(job_dir, record)``, when given, adds measured values to each ``ok`` job's record
    before grouping (``<sweep dir>/<job>``: Hydra's sweep subdir is the job number); ``metrics``
    may name them.
    """
    if not sweep_dirs:
        raise ConfigError("ablation-summary: give at least one sweep directory")
    jobs: list[tuple[Path, dict[str, str], list[str]]] = []
    for sweep_dir in sweep_dirs:
        path = Path(sweep_dir) / "summary.csv"
        if not path.is_file():
            raise DataError(path, "no summary.csv: not a finished avseg multirun sweep directory")
        try:
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                records = list(reader)
                fields = reader.fieldnames or []
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            raise DataError(path, f"unreadable CSV: {error}") from error
        missing = [c for c in ("status", "overrides") if c not in fields]
        if missing:
            raise DataError(path, f"missing columns {missing} (header: {fields})")
        jobs += [(path, record, split_overrides(record.get("overrides") or "")) for record in records]
    if not jobs:
        raise DataError(Path(sweep_dirs[0]) / "summary.csv", "no jobs in the sweep summaries")
    kept = [[w for w in words if _override_key(w) not in drop_keys] for _, _, words in jobs]
    common = [w for w in kept[0] if all(w in other for other in kept[1:])] if len(jobs) > 1 else []
    groups: dict[str, dict[str, Any]] = {}
    for (path, record, words), own in zip(jobs, kept):
        key = " ".join(w for w in own if w not in common) or "(common overrides only)"
        group = groups.setdefault(key, {"overrides": key, "runs": 0, "failed": 0, "seeds": [], "values": {m: [] for m in metrics}})
        group["runs"] += 1
        group["seeds"] += [w.split("=", 1)[1] for w in words if _override_key(w) in drop_keys and "=" in w]
        if record.get("status") != "ok":
            group["failed"] += 1
            continue
        if job_metrics is not None:
            job_dir = path.parent / str(record.get("job", ""))
            if not str(record.get("job", "")).strip() or not job_dir.is_dir():
                raise DataError(path, f"job {record.get('job')!r}: no job directory {job_dir}")
            record = {**record, **{k: str(v) for k, v in job_metrics(job_dir, record).items()}}
        for metric in metrics:
            text = (record.get(metric) or "").strip()
            if not text:
                raise DataError(path, f"job {record.get('job')} has status ok but no {metric!r} value (columns: {sorted(record)})")
            try:
                group["values"][metric].append(float(text))
            except ValueError:
                raise DataError(path, f"job {record.get('job')}: {metric}={text!r} is not a number") from None
    rows = []
    for group in groups.values():
        row: dict[str, Any] = {k: group[k] for k in ("overrides", "runs", "failed", "seeds")}
        for metric, values in group["values"].items():
            array = np.asarray(values, dtype=np.float64)
            mean = float(array.mean()) if array.size else float("nan")
            std = float(array.std(ddof=1)) if array.size > 1 else float("nan")
            row[metric] = (mean, std, int(array.size))
        rows.append(row)
    return {"common": common, "rows": rows}


def format_summary_markdown(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    header = ["overrides (minus common and seed)", "seeds", "runs ok / all", *[f"{m} mean ± std" for m in metrics]]
    body = []
    for row in rows:
        cells = [f"`{row['overrides']}`", ",".join(row["seeds"]) or "-", f"{row['runs'] - row['failed']} / {row['runs']}"]
        for metric in metrics:
            mean, std, n = row[metric]
            cells.append("n/a" if n == 0 else f"{mean:.4f} ± {_fmt(std)}")
        body.append(cells)
    return _markdown_table(header, body)


RELIANCE_METRICS = ("reliance/mute_drop", "reliance/swap_drop")


def job_reliance(job_dir: Path, record: Mapping[str, str]) -> dict[str, float]:
    """Relative M_J drops under mute and swap of a sweep job's ``checkpoints/best.ckpt``, from
    ``<job_dir>/reliance/reliance.json``; ``run_reliance`` writes it there first when it is missing
    or older than the checkpoint (the job's own run directory: nothing of the data is touched)."""
    ckpt = job_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise DataError(ckpt, f"job {record.get('job')}: no best checkpoint for the reliance columns")

    def drops(payload: Mapping[str, Any]) -> dict[str, float]:
        rows = {row["perturb"]: row for row in payload["rows"]}
        # JSON stores an undefined drop (clean M_J of 0) as null
        return {
            f"reliance/{name}_drop": float("nan") if rows[name]["miou_drop"] is None else float(rows[name]["miou_drop"])
            for name in ("mute", "swap")
        }

    result = job_dir / "reliance" / "reliance.json"
    if result.is_file() and result.stat().st_mtime >= ckpt.stat().st_mtime:
        try:
            return drops(json.loads(result.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or partial: measured again below and replaced atomically
    return drops(run_reliance(str(ckpt), [], output_dir=job_dir / "reliance"))


def run_ablation_summary(
    sweep_dirs: Sequence[str],
    *,
    metrics: Sequence[str],
    drop_keys: Sequence[str],
    output: Path | None,
    reliance: bool = False,
) -> dict[str, Any]:
    """Prints the grouped table; writes ``<output>`` (markdown) and the same name with ``.csv``
    (default: ``ablation_summary.md`` in the first sweep directory). ``reliance`` adds the mean
    relative M_J drops under mute and swap (``job_reliance``) as two more columns."""
    if reliance:
        metrics = [*metrics, *(m for m in RELIANCE_METRICS if m not in metrics)]
    summary = summarise_sweeps(
        sweep_dirs, metrics=metrics, drop_keys=drop_keys, job_metrics=job_reliance if reliance else None
    )
    rows = summary["rows"]
    table = format_summary_markdown(rows, metrics)
    sources = ", ".join(f"`{Path(d) / 'summary.csv'}`" for d in sweep_dirs)
    common = " ".join(summary["common"]) or "(none)"
    text = (
        f"# Ablation summary\n\nFrom {sources}. Mean ± sample std (ddof = 1) over the jobs of each row "
        f"({', '.join(drop_keys)} removed from the overrides before grouping; failed jobs are counted, not averaged).\n\n"
        f"Overrides common to every job: `{common}`\n\n{table}\n"
    )
    output = output if output is not None else Path(sweep_dirs[0]) / "ablation_summary.md"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["overrides", "seeds", "runs", "failed", *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]])
    for row in rows:
        values = [v for m in metrics for v in row[m]]
        writer.writerow([row["overrides"], " ".join(row["seeds"]), row["runs"], row["failed"], *[f"{v:.6g}" if isinstance(v, float) else v for v in values]])
    _write_atomic(output, text.encode())
    _write_atomic(output.with_suffix(".csv"), buffer.getvalue().encode())
    print(text + f"\nwritten: {output} and {output.with_suffix('.csv')}", flush=True)
    return summary


# =============================================================================================
# command line


def _split_words(words: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """key=value words -> (values of the analysis' own keys, the remaining eval overrides)."""
    own: dict[str, list[str]] = {}
    rest: list[str] = []
    for word in words:
        if "=" not in word:
            raise ConfigError(f"{word!r}: expected key=value (e.g. ckpt_path=PATH)")
        key, value = word.split("=", 1)
        if key in ("ckpt_path", "snr", "clips"):
            own.setdefault(key, []).append(value)
        else:
            rest.append(word)
    return own, rest


def _ckpt_paths(own: Mapping[str, list[str]], *, single: bool) -> list[str]:
    paths = [p for value in own.get("ckpt_path", []) for p in value.split(",") if p]
    if not paths:
        raise ConfigError("ckpt_path is required: ckpt_path=<run dir>/checkpoints/best.ckpt")
    if single and len(paths) != 1:
        raise ConfigError(f"this command takes one checkpoint, got {len(paths)}: {paths}")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avseg.analysis", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=None, help="output folder (default: $AVSEG_OUTPUTS/analysis/<command>/<time>)")

    reliance = commands.add_parser("reliance", parents=[common], help="M_J / M_F with the audio clean, muted, swapped")
    reliance.add_argument("words", nargs="*", help="ckpt_path=PATH and eval overrides (split=..., data....)")
    reliance.add_argument("--require-drop", type=float, default=None, metavar="FRACTION", help="exit 3 unless M_J drops by at least FRACTION under mute and swap")

    noise = commands.add_parser("noise", parents=[common], help="M_J / M_F against the SNR of added white noise")
    noise.add_argument("words", nargs="*", help="ckpt_path=A [ckpt_path=B ...] [snr=clean,20,10,5,0,-5] and eval overrides")
    noise.add_argument("--labels", default=None, help="comma-separated curve labels (default: each checkpoint's decomposition variant)")
    noise.add_argument("--name", default="noise_robustness", help="base name of the .md / .json / .png files")
    noise.add_argument("--average", action="store_true", help="one curve per label (mean ± std over its checkpoints, e.g. seeds)")

    decomposition = commands.add_parser("decomposition", parents=[common], help="NMI / purity of the sub-space codes against the true sources")
    decomposition.add_argument("words", nargs="*", help="ckpt_path=PATH [clips=multi|all] [split=test] and eval overrides")
    decomposition.add_argument("--permutations", type=int, default=50, help="label permutations for the NMI chance level")

    selectivity = commands.add_parser("selectivity", parents=[common], help="share of heard / unheard object pixels predicted, audio clean, muted, swapped")
    selectivity.add_argument("words", nargs="*", help="ckpt_path=PATH and eval overrides (split=..., data....)")

    baselines = commands.add_parser("data-baselines", parents=[common], help="audio-free and ideal-listener M_J / M_F on a SynthAVS split")
    baselines.add_argument("words", nargs="*", help="[ckpt_path=PATH] (its data) or data overrides, [split=test]")

    ablation = commands.add_parser("ablation-summary", help="mean ± std over seeds of multirun sweeps")
    ablation.add_argument("sweep_dirs", nargs="+", help="sweep directories holding summary.csv")
    ablation.add_argument("--metrics", default="test/miou,test/fscore", help="comma-separated metric columns")
    ablation.add_argument("--drop-keys", default="seed", help="comma-separated override keys ignored when grouping")
    ablation.add_argument("--out", type=Path, default=None, help="markdown file (a .csv is written beside it)")
    ablation.add_argument("--reliance", action="store_true", help="also the M_J drops under mute and swap of every job's best.ckpt (written to <job>/reliance/)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from avseg.cli import report_error

    args = build_parser().parse_args(argv)
    try:
        if args.command == "ablation-summary":
            metrics = [m for m in args.metrics.split(",") if m]
            drop_keys = [k for k in args.drop_keys.split(",") if k]
            run_ablation_summary(args.sweep_dirs, metrics=metrics, drop_keys=drop_keys, output=args.out, reliance=args.reliance)
            return 0
        own, overrides = _split_words(args.words)
        output_dir = args.out if args.out is not None else default_output_dir(args.command)
        if args.command == "reliance":
            if args.require_drop is not None and not 0.0 <= args.require_drop <= 1.0:
                raise ConfigError(f"--require-drop {args.require_drop}: a fraction in [0, 1]")
            payload = run_reliance(_ckpt_paths(own, single=True)[0], overrides, output_dir=output_dir, require_drop=args.require_drop)
            return EXIT_REQUIREMENT if payload["passed"] is False else 0
        if args.command == "noise":
            snrs = parse_snr_list(",".join(own.get("snr", [",".join(DEFAULT_SNRS)])))
            labels = [label for label in args.labels.split(",")] if args.labels else None
            run_noise(
                _ckpt_paths(own, single=False), overrides, snrs=snrs, output_dir=output_dir, labels=labels,
                name=args.name, average=args.average,
            )
            return 0
        if args.command == "decomposition":
            clips = own.get("clips", ["multi"])[-1]
            if args.permutations < 1:
                raise ConfigError(f"--permutations {args.permutations}: an integer >= 1")
            run_decomposition(_ckpt_paths(own, single=True)[0], overrides, output_dir=output_dir, clips=clips, permutations=args.permutations)
            return 0
        if args.command == "selectivity":
            run_selectivity(_ckpt_paths(own, single=True)[0], overrides, output_dir=output_dir)
            return 0
        if args.command == "data-baselines":
            paths = [p for value in own.get("ckpt_path", []) for p in value.split(",") if p]
            if len(paths) > 1:
                raise ConfigError(f"data-baselines takes at most one checkpoint, got {paths}")
            run_data_baselines(paths[0] if paths else None, overrides, output_dir=output_dir)
            return 0
        raise ConfigError(f"unknown command {args.command!r}")
    except AvsegError as error:
        report_error(error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
