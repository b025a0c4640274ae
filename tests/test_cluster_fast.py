"""Fast tests of the cluster pieces: the SLURM launcher presets, where a run resumes from, per-rank
resume states, the stop-on-signal handlers. The real runs: tests/test_cluster_slow.py."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_train import REPO, compose_train


@pytest.mark.parametrize("preset", ["submitit_slurm_cpu", "submitit_slurm_gpu"])
def test_launcher_presets_compose_without_the_schema_warning(preset: str) -> None:
    trainer = (
        ["trainer=ddp_cpu"] if preset.endswith("cpu") else ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = compose_train([f"hydra/launcher={preset}", *trainer])
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "ConfigStore schema" in m], messages
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    if preset.endswith("cpu"):
        assert (launcher.nodes, launcher.tasks_per_node, launcher.cpus_per_task) == (1, 2, 1)
        assert launcher.gpus_per_node is None and launcher.mem_gb is None
    else:
        assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout >= 1


def test_resolve_ckpt_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from avseg.train import resolve_ckpt_path

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing to resume yet: a fresh start
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    assert resolve_ckpt_path(None, tmp_path) is None  # not requeued: null means null
    assert resolve_ckpt_path("auto", tmp_path) == str(last)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued SLURM job continues its own run
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    assert resolve_ckpt_path("/x/y.ckpt", tmp_path) == "/x/y.ckpt"  # an explicit path wins


def _rank_entry(rank: int, seed: int, position: tuple[int, int] = (0, 3)) -> dict:
    from avseg.lit.callbacks import capture_rng_state

    torch.manual_seed(seed)
    return {"rank": rank, "rng": capture_rng_state(), "epoch": position[0], "batches_done": position[1]}


def test_resume_state_gives_every_rank_its_own_rng_state(caplog: pytest.LogCaptureFixture) -> None:
    from avseg.errors import CheckpointError
    from avseg.lit.callbacks import ResumeState

    ranks = [_rank_entry(0, 1), _rank_entry(1, 2)]
    saved = {"rng": ranks[0]["rng"], "ranks": ranks}
    callback = ResumeState()
    for rank in (0, 1):
        chosen = callback._rank_state(saved, SimpleNamespace(global_rank=rank, world_size=2))
        assert torch.equal(chosen["torch"], ranks[rank]["rng"]["torch"])
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    # another world size: rank 0's states, said in the log
    chosen = callback._rank_state(saved, SimpleNamespace(global_rank=2, world_size=4))
    assert torch.equal(chosen["torch"], ranks[0]["rng"]["torch"]) and "2 ranks, this run has 4" in caplog.text
    # ranks saved at different data positions cannot be resumed
    with pytest.raises(CheckpointError, match="different data positions"):
        callback._rank_state(
            {"rng": ranks[0]["rng"], "ranks": [ranks[0], _rank_entry(1, 2, (0, 4))]},
            SimpleNamespace(global_rank=0, world_size=2),
        )
    # single-process state_dict: one rank, loadable with weights_only=True
    state = callback.state_dict()
    assert [r["rank"] for r in state["ranks"]] == [0]
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["ranks"][0]["batches_done"] == 0


def test_training_interrupted_message_and_pickle() -> None:
    from avseg.lit.callbacks import TrainingInterrupted

    error = TrainingInterrupted(signal.SIGTERM, 12, "/r/checkpoints/last.ckpt", False)
    assert str(error) == (
        "training stopped by SIGTERM after step 12; its final state is in /r/checkpoints/last.ckpt "
        "(resume with ckpt_path=/r/checkpoints/last.ckpt)"
    )
    again = pickle.loads(pickle.dumps(error))  # submitit sends a job's exception back pickled
    assert (again.signum, again.step, str(again)) == (signal.SIGTERM, 12, str(error))


def test_signal_handlers_mark_a_stop_and_are_restored(tmp_path: Path) -> None:
    from avseg.lit.callbacks import LastCheckpoint

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    callback = LastCheckpoint(dirpath=str(tmp_path))
    callback._install_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert callback._requested == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGUSR2)  # the first request stays
        assert callback._requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after a request: abort at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback._restore_handlers()
    after = {s: signal.getsignal(s) for s in before}
    assert after == {**before, signal.SIGINT: signal.default_int_handler} or after == before
    assert LastCheckpoint(dirpath=str(tmp_path), handle_signals=False)._install_handlers() is None


def test_slurm_local_usage() -> None:
    proc = subprocess.run([str(REPO / "tools" / "slurm-local")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "tools/slurm-local start DIR" in proc.stderr


def test_ckpt_path_auto_is_a_valid_training_value() -> None:
    from avseg.config_validation import validate_config
    from avseg.errors import ConfigError

    validate_config(compose_train(["ckpt_path=auto"]))
    with pytest.raises(ConfigError, match="allowed: null, auto or an existing checkpoint file"):
        validate_config(compose_train(["ckpt_path=/no/such/file.ckpt"]))
