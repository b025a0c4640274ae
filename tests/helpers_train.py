"""Shared helpers of the training tests: tiny overrides, running ``python -m avseg.train`` in a
subprocess or in-process, tiny synthetic trees standing in for the real AVSBench roots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A tiny synthetic tree and a tiny model: seconds per epoch on one CPU core.
TINY_SYNTH = [
    "data.synth.image_size=48",
    "data.synth.clips_per_split={train:8,val:3,test:3}",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
]
TINY_MODEL = [
    "model.dim=32",
    "model.decomposition.codebook_size=16",
    "model.decomposition.num_heads=2",
    "model.fusion.num_heads=2",
    "model.decoder.num_heads=2",
    "model.decoder.num_layers=1",
]
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def train_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AVSEG_CACHE"] = str(cache_dir)
    env["WANDB_MODE"] = "disabled"
    env["HYDRA_FULL_ERROR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # one thread per process: the machine is shared, and DDP tests start two processes
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def run_train(
    args: list[str], *, cache_dir: Path, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m avseg.train ARGS`` from the repository root; output captured as text."""
    proc = subprocess.run(
        [sys.executable, "-m", "avseg.train", *args],
        cwd=REPO,
        env=train_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"avseg.train {' '.join(args)} failed ({proc.returncode}):\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def compose_train(overrides: list[str], *, run_dir: Path | None = None) -> Any:
    """The composed ``train`` config (with the hydra node) via Hydra's compose API; when
    ``run_dir`` is given it is also registered as the current Hydra run (for in-process runs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        extra = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
        cfg = compose(config_name="train", overrides=[*overrides, *extra], return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def synth_tree(cache_dir: Path, subset: str, *, image_size: int = 48, clips: int = 3) -> Path:
    """A tiny SynthAVS tree of ``subset`` (cached): stands in for a real AVSBench root."""
    from avseg.data.synth import ensure_synth_tree

    return Path(
        ensure_synth_tree(
            cache_dir / "synth",
            subset,
            seed=0,
            image_size=image_size,
            clips_per_split={"train": clips, "val": clips, "test": clips},
        )
    )


def real_experiment_overrides(experiment: str, cache_dir: Path) -> list[str]:
    """Overrides that run a paper experiment on tiny synthetic stand-in trees on the CPU, with
    random-init weights (no weight files here)."""
    subsets = {"s4_r50": ["s4"], "ms3_r50": ["ms3"], "avss_r50": ["avss"], "avs_r50": ["s4", "ms3"]}[experiment]
    roots = {name: synth_tree(cache_dir, name) for name in subsets}
    if experiment == "avs_r50":
        data = [f"data.roots.s4={roots['s4']}", f"data.roots.ms3={roots['ms3']}", "data.repeats.ms3=1"]
    else:
        data = [f"data.root={roots[subsets[0]]}"]
    return [
        f"experiment={experiment}",
        *data,
        "data.image_size=48",
        "data.num_workers=0",
        "data.pin_memory=false",
        "data.persistent_workers=false",
        "data.prefetch_factor=null",
        "data.batch_size=1",
        "data.eval_batch_size=1",
        "trainer=cpu",
        "trainer.precision=32-true",
        "model.backbone.weights=null",
        "model.backbone.random_init=true",
        "model.audio_encoder.vggish_weights=null",
        "model.audio_encoder.random_init=true",
    ]
