"""``python -m avseg.analysis ablation-summary``: the rows of multirun sweeps' ``summary.csv`` grouped
by their overrides minus the seed, mean +- std per group (markdown and CSV), optionally with the
reliance drops of every job's best checkpoint."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avseg.analysis.common import fmt, markdown_table, write_bytes_atomic
from avseg.analysis.reliance import run_reliance
from avseg.errors import ConfigError, DataError

__all__ = [
    "split_overrides",
    "summarise_sweeps",
    "format_summary_markdown",
    "RELIANCE_METRICS",
    "job_reliance",
    "run_ablation_summary",
]

log = logging.getLogger(__name__)


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
        group = groups.setdefault(
            key, {"overrides": key, "runs": 0, "failed": 0, "seeds": [], "values": {m: [] for m in metrics}}
        )
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
                raise DataError(
                    path, f"job {record.get('job')} has status ok but no {metric!r} value (columns: {sorted(record)})"
                )
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
        cells = [
            f"`{row['overrides']}`",
            ",".join(row["seeds"]) or "-",
            f"{row['runs'] - row['failed']} / {row['runs']}",
        ]
        for metric in metrics:
            mean, std, n = row[metric]
            cells.append("n/a" if n == 0 else f"{mean:.4f} ± {fmt(std)}")
        body.append(cells)
    return markdown_table(header, body)


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
        f"({', '.join(drop_keys)} removed from the overrides before grouping; failed jobs are counted, not "
        "averaged).\n\n"
        f"Overrides common to every job: `{common}`\n\n{table}\n"
    )
    output = output if output is not None else Path(sweep_dirs[0]) / "ablation_summary.md"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["overrides", "seeds", "runs", "failed", *[f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]]
    )
    for row in rows:
        values = [v for m in metrics for v in row[m]]
        writer.writerow(
            [
                row["overrides"],
                " ".join(row["seeds"]),
                row["runs"],
                row["failed"],
                *[f"{v:.6g}" if isinstance(v, float) else v for v in values],
            ]
        )
    write_bytes_atomic(output, text.encode())
    write_bytes_atomic(output.with_suffix(".csv"), buffer.getvalue().encode())
    log.info(text + f"\nwritten: {output} and {output.with_suffix('.csv')}")
    return summary
