"""Training throughput (clips/s) and peak memory of one optimiser step on CPU.

Composes the experiment's config exactly as ``python -m avseg.train`` does, builds the
LightningModule, and times forward + loss + backward + gradient clipping + AdamW step on a fixed
random batch of the experiment's shape (data loading is measured by ``data_loading.py``).
Each setup runs in its own process so that peak RSS is that setup's alone.

    python benchmarks/train_throughput.py                       # synth_ms3 and s4_r50 at 224 px
    python benchmarks/train_throughput.py --setups synth_ms3 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, SETUPS, build_module, compose_experiment, optimizer_of, random_batch, train_step  # noqa: E402


def measure(overrides: list[str], steps: int) -> dict:
    """Time ``steps`` optimiser steps after one warm-up step; runs in the calling process."""
    import torch

    cfg = compose_experiment(overrides)
    module = build_module(cfg)
    optimizer = optimizer_of(module)
    batch = random_batch(module, cfg, torch.Generator().manual_seed(0))
    module.train()
    step_times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        train_step(module, optimizer, batch)
        if step > 0:  # the first step warms up allocators and lazy initialisation
            step_times.append(time.perf_counter() - start)
    median = statistics.median(step_times)
    clips, frames_per_clip, size = batch["frames"].shape[0], batch["frames"].shape[1], batch["frames"].shape[-1]
    return {
        "image_size": size,
        "clips_per_batch": clips,
        "frames_per_clip": frames_per_clip,
        "threads": torch.get_num_threads(),
        "step_s_median": median,
        "step_s_all": step_times,
        "clips_per_s": clips / median,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {list(SETUPS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setup (after one warm-up)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(SETUPS[args.child], args.steps)))
        return
    rows = []
    for name in args.setups.split(","):
        if name not in SETUPS:
            raise SystemExit(f"unknown setup {name!r}; known: {list(SETUPS)}")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name, "--steps", str(args.steps)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        rows.append((name, json.loads(proc.stdout.strip().splitlines()[-1])))
    print("| setup | input | batch | params (M) | median step (s) | clips/s | peak RSS (GiB) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['image_size']} px, T={r['frames_per_clip']} | {r['clips_per_batch']} clips | "
            f"{r['params_m']:.1f} | {r['step_s_median']:.2f} | {r['clips_per_s']:.3f} | {r['peak_rss_gib']:.2f} |"
        )
    print(f"threads per process: {rows[0][1]['threads']}; steps timed: {args.steps} after one warm-up")


if __name__ == "__main__":
    main()
