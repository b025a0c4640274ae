"""torch.compile (``model.compile``) against eager: training-step time of the same model, side by side.

    python benchmarks/compile_speed.py [--setup synth_ms3] [--steps 10] [--backend inductor] [--mode default]
    python benchmarks/compile_speed.py --device cuda --bf16 --setup s4_r50_224px   # on a GPU

Builds the experiment's LightningModule once, copies it, compiles the copy's backbone, neck,
fusion and decoder as ``model.compile`` does (`avseg.lit.compilation`), and times optimiser steps
(forward + loss + backward + clipping + AdamW, ``train_step`` of benchmarks/bench_common.py) on one fixed
random batch of the experiment's shape, the two modules alternating step by step so that load from
other jobs falls on both alike. The compiled module's first step (tracing + code generation) is
reported apart. Prints a Markdown table with medians, the ratio and the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SETUPS, build_module, compose_experiment, optimizer_of, random_batch, train_step  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", default="synth_ms3", choices=sorted(SETUPS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each module (after the first)")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as precision=bf16-mixed")
    args = parser.parse_args(argv)

    import torch

    from avseg.lit.compilation import compile_network

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("compile_speed: --device cuda but torch sees no CUDA device")
    autocast_dtype = torch.bfloat16 if args.bf16 else None

    def timed_step(name: str) -> tuple[float, dict]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        terms = train_step(modules[name], optimizers[name], batch, autocast_dtype=autocast_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, terms

    load_start = os.getloadavg()
    cfg = compose_experiment(SETUPS[args.setup])
    torch.manual_seed(0)
    eager = build_module(cfg).to(device).train()
    compiled = copy.deepcopy(eager)
    options = {"backend": args.backend, **({"mode": args.mode} if args.mode else {})}
    compile_network(compiled.net, options)
    batch = {k: v.to(device) for k, v in random_batch(eager, cfg, torch.Generator().manual_seed(0)).items()}
    optimizers = {"eager": optimizer_of(eager), "compiled": optimizer_of(compiled)}
    modules = {"eager": eager, "compiled": compiled}
    first, times, losses = {}, {name: [] for name in modules}, {name: [] for name in modules}
    for name in modules:
        first[name], _ = timed_step(name)
        print(f"{name}: first step {first[name]:.1f} s", flush=True)
    for _ in range(args.steps):
        for name in modules:
            seconds, terms = timed_step(name)
            times[name].append(seconds)
            losses[name].append(float(terms["loss"]))
    load_end = os.getloadavg()
    eager_median = statistics.median(times["eager"])
    clips, frames, size = batch["frames"].shape[0], batch["frames"].shape[1], batch["frames"].shape[-1]
    print()
    print(
        f"`{args.setup}` training step on {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"{', bf16 autocast' if args.bf16 else ', fp32'}, batch {clips} clips x {frames} frames at {size} px, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}, {os.cpu_count()} CPUs; torch.compile({options}) of "
        "backbone, neck, fusion, decoder; load average (1/5/15 min) "
        f"{load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} "
        f"at the start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end; "
        f"{args.steps} alternating steps each."
    )
    print()
    print("| | first step (s) | median step (s) | min / max (s) | vs eager | last loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in modules:
        median = statistics.median(times[name])
        print(
            f"| {name} | {first[name]:.1f} | {median:.3f} | {min(times[name]):.3f} / {max(times[name]):.3f} | "
            f"{eager_median / median:.2f}x | {losses[name][-1]:.3f} |"
        )


if __name__ == "__main__":
    main()
