"""Slow training-system tests (real ``python -m avseg.train`` processes on tiny synthetic data):
a short run's outputs, 2-process CPU DDP against a single-process evaluation, a multirun summary
with a failing job, mid-epoch resume equivalence, a real SIGKILL mid-epoch, the final state kept
and tested however fit ends (max_steps mid-epoch, max_time, SIGTERM, Ctrl-C), non-finite losses.
The cluster runs (SLURM, torchrun, DDP resume): tests/test_cluster_slow.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_train import QUIET, REPO, TINY_MODEL, TINY_SYNTH, compose_train, run_train, train_env

pytestmark = pytest.mark.slow

BASE = ["experiment=synth_ms3", *TINY_SYNTH, *TINY_MODEL, *QUIET]
# 8 training clips, batch 2: 4 optimizer steps per epoch
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("AVSEG_CACHE") or tmp_path_factory.mktemp("cache"))


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state_dict(a), _state_dict(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------------------
# a short real run


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("short") / "run"
    proc = run_train([*BASE, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], cache_dir=cache_dir)
    return run_dir, proc


def test_short_run_writes_metrics_and_checkpoints(short_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = short_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "val/miou",
        "val/fscore",
        "val/fscore_global",
        "test/miou",
        "test/fscore",
        "test/fscore_global",
        "val/miou_best",
    ):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    assert "train/loss_epoch" in metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    # every checkpoint loads with weights_only=True (RNG states and loader positions included)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    assert isinstance(checkpoint["callbacks"]["ResumeState"]["rng"]["torch"], torch.Tensor)
    # the printed table and where the outputs went
    assert "M_J (mIoU)" in proc.stdout and "M_F (F-score)" in proc.stdout
    assert f"{metrics['test/miou']:.4f}" in proc.stdout
    assert str(run_dir) in proc.stdout


def test_checkpoint_loads_standalone_and_the_demo_tests_the_last(
    short_run: tuple[Path, subprocess.CompletedProcess], cache_dir: Path
) -> None:
    """``load_from_checkpoint`` needs no Hydra, and evaluating last.ckpt again reproduces the run's
    test metrics (the demo experiment sets test_ckpt=last)."""
    import lightning.pytorch as pl

    from avseg.lit.module import AVSLitModule

    run_dir, proc = short_run
    best = run_dir / "checkpoints" / "best.ckpt"
    plain = AVSLitModule.load_from_checkpoint(best, map_location="cpu")
    assert all(not hasattr(v, "_metadata") for v in plain.hparams.values())
    module = AVSLitModule.load_trained(run_dir / "checkpoints" / "last.ckpt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    got = _evaluate(module, cache_dir, run_dir)
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert (
        "last checkpoint" in proc.stdout
        and f"tested       : last ({run_dir / 'checkpoints' / 'last.ckpt'}, step {2 * STEPS_PER_EPOCH})" in proc.stdout
    )
    assert metrics["test/ckpt_path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert metrics["test/ckpt_step"] == 2 * STEPS_PER_EPOCH
    assert isinstance(pl.__version__, str)


def test_test_ckpt_best_tests_the_best_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    """test_ckpt=best (the default outside the demo): the run's test metrics are best.ckpt's."""
    from avseg.lit.module import AVSLitModule

    run_dir = tmp_path / "run"
    proc = run_train([*BASE, "test_ckpt=best", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], cache_dir=cache_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    got = _evaluate(AVSLitModule.load_trained(run_dir / "checkpoints" / "best.ckpt"), cache_dir, run_dir)
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert "best checkpoint by val/miou" in proc.stdout
    assert f"tested       : best ({run_dir / 'checkpoints' / 'best.ckpt'}, step " in proc.stdout
    best_step = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert (
        metrics["test/ckpt_path"] == str(run_dir / "checkpoints" / "best.ckpt")
        and metrics["test/ckpt_step"] == best_step
    )


def _evaluate(module, cache_dir: Path, run_dir: Path, extra: list[str] | None = None) -> dict[str, float]:
    """Single-process test metrics of ``module`` on the test split the run used."""
    import hydra.utils
    import lightning.pytorch as pl

    os.environ["AVSEG_CACHE"] = str(cache_dir)
    cfg = compose_train([*BASE, *(extra or [])], run_dir=run_dir / "eval")
    datamodule = hydra.utils.instantiate(cfg.data)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# ------------------------------------------------------------------------------------------------
# DDP


def test_ddp_cpu_two_processes_match_single_process(tmp_path: Path, cache_dir: Path) -> None:
    """3 test clips on 2 ranks: the distributed sampler pads one clip (the metric keeps the first
    copy of a frame). The logged metrics equal, to 1e-6, a single-process evaluation that runs each
    rank's batches through the same predictor (`avseg.inference`): the same computation. (Batches
    composed otherwise can differ in the last float bits: on some CPUs a convolution's rounding
    depends on a row's place in the batch.)"""
    import hydra.utils
    from torch.utils.data import DistributedSampler, Subset

    from avseg.inference import batch_scores, evaluation_loader, new_metric, update_metric
    from avseg.lit.module import AVSLitModule

    run_dir = tmp_path / "ddp"
    proc = run_train(
        [*BASE, "trainer=ddp_cpu", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cache_dir=cache_dir
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "M_J (mIoU)" in proc.stdout
    module = AVSLitModule.load_trained(run_dir / "checkpoints" / "best.ckpt")

    os.environ["AVSEG_CACHE"] = str(cache_dir)
    datamodule = hydra.utils.instantiate(compose_train(BASE).data)
    datamodule.prepare_data()
    dataset = datamodule.build(datamodule.test_set_names[0], "test", train=False)
    assert len(dataset) % 2 == 1  # one rank gets a padding copy
    metric = new_metric(semantic=False, frames_per_batch=datamodule.eval_batch_size * datamodule.num_frames)
    with torch.inference_mode():
        for rank in range(2):  # rank 0's frames first, as the metric's all-gather orders them
            order = list(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False))
            for batch in evaluation_loader(Subset(dataset, order), batch_size=datamodule.eval_batch_size):
                update_metric(metric, batch_scores(module.net, batch, semantic=False), batch)
    single = {f"test/{k}": float(v) for k, v in metric.compute().items()}
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert single[key] == pytest.approx(metrics[key], abs=1e-6), (key, single[key], metrics[key])


# ------------------------------------------------------------------------------------------------
# sweeps


def test_multirun_summary_marks_the_failed_job(tmp_path: Path, cache_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    base = [o for o in BASE if not o.startswith("model.decomposition.codebook_size")]
    proc = run_train(
        ["-m", *base, "trainer.max_epochs=1", "model.decomposition.codebook_size=16,2", f"hydra.sweep.dir={sweep_dir}"],
        cache_dir=cache_dir,
        check=False,
    )
    assert proc.returncode != 0  # the sweep reports that a job failed
    import csv

    with open(sweep_dir / "summary.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header = rows[0]
    assert header[:3] == ["job", "status", "overrides"] and "test/miou" in header
    assert len(rows) == 3
    job0, job1 = rows[1], rows[2]
    assert job0[:2] == ["0", "ok"] and "model.decomposition.codebook_size=16" in job0[2]
    assert 0.0 <= float(job0[header.index("test/miou")]) <= 1.0
    assert job1[:2] == ["1", "failed"] and "codebook_size=2" in job1[2]
    error = job1[header.index("error")]
    assert "ConfigError" in error and "num_subspaces" in error
    summary = (sweep_dir / "summary.md").read_text()
    assert "2 jobs, 1 ok, 1 failed." in summary
    assert (sweep_dir / "0" / "metrics.json").is_file()


# ------------------------------------------------------------------------------------------------
# resume


RESUME = [
    *BASE,
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1",
    "test=false",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_train([*RESUME, f"hydra.run.dir={run_dir}"], cache_dir=cache_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def test_resume_mid_epoch_ends_with_the_same_weights(uninterrupted: Path, tmp_path: Path, cache_dir: Path) -> None:
    first = tmp_path / "first"
    # stop after 3 of the 4 steps of epoch 0, with no periodic checkpoint: the one written where
    # fit ended (max_steps in the middle of an epoch) is the resumable one
    run_train(
        [*RESUME, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=0", f"hydra.run.dir={first}"],
        cache_dir=cache_dir,
    )
    stopped = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert stopped["global_step"] == 3 and stopped["epoch"] == 0
    loader_state = stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["epoch"] == 0 and loader_state["batches_done"] == 3
    second = tmp_path / "second"
    run_train(
        [*RESUME, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={second}"], cache_dir=cache_dir
    )
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2 * STEPS_PER_EPOCH
    _assert_same_weights(uninterrupted, second / "checkpoints" / "last.ckpt")


def test_sigkill_mid_epoch_leaves_a_loadable_checkpoint_and_resumes(
    uninterrupted: Path, tmp_path: Path, cache_dir: Path
) -> None:
    from avseg.lit.checkpoint_io import load_checkpoint_file

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-m", "avseg.train", *RESUME, f"hydra.run.dir={killed}"],
        cwd=REPO,
        env=train_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    step = -1
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.is_file():
                step = int(load_checkpoint_file(last)["global_step"])
                if step >= 1:
                    break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    checkpoint = load_checkpoint_file(last)  # loadable, whatever the moment of the kill
    assert 1 <= checkpoint["global_step"] < 2 * STEPS_PER_EPOCH
    resumed = tmp_path / "resumed"
    run_train([*RESUME, f"ckpt_path={last}", f"hydra.run.dir={resumed}"], cache_dir=cache_dir)
    _assert_same_weights(uninterrupted, resumed / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------------
# the final state: whatever ends fit, last.ckpt holds it and test_ckpt=last tests it


def test_max_steps_mid_epoch_tests_the_final_state(tmp_path: Path, cache_dir: Path) -> None:
    """max_steps=3 of 4 steps per epoch, no periodic checkpoint: last.ckpt holds step 3 and the
    run's test metrics are that checkpoint's (before: the last epoch end's state, or no file)."""
    from avseg.lit.module import AVSLitModule

    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *BASE,
            "++trainer.max_steps=3",
            "callbacks.checkpoint.every_n_train_steps=0",
            "test_ckpt=last",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir=cache_dir,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["epoch"] == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/ckpt_path"] == str(last) and metrics["test/ckpt_step"] == 3
    assert f"last checkpoint: {last}, step 3" in proc.stdout
    got = _evaluate(AVSLitModule.load_trained(last), cache_dir, run_dir)
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_max_time_mid_epoch_tests_the_final_state(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            *BASE,
            "trainer.max_epochs=1000",
            "trainer.min_epochs=0",
            "++trainer.max_time=00:00:00:03",
            "callbacks.checkpoint.every_n_train_steps=0",
            "test_ckpt=last",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir=cache_dir,
    )
    assert "Time limit reached" in proc.stdout + proc.stderr
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 1 <= state["global_step"] < 1000 * STEPS_PER_EPOCH
    assert metrics["test/ckpt_step"] == state["global_step"]  # the final state, not an epoch-end one


def _start_and_signal(
    args: list[str], run_dir: Path, cache_dir: Path, signum: int
) -> tuple[subprocess.CompletedProcess, int]:
    """Starts a run (a checkpoint every step), sends ``signum`` once it has trained a step; returns
    the finished process and the step last.ckpt held when the signal was sent."""
    from avseg.lit.checkpoint_io import load_checkpoint_file

    last = run_dir / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avseg.train",
            *args,
            "callbacks.checkpoint.every_n_train_steps=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=train_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    step = -1
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if last.is_file():
                step = int(load_checkpoint_file(last)["global_step"])
                if step >= 1:
                    break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be signalled"
        os.kill(process.pid, signum)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_saves_the_final_state_and_resumes(
    signum: int, uninterrupted: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """SIGTERM (kill, scancel) and Ctrl-C stop at the end of the current step with last.ckpt
    holding that step; resuming from it ends with the uninterrupted run's weights (SIGTERM)."""
    stopped = tmp_path / "stopped"
    proc, seen = _start_and_signal(RESUME, stopped, cache_dir, signum)
    assert proc.returncode == 1, proc.stderr[-3000:]
    name = signal.Signals(signum).name
    match = re.search(rf"error: training stopped by {name} after step (\d+); its final state is in (\S+) ", proc.stderr)
    assert match, proc.stderr[-3000:]
    step = int(match.group(1))
    last = stopped / "checkpoints" / "last.ckpt"
    assert match.group(2) == str(last)
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == step and seen <= step < 2 * STEPS_PER_EPOCH
    assert not (stopped / "metrics.json").exists()  # stopped by the user: no test
    if signum == signal.SIGTERM:
        resumed = tmp_path / "resumed"
        run_train([*RESUME, f"ckpt_path={last}", f"hydra.run.dir={resumed}"], cache_dir=cache_dir)
        _assert_same_weights(uninterrupted, resumed / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------------
# non-finite losses (in-process: a NaN is injected into one loss term at optimizer step 2)


def _inject_nan(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    from avseg.models.criterion import SetCriterion

    original = SetCriterion.forward
    calls = {"n": 0}

    def forward(self, outputs, masks, label_valid):
        terms = original(self, outputs, masks, label_valid)
        if torch.is_grad_enabled():  # training steps only (evaluation runs without grad)
            calls["n"] += 1
            if calls["n"] == at_call:
                terms["loss_dice"] = terms["loss_dice"] * float("nan")
                terms["loss"] = terms["loss"] + terms["loss_dice"]
        return terms

    monkeypatch.setattr(SetCriterion, "forward", forward)


def test_nan_loss_stops_naming_step_and_term(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path) -> None:
    from avseg.lit.checkpoint_io import load_checkpoint_file
    from avseg.lit.module import NonFiniteLossError
    from avseg.train import run

    monkeypatch.setenv("AVSEG_CACHE", str(cache_dir))
    _inject_nan(monkeypatch, at_call=3)
    cfg = compose_train(
        [*BASE, "trainer.max_epochs=1", "callbacks.checkpoint.every_n_train_steps=1"], run_dir=tmp_path / "run"
    )
    with pytest.raises(NonFiniteLossError) as info:
        run(cfg)
    message = str(info.value)
    assert "step 2 " in message and "loss_dice=nan" in message
    good = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert good["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_and_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path) -> None:
    from avseg.train import run

    monkeypatch.setenv("AVSEG_CACHE", str(cache_dir))
    _inject_nan(monkeypatch, at_call=2)
    cfg = compose_train([*BASE, "trainer.max_epochs=1", "skip_nonfinite=true"], run_dir=tmp_path / "run")
    metrics = run(cfg)
    assert metrics["train/nonfinite_skipped"] == 1.0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["train/nonfinite_skipped"] == 1.0
    assert math.isfinite(written["test/miou"])
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # Lightning counts the skipped batch as a step, but the optimizer never stepped on it
    assert last["global_step"] == STEPS_PER_EPOCH
    adam_steps = {float(state["step"]) for state in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {float(STEPS_PER_EPOCH - 1)}
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
