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

REPO = Path(__file__).resolve().parents[1]

# The paper setup with random weights (no downloads) and the default demo, as the issue asks.
SETUPS: dict[str, list[str]] = {
    "synth_ms3": ["experiment=synth_ms3"],
    "s4_r50_224px": [
        "experiment=s4_r50",
        "model.backbone.weights=null",
        "model.backbone.random_init=true",
        "model.audio_encoder.vggish_weights=null",
        "model.audio_encoder.random_init=true",
    ],
}


def measure(overrides: list[str], steps: int) -> dict:
    """Time ``steps`` optimiser steps after one warm-up step; runs in the calling process."""
    import hydra.utils
    import torch
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    module = hydra.utils.instantiate(cfg.model)
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    data = cfg.data
    size = int(data.synth.image_size) if data.get("synth") else int(data.image_size)
    clips, frames_per_clip = int(data.batch_size), (10 if data.subset == "avss" else 5)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(clips, frames_per_clip, 3, size, size, generator=generator)
    if module.hparams["audio_encoder"].get("input", "log_mel") == "embeddings":
        audio = torch.randn(clips, frames_per_clip, 128, generator=generator)
    else:
        audio = torch.randn(clips, frames_per_clip, 1, 96, 64, generator=generator)
    frame_valid = torch.ones(clips, frames_per_clip, dtype=torch.bool)
    masks = (torch.rand(clips, frames_per_clip, size, size, generator=generator) > 0.7).long()
    module.train()
    step_times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = module.criterion(module.net(frames, audio, frame_valid), masks, frame_valid)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        optimizer.step()
        if step > 0:  # the first step warms up allocators and lazy initialisation
            step_times.append(time.perf_counter() - start)
    median = statistics.median(step_times)
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
            cwd=REPO, capture_output=True, text=True,
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
