"""Fast training-system tests: ``fast_dev_run`` of every experiment on tiny synthetic data, the
missing-data message, checkpoint IO, the resumable sampler and the sweep summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers_train import QUIET, TINY_MODEL, TINY_SYNTH, compose_train, real_experiment_overrides, run_train

from avseg.errors import CheckpointError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # shared by the module's tests so each tiny tree is generated once
    return Path(os.environ.get("AVSEG_CACHE") or tmp_path_factory.mktemp("cache"))


def _run_in_process(overrides: list[str], run_dir: Path) -> dict[str, float]:
    from avseg.train import run

    cfg = compose_train(overrides, run_dir=run_dir)
    return run(cfg)


@pytest.mark.parametrize("experiment", ["synth_s4", "synth_ms3", "synth_avss"])
def test_fast_dev_run_synthetic_experiments(experiment: str, tmp_path: Path, cache_dir: Path) -> None:
    metrics = _run_in_process(
        [
            f"experiment={experiment}",
            "debug=fast_dev_run",
            *TINY_SYNTH,
            *TINY_MODEL,
            "trainer.enable_progress_bar=false",
        ],
        tmp_path / "run",
    )
    assert 0.0 <= metrics["test/miou"] <= 1.0
    assert "test/fscore" in metrics
    assert ("test/fscore_global" in metrics) == (experiment != "synth_avss")
    # fast_dev_run writes no metrics.json and no checkpoint
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


# The paper setups (ResNet-50, VGGish, C = 256) on tiny stand-in trees at 48 px, with fewer
# transformer layers so one step stays cheap on a CPU; everything else is the experiment's config.
SHRINK = ["model.fusion.num_encoder_layers=1", "model.decoder.num_layers=2"]


@pytest.mark.slow  # ResNet-50 + VGGish at C = 256: ~10 s each on an idle 2-core machine, far more on a busy one
@pytest.mark.parametrize("experiment", ["s4_r50", "ms3_r50", "avss_r50", "avs_r50"])
def test_fast_dev_run_paper_experiments_on_standin_trees(experiment: str, tmp_path: Path, cache_dir: Path) -> None:
    overrides = [
        *real_experiment_overrides(experiment, cache_dir),
        "debug=fast_dev_run",
        *SHRINK,
        "trainer.enable_progress_bar=false",
    ]
    metrics = _run_in_process(overrides, tmp_path / "run")
    if experiment == "avs_r50":  # two test sets, each under its own name
        assert {"test/s4/miou", "test/ms3/miou", "test/s4/fscore", "test/ms3/fscore_global"} <= set(metrics)
    else:
        assert "test/miou" in metrics and "test/fscore" in metrics


@pytest.mark.parametrize("experiment,folder", [("s4_r50", "Single-source"), ("avss_r50", "AVSBench-semantic")])
def test_missing_dataset_stops_at_once_with_the_path(
    experiment: str, folder: str, tmp_path: Path, cache_dir: Path
) -> None:
    data_dir = tmp_path / "no-avsbench-here"
    proc = run_train(
        [f"experiment={experiment}", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", *QUIET],
        cache_dir=cache_dir,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last_lines = proc.stderr.strip().splitlines()[-3:]
    message = "\n".join(last_lines)
    assert str(data_dir / folder) in message
    assert "Traceback" not in message
    assert "docs/DATA.md" in proc.stderr or "download" in proc.stderr.lower()


def test_bad_override_is_one_clear_line(tmp_path: Path, cache_dir: Path) -> None:
    proc = run_train(
        ["model.decomposition.codebook_size=2", f"hydra.run.dir={tmp_path / 'run'}", *QUIET],
        cache_dir=cache_dir,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "model.decomposition.codebook_size=2: must be >= num_subspaces (4)" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# checkpoint IO


def test_atomic_checkpoint_io_round_trip_and_safe_load(tmp_path: Path) -> None:
    from avseg.lit.callbacks import capture_rng_state
    from avseg.lit.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = {"state_dict": {"w": torch.arange(4.0)}, "rng": capture_rng_state(), "epoch": 3}
    io.save_checkpoint(checkpoint, path)
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0)) and loaded["epoch"] == 3
    assert torch.equal(loaded["rng"]["torch"], checkpoint["rng"]["torch"])
    # no temporary file is left next to it
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    # weights_only: a checkpoint holding an arbitrary object is refused, naming the file
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt: refused by the safe loader"):
        io.load_checkpoint(evil)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_a_clear_error(damage: str, tmp_path: Path) -> None:
    from avseg.lit.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(256)}}, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(info.value).startswith(str(path))


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from avseg.lit import checkpoint_io

    path = tmp_path / "last.ckpt"
    checkpoint_io.AtomicCheckpointIO().save_checkpoint({"step": 1}, path)

    def dying_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_io.os, "fsync", dying_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint_io.load_checkpoint_file(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------------------------
# resumable sampler / loader


def test_sampler_shards_cover_the_set_and_pad_like_distributed_sampler() -> None:
    from avseg.lit.sampler import ResumableSampler

    data = list(range(11))
    shards = [list(ResumableSampler(data, seed=4, num_replicas=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(data)
    epoch0 = list(ResumableSampler(data, seed=4, num_replicas=1, rank=0))
    sampler = ResumableSampler(data, seed=4, num_replicas=1, rank=0)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == data


def test_loader_resumes_mid_epoch_and_at_epoch_end() -> None:
    from avseg.lit.sampler import ResumableDataLoader

    data = list(range(13))
    reference = ResumableDataLoader(data, batch_size=3, seed=7)
    epochs = []
    for epoch in range(2):
        reference.resumable_sampler.set_epoch(epoch)
        epochs.append([b.tolist() for b in reference])
    # stop after two batches of epoch 0: the next run yields exactly the rest
    loader = ResumableDataLoader(data, batch_size=3, seed=7)
    iterator = iter(loader)
    seen = [next(iterator).tolist(), next(iterator).tolist()]
    state = loader.state_dict()
    assert state["batches_done"] == 2 and state["epoch"] == 0
    resumed = ResumableDataLoader(data, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == epochs[0]
    # a checkpoint written at the end of epoch 0 resumes at the start of epoch 1
    finished = ResumableDataLoader(data, batch_size=3, seed=7)
    finished.load_state_dict({**state, "batches_done": len(finished)})
    assert [b.tolist() for b in finished] == epochs[1]
    # the trainer's count wins over the loader's own (Lightning prefetches one batch)
    loader.progress_fn = lambda: (0, 1)
    assert loader.state_dict()["batches_done"] == 1
    with pytest.raises(ValueError, match="batch_size=3, this run has batch_size=4"):
        ResumableDataLoader(data, batch_size=4, seed=7).load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# sweep summary


def test_sweep_summary_lists_failed_jobs(tmp_path: Path) -> None:
    from avseg.io import write_json_atomic
    from avseg.lit.sweeps import JOB_STATUS_FILE, write_sweep_summary

    for job, status in enumerate(["ok", "failed", "ok"]):
        job_dir = tmp_path / str(job)
        write_json_atomic(
            job_dir / JOB_STATUS_FILE,
            {
                "job": job,
                "overrides": f"model.decomposition.codebook_size={64 * (job + 1)}",
                "status": status,
                "error": "" if status == "ok" else "ConfigError: bad",
                "dir": str(job_dir),
            },
        )
        if status == "ok":
            write_json_atomic(job_dir / "metrics.json", {"test/miou": 0.5 + job / 10, "test/fscore": 0.25})
    csv_path, md_path = write_sweep_summary(tmp_path)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "job,status,overrides,test/fscore,test/miou,error"
    assert lines[1].startswith("0,ok,model.decomposition.codebook_size=64,0.25,0.5,")
    assert lines[2] == "1,failed,model.decomposition.codebook_size=128,,,ConfigError: bad"
    assert "3 jobs, 2 ok, 1 failed." in md_path.read_text()
    assert json.loads((tmp_path / "2" / "metrics.json").read_text())["test/miou"] == pytest.approx(0.7)


def _tiny_module(overrides: list[str]):
    import hydra.utils
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train([*TINY_MODEL, *overrides])
    HydraConfig.instance().set_config(cfg)
    return hydra.utils.instantiate(cfg.model)


def test_checkpoint_from_another_model_config_is_a_clear_error(tmp_path: Path) -> None:
    from avseg.lit.module import AVSLitModule

    small = _tiny_module([])
    other = _tiny_module(["model.dim=64"])
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict(), "hyper_parameters": dict(small.hparams)}, path)
    with pytest.raises(CheckpointError) as info:
        AVSLitModule.load_trained(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "do not fit this model config" in message
    assert "keys of another shape" in message
    # the matching pair loads, standalone and with plain hyper-parameters only
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": dict(small.hparams)}, path)
    loaded = AVSLitModule.load_trained(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))
    torch.save({"state_dict": small.state_dict()}, path)
    with pytest.raises(CheckpointError, match="not an avseg training checkpoint: no 'hyper_parameters'"):
        AVSLitModule.load_trained(path)
