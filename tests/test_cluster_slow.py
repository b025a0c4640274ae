"""Cluster tests on this machine: a real one-node SLURM cluster (tools/slurm-local), a sweep through
Hydra's submitit launcher, a preempted and requeued SLURM job, a two-"node" torchrun rehearsal and
an exact 2-process DDP resume after SIGKILL. Every run is compared with one local 2-process
``trainer=ddp_cpu`` run of the same config and seed (the reference): the same final weights
(bit for bit) and the same test metrics.

SLURM needs Debian's ``slurm-wlm`` and ``munge`` and root; without them the SLURM tests are skipped
with the reason, except under ``CI=true`` (.ci/run installs them), where that is a failure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers_train import QUIET, REPO, TINY_MODEL, train_env

pytestmark = pytest.mark.slow

# 16 training clips, batch 2, 2 ranks: 4 optimizer steps per epoch, 8 in all; last.ckpt every step
CLUSTER = [
    "experiment=synth_ms3",
    "data.synth.image_size=48",
    "data.synth.clips_per_split={train:16,val:3,test:3}",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
    *TINY_MODEL,
    *QUIET,
    "trainer=ddp_cpu",
    "trainer.max_epochs=2",
    "trainer.deterministic=true",
    "callbacks.checkpoint.every_n_train_steps=1",
    "test_ckpt=last",
]
TOTAL_STEPS = 8
TEST_KEYS = ("test/miou", "test/fscore", "test/fscore_global")
SLURM_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("AVSEG_CACHE") or tmp_path_factory.mktemp("cache"))


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = train_env(cache_dir)
    env.update(extra)
    return env


def _train(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "avseg.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"avseg.train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_final_state(run_dir: Path, reference: Path) -> None:
    """The same weights (bit for bit) at the same step, and the same test metrics, tested on last.ckpt."""
    mine, ref = _state(run_dir / "checkpoints" / "last.ckpt"), _state(reference / "checkpoints" / "last.ckpt")
    assert mine["global_step"] == ref["global_step"] == TOTAL_STEPS
    assert mine["state_dict"].keys() == ref["state_dict"].keys()
    different = [k for k in ref["state_dict"] if not torch.equal(mine["state_dict"][k], ref["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ from the reference, e.g. {different[:3]}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    for key in TEST_KEYS:
        assert metrics[key] == expected[key], (key, metrics[key], expected[key])
    assert metrics["test/ckpt_path"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert metrics["test/ckpt_step"] == TOTAL_STEPS


def _wait_for_step(path: Path, process: subprocess.Popen, minimum: int, timeout: float = 600) -> int:
    """Polls ``path`` (written atomically) until it holds step >= minimum; returns that step."""
    from avseg.lit.checkpoint_io import load_checkpoint_file

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file():
            step = int(load_checkpoint_file(path)["global_step"])
            if step >= minimum:
                return step
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached step {minimum} (process exit status {process.poll()})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The uninterrupted local 2-process run every cluster run is compared with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _train([*CLUSTER, f"hydra.run.dir={run_dir}"], _env(cache_dir))
    state = _state(run_dir / "checkpoints" / "last.ckpt")
    ranks = state["callbacks"]["ResumeState"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1], "every rank's RNG state and data position is saved"
    assert {(r["epoch"], r["batches_done"]) for r in ranks} == {(1, TOTAL_STEPS // 2)}
    return run_dir


# ------------------------------------------------------------------------------------------------
# exact DDP resume and the multi-node rehearsal (no SLURM needed)


def test_ddp_sigkill_mid_epoch_resumes_to_the_same_weights(reference: Path, tmp_path: Path, cache_dir: Path) -> None:
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-m", "avseg.train", *CLUSTER, f"hydra.run.dir={killed}"],
        cwd=REPO,
        env=_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # rank 0 and the rank-1 process it starts: one process group
    )
    try:
        _wait_for_step(last, process, 1)
        assert process.poll() is None, "training ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)  # both ranks, no chance to save anything
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    stopped = _state(last)
    assert 1 <= stopped["global_step"] < TOTAL_STEPS
    ranks = stopped["callbacks"]["ResumeState"]["ranks"]
    assert len(ranks) == 2 and len({(r["epoch"], r["batches_done"]) for r in ranks}) == 1
    assert stopped["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["num_replicas"] == 2
    resumed = tmp_path / "resumed"
    _train([*CLUSTER, f"ckpt_path={last}", f"hydra.run.dir={resumed}"], _env(cache_dir))
    _assert_same_final_state(resumed, reference)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_torchrun_two_nodes_match_the_single_node_run(reference: Path, tmp_path: Path, cache_dir: Path) -> None:
    """Two "nodes" on this machine: two torchrun agents (--nnodes=2 --nproc-per-node=1) meeting
    through a c10d rendezvous on localhost; Lightning reads the torchelastic environment."""
    run_dir = tmp_path / "two_nodes"
    port = _free_port()
    args = [*CLUSTER, "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={run_dir}"]
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=avseg-two-nodes",
                "-m",
                "avseg.train",
                *args,
            ],
            cwd=REPO,
            env=_env(cache_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-5000:]
    joined = "\n".join(outputs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in joined and "GLOBAL_RANK: 1, MEMBER: 2/2" in joined
    _assert_same_final_state(run_dir, reference)


# ------------------------------------------------------------------------------------------------
# SLURM


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or Path("/usr/sbin", tool).is_file()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A one-node SLURM cluster started with tools/slurm-local; yields the client environment."""
    missing = [tool for tool in SLURM_TOOLS if not _have(tool)]
    problem = (
        f"SLURM is not installed (missing {', '.join(missing)}; apt-get install slurm-wlm munge)" if missing else None
    )
    if problem is None and os.geteuid() != 0:
        problem = "tools/slurm-local needs root (slurmd runs the jobs as their user)"
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("slurm")
    tool = REPO / "tools" / "slurm-local"
    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    started = subprocess.run([str(tool), "start", str(folder)], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, f"tools/slurm-local start failed:\n{started.stdout}\n{started.stderr}"
    try:
        yield {"SLURM_CONF": str(folder / "slurm.conf"), "PATH": env["PATH"]}
    finally:
        stopped = subprocess.run([str(tool), "stop", str(folder)], env=env, capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, f"tools/slurm-local stop failed:\n{stopped.stdout}\n{stopped.stderr}"
        for daemon in ("munged", "slurmctld", "slurmd"):
            assert not (folder / f"{daemon}.pid").exists(), f"{daemon} still has a pid file"


def _squeue(env: dict[str, str]) -> list[tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [tuple(line.split()) for line in out.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def test_slurm_sweep_runs_two_task_ddp_jobs_equal_to_local(
    reference: Path, slurm: dict[str, str], tmp_path: Path, cache_dir: Path
) -> None:
    sweep = tmp_path / "sweep"
    base = [o for o in CLUSTER if not o.startswith("model.decomposition.codebook_size")]
    _train(
        [
            "-m",
            "hydra/launcher=submitit_slurm_cpu",
            *base,
            "model.decomposition.codebook_size=16,8",
            f"hydra.sweep.dir={sweep}",
        ],
        _env(cache_dir, **slurm),
    )
    # one run directory per job, nothing else (no directories from rank 1)
    assert sorted(p.name for p in sweep.iterdir()) == [
        ".submitit",
        "0",
        "1",
        "multirun.yaml",
        "summary.csv",
        "summary.md",
    ]
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert "codebook_size=16" in rows[0]["overrides"] and "codebook_size=8" in rows[1]["overrides"]
    # job 0 has the reference's config: the same weights and metrics as the local 2-process run
    _assert_same_final_state(sweep / "0", reference)
    expected = json.loads((reference / "metrics.json").read_text())
    for key in TEST_KEYS:
        assert rows[0][key] == f"{expected[key]:.6g}"
    assert 0.0 <= float(rows[1]["test/miou"]) <= 1.0 and rows[1]["test/ckpt_step"] == str(TOTAL_STEPS)
    for job in ("0", "1"):
        # Lightning took the process layout from SLURM: no second launch inside the job
        assert not list((sweep / job).glob("*ddp_process*")), "Lightning started its own processes inside the SLURM job"
        logs = sorted((sweep / ".submitit").glob(f"*_{job}/*_log.out"))
        ranks = {m.group(1) for log in logs for m in re.finditer(r"global_rank=(\d)\(2\)", log.read_text())}
        assert ranks == {"0", "1"}, f"job {job}: expected two SLURM tasks, got logs {logs}"


def test_slurm_preempted_job_is_requeued_and_ends_with_the_same_weights(
    reference: Path, slurm: dict[str, str], tmp_path: Path, cache_dir: Path
) -> None:
    """SIGUSR2 (what ``sbatch --signal=USR2@<s>`` sends before a time limit or a preemption) while
    the job trains: last.ckpt at the end of the current step, submitit requeues the job, the
    requeued job resumes from it and ends exactly like the uninterrupted reference."""
    sweep = tmp_path / "preempt"
    env = _env(cache_dir, **slurm)
    submitter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avseg.train",
            "-m",
            "hydra/launcher=submitit_slurm_cpu",
            *CLUSTER,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_step(sweep / "0" / "checkpoints" / "last.ckpt", submitter, 1)
        jobs = _squeue(env)
        assert len(jobs) == 1 and jobs[0][1] == "RUNNING", jobs
        job_id = jobs[0][0]
        subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=60)
        # SLURM holds the requeued job for AuthInfo's cred_expire (10 s with tools/slurm-local)
        # before it starts it again; releasing it earlier gets it killed ("credential revoked")
        output = submitter.communicate(timeout=600)[0]
    finally:
        if submitter.poll() is None:
            submitter.kill()
            submitter.wait(timeout=60)
    assert submitter.returncode == 0, output[-5000:]
    log = (sweep / "0" / "train.log").read_text()
    saved = [int(m) for m in re.findall(r"SIGUSR2: last\.ckpt holds step (\d+); the SLURM job was requeued", log)]
    assert saved and 1 <= saved[0] < TOTAL_STEPS, log[-3000:]
    assert f"SLURM restart 1 of job {job_id}: resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in log
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok")]
    _assert_same_final_state(sweep / "0", reference)
