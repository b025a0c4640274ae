"""benchmarks/gpu_check.py on the CPU (issue 17): argument parsing, the kernel table's code at a
tiny size (grid_sample and torch path; Triton needs CUDA), the loader + training-step loop on a
tiny model and tree, the backend report, the report itself, and the clear stop without a GPU."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
from bench_common import build_module, compose_experiment  # noqa: E402
from helpers_train import TINY_MODEL, TINY_SYNTH  # noqa: E402

TINY_SIZE = ("tiny", dict(batch=2, level_shapes=[(5, 6), (3, 3)], heads=2, head_dim=4, points=2))


def test_parse_args_defaults_and_errors() -> None:
    args = gpu_check.parse_args([])
    assert args.sizes == ["avs", "detr"] and args.dtypes == ["fp32", "fp16", "bf16"]
    assert args.impls == ["grid_sample", "torch", "triton"] and args.steps == 100 and args.skip == []
    args = gpu_check.parse_args(["--sizes", "avs", "--dtypes", "bf16", "--skip", "training", "--steps", "3"])
    assert args.sizes == ["avs"] and args.dtypes == ["bf16"] and args.skip == ["training"] and args.steps == 3
    with pytest.raises(SystemExit, match="--dtypes"):
        gpu_check.parse_args(["--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "0"])


def test_main_without_gpu_stops_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_check.NoGPUError, match="needs a CUDA GPU"):
        gpu_check.main(["--steps", "1"])


def test_kernel_rows_and_table_on_cpu() -> None:
    rows = gpu_check.kernel_rows(
        torch.device("cpu"),
        sizes=[TINY_SIZE],
        dtypes=["fp32", "bf16"],
        impls=["grid_sample", "torch"],
        repeats=2,
        peak_gbps=100.0,
    )
    assert [(r["dtype"], r["impl"]) for r in rows] == [
        ("fp32", "grid_sample"),
        ("fp32", "torch"),
        ("bf16", "grid_sample"),
        ("bf16", "torch"),
    ]
    for row in rows:
        assert row["dtypes_ok"], row
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0 and row["forward_floor"] == row["forward_gbps"] / 100.0
        # vs fp64 on the same rounded inputs: fp32 rounding; in bf16 the torch path accumulates in fp32
        # (one rounding of the result), grid_sample in bf16 (several)
        tolerance = {"fp32": 1e-5, "bf16": 1e-2 if row["impl"] == "torch" else 5e-2}[row["dtype"]]
        assert max(row["errors"][k] for k in ("out", "grad_value", "grad_attn")) < tolerance, row
    table = gpu_check.kernel_table(rows)
    assert len(table) == 2 + len(rows) and all(line.count("|") == table[0].count("|") for line in table)
    assert gpu_check.verdict_lines(rows, None)[0].startswith("- PASS")
    bad = dict(rows[1], errors=dict(rows[1]["errors"], out=1.0))
    assert gpu_check.verdict_lines([bad], None)[0].startswith("- FAIL: torch tiny fp32")
    bad_reference = dict(rows[0], errors=dict(rows[0]["errors"], out=1.0))  # grid_sample: reported, not judged
    assert gpu_check.verdict_lines([bad_reference], None)[0].startswith("- PASS")


def test_a_failing_implementation_is_a_fail_row_not_a_crash() -> None:
    rows = gpu_check.kernel_rows(
        torch.device("cpu"), sizes=[TINY_SIZE], dtypes=["fp32"], impls=["torch", "triton"], repeats=1, peak_gbps=None
    )
    failed = [r for r in rows if "error" in r]
    assert [r["impl"] for r in failed] == ["triton"] and "BackendUnavailableError" in failed[0]["error"]
    assert any(line.startswith("- FAIL: triton tiny fp32") for line in gpu_check.verdict_lines(rows, None))
    assert "FAILED" in gpu_check.kernel_table(rows)[-1]


def test_loader_and_training_steps_on_cpu(tmp_path: Path) -> None:
    cfg = compose_experiment(["experiment=synth_s4", *TINY_SYNTH, *TINY_MODEL, "model.ms_deform_backend=auto"])
    batches, loader = gpu_check.synth_batches(cfg, cache=tmp_path, clips=4, workers=0, passes=1, keep=2)
    assert len(batches) == 2 and loader["loader_clips_per_s"] > 0 and loader["clips"] == 4
    assert batches[0]["frames"].shape == (2, 5, 3, 48, 48)
    torch.manual_seed(0)
    module = build_module(cfg)
    with gpu_check.recording_backends() as calls:
        result = gpu_check.train_steps(
            module, batches, steps=3, device=torch.device("cpu"), autocast_dtype=torch.bfloat16
        )
    assert result["nonfinite_losses"] == 0 and result["finite_params"] and len(result["losses"]) == 3
    assert all(math.isfinite(loss) for loss in result["losses"]) and result["clips_per_s"] > 0
    assert result["warmup_steps"] == 1 and result["peak_memory_gib"] is None
    assert set(calls) == {("auto", "torch")} and sum(calls.values()) > 0  # one call per attention layer and step
    lines = gpu_check.training_lines(result, loader, frames_per_clip=5)
    assert any("training clips/s" in line for line in lines) and any("data loader clips/s" in line for line in lines)

    backends = gpu_check.backend_lines(torch.device("cpu"), calls)
    assert backends[0] == "- `auto` for cpu tensors: **torch**" and "auto -> torch" in backends[2]
    assert not torch.are_deterministic_algorithms_enabled()  # restored
    report = gpu_check.build_report(
        header=["header"],
        kernels=None,
        training=lines,
        backends=backends,
        verdict=gpu_check.verdict_lines(None, result),
    )
    assert report.startswith("# avseg GPU check") and "skipped (--skip kernels)" in report
    assert report.index("## (a)") < report.index("## (b)") < report.index("## (c)") < report.index("## Verdict")
    assert "- PASS" in report
    assert gpu_check.verdict_lines(None, "RuntimeError: boom") == ["- FAIL: training: RuntimeError: boom"]


def test_write_atomically(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    gpu_check.write_atomically(target, "text\n")
    assert target.read_text() == "text\n" and list(target.parent.iterdir()) == [target]


def test_script_without_gpu_exits_with_the_reason() -> None:
    import os
    import subprocess

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, str(Path(gpu_check.__file__)), "--steps", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1 and "gpu_check: benchmarks/gpu_check.py needs a CUDA GPU" in proc.stderr, proc.stderr[
        -2000:
    ]


def test_loader_worker_failure_is_reported_and_measured_without_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = gpu_check._time_loader

    def failing_with_workers(dataset, *, workers, **kwargs):
        if workers > 0:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Bus error")
        return original(dataset, workers=workers, **kwargs)

    monkeypatch.setattr(gpu_check, "_time_loader", failing_with_workers)
    cfg = compose_experiment(["experiment=synth_s4", *TINY_SYNTH, *TINY_MODEL])
    batches, loader = gpu_check.synth_batches(cfg, cache=tmp_path, clips=2, workers=4, passes=1, keep=1)
    assert len(batches) == 1 and loader["workers"] == 0
    assert loader["error"].startswith("4 workers failed (RuntimeError: DataLoader worker")
