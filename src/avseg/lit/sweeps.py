"""The sweep summary (a Hydra callback): ``summary.md`` / ``summary.csv`` in a multirun's sweep
directory, one row per job (failed jobs included), written by each job's rank 0."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from avseg.io import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["JOB_STATUS_FILE", "SweepSummary", "write_sweep_summary"]

JOB_STATUS_FILE = "job_status.json"


def _launched_rank() -> int:
    """The global rank a cluster launcher gave this process (torchrun: RANK; SLURM: SLURM_PROCID)."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


class SweepSummary(HydraCallback):
    """After every multirun job, records ``<job dir>/job_status.json`` (job number, overrides, ok /
    failed, error) and rewrites ``summary.csv`` and ``summary.md`` in the sweep directory from all
    jobs' status files and ``metrics.json`` files. Rewriting after each job (atomically) keeps the
    summary complete even when the sweep stops early, and works when jobs run on other machines
    (the submitit launcher) since each row comes from files in the shared sweep directory.
    """

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN or _launched_rank() != 0:
            return  # a job of several processes (SLURM tasks, torchrun): its rank 0 records it
        from hydra.core.utils import JobStatus

        job_dir = Path(hydra_cfg.runtime.output_dir)
        ok = job_return.status == JobStatus.COMPLETED
        error = ""
        if not ok:
            value = job_return._return_value
            # the whole message on one line (a config error lists one problem per line)
            error = " ".join(f"{type(value).__name__}: {value}".split())[:500] if value is not None else "unknown"
        record = {
            "job": int(hydra_cfg.job.num),
            "overrides": " ".join(str(o) for o in job_return.overrides or []),
            "status": "ok" if ok else "failed",
            "error": error,
            "dir": str(job_dir),
        }
        write_json_atomic(job_dir / JOB_STATUS_FILE, record)
        write_sweep_summary(Path(hydra_cfg.sweep.dir))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        write_sweep_summary(Path(config.hydra.sweep.dir))


def write_sweep_summary(sweep_dir: Path) -> tuple[Path, Path] | None:
    """Builds ``summary.csv`` / ``summary.md`` from the job folders of ``sweep_dir``."""
    rows = []
    for status_file in sorted(sweep_dir.glob(f"*/{JOB_STATUS_FILE}")):
        record = json.loads(status_file.read_text())
        metrics_file = status_file.parent / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        rows.append((record, metrics))
    if not rows:
        return None
    rows.sort(key=lambda row: row[0]["job"])
    metric_names = sorted({name for _, metrics in rows for name in metrics})
    header = ["job", "status", "overrides", *metric_names, "error"]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "" if value is None else str(value)

    table = [
        [
            cell(record["job"]),
            record["status"],
            record["overrides"],
            *[cell(metrics.get(m)) for m in metric_names],
            record["error"],
        ]
        for record, metrics in rows
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(table)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    write_bytes_atomic(csv_path, buffer.getvalue().encode())
    failed = sum(record["status"] != "ok" for record, _ in rows)
    lines = [
        f"# Sweep summary: {sweep_dir.name}",
        "",
        f"{len(rows)} jobs, {len(rows) - failed} ok, {failed} failed.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in table:
        lines.append("| " + " | ".join(value.replace("|", "\\|") for value in row) + " |")
    write_bytes_atomic(md_path, ("\n".join(lines) + "\n").encode())
    return csv_path, md_path
