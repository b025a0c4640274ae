"""One-call GPU check: do the Triton kernels and the paper setup work on this GPU, and how fast?

    python benchmarks/gpu_check.py [--out gpu_check.md]       # estimated 3-6 minutes on one H100 (not yet run on a GPU)

Prints one Markdown report (and writes it atomically to --out) with three sections:

(a) multi-scale deformable attention at the AVS and Deformable DETR sizes (benchmarks/deform_attn.py's
    inputs) in fp32, fp16 and bf16: Triton vs avseg's torch path vs the grid_sample formulation,
    forward and backward medians, each output and gradient's max error against an fp64 grid_sample
    run on the same (rounded) inputs, forward / backward GB/s and the fraction of the memory floor
    (bytes that must cross DRAM once / peak bandwidth, over the measured time);
(b) the s4_r50 model (ResNet-50, VGGish, C = 256, random weights) trained for 100 optimiser steps in
    bf16 autocast (as ``precision=bf16-mixed``: fp32 weights, AdamW, gradient clipping 0.1) on
    batches of 224 px SynthAVS S4 clips: clips/s (median step), peak GPU memory, every loss finite,
    and beside it the clips/s of the training data loader on the same clips;
(c) which deformable-attention backend ``auto`` chose: for CUDA tensors, under deterministic
    algorithms, and in every call of the training steps.

Runs from a plain checkout where torch, triton, lightning, einops, torchmetrics, scipy and timm are
installed; hydra-core, omegaconf and soundfile can be carried as wheels (benchmarks/gpu_wheels.sh,
docs/BENCHMARKS.md "GPU check"). Needs a CUDA device: without one it stops with that message (the
sections' code is tested on CPU with tiny sizes in tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    RANDOM_INIT,
    SIZES,
    build_module,
    clip_shape,
    compose_experiment,
    make_inputs,
    memory_floor_bytes,
    optimizer_of,
    peak_bandwidth,
    relative_errors,
    run_once,
    sync,
    train_step,
    use_checkout_if_not_installed,
)

use_checkout_if_not_installed()

from avseg.ops import ms_deform_attn, ms_deform_attn_grid_sample, ms_deform_attn_torch, resolve_backend  # noqa: E402

# the module, not the function of the same name that avseg.ops exports
ms_deform_attn_module = importlib.import_module("avseg.ops.ms_deform_attn")

log = logging.getLogger("gpu_check")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMPLS = {
    "grid_sample": ms_deform_attn_grid_sample,
    "torch": ms_deform_attn_torch,
    "triton": lambda *args: ms_deform_attn(*args, backend="triton"),
}
OUTPUT_NAMES = ("out", "grad_value", "grad_loc", "grad_attn")
JUDGED_IMPLS = ("torch", "triton")  # avseg's own; grid_sample is the comparison


class NoGPUError(RuntimeError):
    """The check needs a CUDA device and none is visible."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="avs,detr", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help=f"comma list of {list(DTYPES)}")
    parser.add_argument("--impls", default="grid_sample,torch,triton", help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=20, help="timed kernel repeats (medians)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the s4_r50 model")
    parser.add_argument("--clips", type=int, default=32, help="SynthAVS S4 training clips generated")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers")
    parser.add_argument("--loader-passes", type=int, default=2, help="timed passes over the clips")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument("--cache", type=Path, default=None, help="SynthAVS cache (default: a temporary folder)")
    parser.add_argument("--skip", default="", help="comma list of sections to leave out: kernels, training")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (atomically)")
    args = parser.parse_args(argv)
    args.sizes = _names(args.sizes, SIZES, "--sizes")
    args.dtypes = _names(args.dtypes, DTYPES, "--dtypes")
    args.impls = _names(args.impls, IMPLS, "--impls")
    args.skip = _names(args.skip, ("kernels", "training"), "--skip") if args.skip else []
    for name in ("repeats", "steps", "clips", "loader_passes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    return args


def _names(text: str, allowed, option: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"{option}: {unknown or text!r} not in {list(allowed)}")
    return names


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGPUError(
            "benchmarks/gpu_check.py needs a CUDA GPU and torch sees none "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was measured"
        )
    return torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------------------------------------
# (a) deformable attention


def kernel_rows(
    device: torch.device,
    *,
    sizes: Sequence[str | tuple[str, dict]],
    dtypes: Sequence[str],
    impls: Sequence[str],
    repeats: int,
    peak_gbps: float | None,
) -> list[dict[str, Any]]:
    """One row per (size, dtype, impl): medians, errors vs fp64 grid_sample, GB/s, floor fraction.

    ``sizes``: names of `SIZES` or (name, spec) pairs (tests use tiny specs). Implementations are
    interleaved repeat by repeat; one warm-up call each (Triton compiles there)."""
    rows = []
    for size in sizes:
        size_name, spec = (size, SIZES[size]) if isinstance(size, str) else size
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(spec, device, dtype)
            # the reference: fp64 grid_sample on the same rounded inputs
            reference_inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
            _, _, ref_out, ref_grads = run_once(ms_deform_attn_grid_sample, reference_inputs, device)
            reference = (ref_out, *ref_grads)
            del reference_inputs
            forward_floor, backward_floor = memory_floor_bytes(inputs)
            times: dict[str, dict[str, Any]] = {}
            errors: dict[str, list[float]] = {}
            failed: dict[str, str] = {}
            for impl in impls:
                start = time.perf_counter()
                try:
                    _, _, output, grads = run_once(IMPLS[impl], inputs, device)
                except Exception as error:  # reported as a FAIL row; the other implementations go on
                    log.exception("kernels: %s %s %s failed", size_name, dtype_name, impl)
                    failed[impl] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
                    continue
                errors[impl] = relative_errors(reference, (output, *grads))
                dtypes_ok = output.dtype == dtype and all(g.dtype == dtype for g in grads)
                times[impl] = {
                    "forward": [],
                    "backward": [],
                    "first": time.perf_counter() - start,
                    "dtypes_ok": dtypes_ok,
                }
            for _ in range(repeats):
                for impl in times:
                    forward, backward, _, _ = run_once(IMPLS[impl], inputs, device)
                    times[impl]["forward"].append(forward)
                    times[impl]["backward"].append(backward)
            for impl in impls:
                if impl in failed:
                    rows.append(dict(size=size_name, dtype=dtype_name, impl=impl, error=failed[impl]))
                    continue
                forward = statistics.median(times[impl]["forward"])
                backward = statistics.median(times[impl]["backward"])
                row = dict(
                    size=size_name,
                    dtype=dtype_name,
                    impl=impl,
                    forward_ms=forward * 1e3,
                    backward_ms=backward * 1e3,
                    first_s=times[impl]["first"],
                    dtypes_ok=times[impl]["dtypes_ok"],
                    errors=dict(zip(OUTPUT_NAMES, errors[impl])),
                    forward_gbps=forward_floor / forward / 1e9,
                    backward_gbps=backward_floor / backward / 1e9,
                )
                row["forward_floor"] = row["forward_gbps"] / peak_gbps if peak_gbps else None
                row["backward_floor"] = row["backward_gbps"] / peak_gbps if peak_gbps else None
                rows.append(row)
            log.info("kernels: %s %s done", size_name, dtype_name)
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def kernel_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| size | dtype | impl | fwd ms | bwd ms | fwd GB/s | fwd floor % | bwd GB/s | bwd floor % | first call s "
        "| max err out | grad_value | grad_loc | grad_attn | dtypes kept |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | {r['impl']} | FAILED: {r['error']} |" + " |" * 11)
            continue
        floor = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
        e = r["errors"]
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['impl']} | {r['forward_ms']:.3f} | {r['backward_ms']:.3f} | "
            f"{r['forward_gbps']:.1f} | {floor(r['forward_floor'])} | {r['backward_gbps']:.1f} | "
            f"{floor(r['backward_floor'])} | "
            f"{r['first_s']:.2f} | {e['out']:.1e} | {e['grad_value']:.1e} | {e['grad_loc']:.1e} | "
            f"{e['grad_attn']:.1e} | "
            f"{'yes' if r['dtypes_ok'] else 'NO'} |"
        )
    return lines


# ------------------------------------------------------------------------------------------------
# (c) backend choice


@contextlib.contextmanager
def recording_backends() -> Iterator[dict[tuple[str, str], int]]:
    """Counts (requested, chosen) backends of every ``ms_deform_attn`` call inside the block."""
    counts: dict[tuple[str, str], int] = {}
    original = ms_deform_attn_module.resolve_backend

    def recorder(backend: str, device: torch.device) -> str:
        chosen = original(backend, device)
        counts[(backend, chosen)] = counts.get((backend, chosen), 0) + 1
        return chosen

    ms_deform_attn_module.resolve_backend = recorder
    try:
        yield counts
    finally:
        ms_deform_attn_module.resolve_backend = original


def backend_lines(device: torch.device, training_calls: dict[tuple[str, str], int] | None) -> list[str]:
    plain = resolve_backend("auto", device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        deterministic = resolve_backend("auto", device)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
    lines = [
        f"- `auto` for {device.type} tensors: **{plain}**",
        f"- `auto` under `torch.use_deterministic_algorithms(True)`: **{deterministic}**",
    ]
    if training_calls is not None:
        calls = ", ".join(f"{req} -> {chosen}: {n} calls" for (req, chosen), n in sorted(training_calls.items()))
        lines.append(f"- during the training steps of (b): {calls or 'no calls'}")
    return lines


# ------------------------------------------------------------------------------------------------
# (b) training


def synth_batches(
    cfg, *, cache: Path, clips: int, workers: int, passes: int, keep: int
) -> tuple[list[dict], dict[str, Any]]:
    """The experiment's training loader on a SynthAVS S4 tree at its image size: ``keep`` batches
    for the training steps, and the loader's clips/s (median of ``passes`` passes after a warm-up
    pass that starts the workers)."""
    from avseg.data.avsbench import DATASETS
    from avseg.data.synth import ensure_synth_tree

    batch_size, _, size = clip_shape(cfg)
    data = cfg.data
    start = time.perf_counter()
    root = ensure_synth_tree(
        cache, "s4", image_size=size, seed=0, write_pkl=False, clips_per_split={"train": clips, "val": 0, "test": 0}
    )
    generation_s = time.perf_counter() - start
    augment = dict(data.augment) if data.get("augment") else False
    dataset = DATASETS["s4"](root, "train", image_size=size, augment=augment, audio_source="wav")
    loader_error = None
    try:
        batches, rates = _time_loader(dataset, batch_size=batch_size, workers=workers, passes=passes, keep=keep)
    except Exception as error:  # e.g. a small /dev/shm: said in the report, then the batches come from the main process
        if workers == 0:
            raise
        log.exception("loader with %d workers failed", workers)
        loader_error = (
            f"{workers} workers failed ({type(error).__name__}: {' '.join(str(error).split())[:200]}); measured with 0"
        )
        workers = 0
        batches, rates = _time_loader(dataset, batch_size=batch_size, workers=0, passes=passes, keep=keep)
    return batches, {
        "loader_clips_per_s": statistics.median(rates),
        "loader_passes": rates,
        "workers": workers,
        "clips": len(dataset),
        "generation_s": generation_s,
        "batch_size": batch_size,
        "image_size": size,
        "error": loader_error,
    }


def _time_loader(dataset, *, batch_size: int, workers: int, passes: int, keep: int) -> tuple[list[dict], list[float]]:
    from torch.utils.data import DataLoader

    from avseg.data.collate import collate_clips

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_clips,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    batches, rates = [], []
    for index in range(passes + 1):  # the first pass starts the workers and is not timed
        start = time.perf_counter()
        count = 0
        for batch in loader:
            count += len(batch["video_id"])
            if len(batches) < keep:
                batches.append(batch)
        if index > 0:
            rates.append(count / (time.perf_counter() - start))
    return batches, rates


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_steps(
    module,
    batches: Sequence[dict[str, Any]],
    *,
    steps: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = torch.bfloat16,
) -> dict[str, Any]:
    """``steps`` optimiser steps cycling through ``batches`` (already on ``device``): step times,
    losses, peak memory. The first 5 steps (or a fifth of them) are warm-up: cuDNN and Triton pick
    and compile kernels there; the median is over the rest."""
    module.to(device).train()
    optimizer = optimizer_of(module)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    nonfinite = 0
    for step in range(steps):
        batch = batches[step % len(batches)]
        sync(device)
        start = time.perf_counter()
        terms = train_step(module, optimizer, batch, autocast_dtype=autocast_dtype)
        sync(device)
        times.append(time.perf_counter() - start)
        loss = float(terms["loss"])
        losses.append(loss)
        nonfinite += not math.isfinite(loss)
    warmup = min(5, max(1, steps // 5)) if steps > 1 else 0
    median = statistics.median(times[warmup:])
    clips = int(batches[0]["frames"].shape[0])
    finite_params = all(bool(torch.isfinite(p).all()) for p in module.parameters())
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "step_s_median": median,
        "first_step_s": times[0],
        "clips_per_s": clips / median,
        "clips_per_batch": clips,
        "losses": losses,
        "nonfinite_losses": nonfinite,
        "finite_params": finite_params,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def training_lines(result: dict[str, Any], loader: dict[str, Any], frames_per_clip: int) -> list[str]:
    losses = result["losses"]
    peak = "n/a (CPU)" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.2f} GiB"
    return [
        "| measure | value |",
        "|---|---|",
        f"| batch | {result['clips_per_batch']} clips x {frames_per_clip} frames, {loader['image_size']} px |",
        f"| steps | {result['steps']} ({result['warmup_steps']} warm-up; first step {result['first_step_s']:.2f} s) |",
        f"| median step | {result['step_s_median'] * 1e3:.1f} ms |",
        f"| training clips/s | {result['clips_per_s']:.2f} |",
        f"| data loader clips/s ({loader['workers']} workers, {loader['clips']} clips, median of "
        f"{len(loader['loader_passes'])} passes) | {loader['loader_clips_per_s']:.2f}"
        + (f" ({loader['error']})" if loader.get("error") else "")
        + " |",
        f"| peak GPU memory (allocated) | {peak} |",
        f"| loss first / last / min / max | {losses[0]:.3f} / {losses[-1]:.3f} / "
        f"{min(losses):.3f} / {max(losses):.3f} |",
        f"| non-finite losses / all parameters finite | {result['nonfinite_losses']} / "
        f"{'yes' if result['finite_params'] else 'NO'} |",
    ]


# ------------------------------------------------------------------------------------------------
# the report


def build_report(
    *,
    header: Sequence[str],
    kernels: list[str] | None,
    training: list[str] | None,
    backends: list[str],
    verdict: Sequence[str],
) -> str:
    lines = ["# avseg GPU check (benchmarks/gpu_check.py)", "", *header, ""]
    lines += ["## (a) Multi-scale deformable attention", ""]
    lines += kernels if kernels is not None else ["skipped (--skip kernels)"]
    lines += ["", "## (b) s4_r50 training steps, bf16 autocast", ""]
    lines += training if training is not None else ["skipped (--skip training)"]
    lines += ["", "## (c) Backend chosen by `auto`", "", *backends, "", "## Verdict", "", *verdict]
    return "\n".join(lines) + "\n"


def verdict_lines(kernel: list[dict[str, Any]] | None, training: dict[str, Any] | str | None) -> list[str]:
    """Pass/fail lines: avseg's implementations (torch path, Triton) within each dtype's tolerance
    and keeping the dtypes, and finite training. grid_sample rows are the comparison only: in
    fp16/bf16 PyTorch's grid_sample computes and accumulates in that dtype, so its errors are
    reported, not judged."""
    tolerance = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}  # of max(1, max |ref|); grad_loc is excluded (kinks)
    lines = []
    for r in kernel or []:
        if r["impl"] not in JUDGED_IMPLS:
            continue
        if "error" in r:
            lines.append(f"- FAIL: {r['impl']} {r['size']} {r['dtype']}: {r['error']}")
            continue
        worst = max(r["errors"][name] for name in ("out", "grad_value", "grad_attn"))
        if worst > tolerance[r["dtype"]] or not r["dtypes_ok"]:
            lines.append(
                f"- FAIL: {r['impl']} {r['size']} {r['dtype']}: error {worst:.1e} (tolerance "
                f"{tolerance[r['dtype']]:.0e}), dtypes kept: {r['dtypes_ok']}"
            )
    if isinstance(training, str):
        lines.append(f"- FAIL: training: {training}")
    elif training is not None and (training["nonfinite_losses"] or not training["finite_params"]):
        lines.append(
            f"- FAIL: training: {training['nonfinite_losses']} non-finite losses, parameters finite: "
            f"{training['finite_params']}"
        )
    if not lines:
        lines.append(
            "- PASS: every output / grad_value / grad_attn of the torch path and Triton within tolerance (fp32 1e-4, "
            "fp16 1e-2, bf16 5e-2 of max(1, max |ref|); grad_loc and grid_sample reported only), dtypes kept, "
            "training finite"
        )
    return lines


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def run_training(args: argparse.Namespace, device: torch.device):
    """Section (b): the loader measurement, then the training steps; (result, table lines, backend calls)."""
    cfg = compose_experiment(["experiment=s4_r50", *RANDOM_INIT])
    _, frames_per_clip, _ = clip_shape(cfg)
    with contextlib.ExitStack() as stack:
        cache = args.cache or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="avseg-gpu-check-")))
        batches, loader = synth_batches(
            cfg, cache=cache, clips=args.clips, workers=args.workers, passes=args.loader_passes, keep=4
        )
    log.info("loader: %.1f clips/s; training %d steps", loader["loader_clips_per_s"], args.steps)
    torch.manual_seed(0)
    module = build_module(cfg)
    with recording_backends() as calls:
        result = train_steps(module, [to_device(b, device) for b in batches], steps=args.steps, device=device)
    return result, training_lines(result, loader, frames_per_clip), calls


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    device = require_cuda()
    started = time.perf_counter()
    peak, peak_source = peak_bandwidth(device, args.peak_gbps)
    properties = torch.cuda.get_device_properties(device)
    import triton

    header = [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {torch.cuda.get_device_name(device)} "
        f"({properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB); "
        f"torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}; python {platform.python_version()}; "
        f"{os.cpu_count()} CPUs.",
        f"Peak bandwidth for the floor: {peak} GB/s ({peak_source or 'unknown device: pass --peak-gbps'}).",
    ]

    kernels = None
    if "kernels" not in args.skip:
        kernels = kernel_rows(
            device, sizes=args.sizes, dtypes=args.dtypes, impls=args.impls, repeats=args.repeats, peak_gbps=peak
        )

    training = training_table = None
    calls = None
    if "training" not in args.skip:
        try:
            training, training_table, calls = run_training(args, device)
        except Exception as error:  # reported in the verdict; sections (a) and (c) still print
            log.exception("training failed")
            training = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
            training_table = [f"FAILED: {training}"]

    backends = backend_lines(device, calls)
    header.append(f"Whole check: {time.perf_counter() - started:.0f} s.")
    report = build_report(
        header=header,
        kernels=kernel_table(kernels) if kernels is not None else None,
        training=training_table,
        backends=backends,
        verdict=verdict_lines(kernels, training),
    )
    print(report, flush=True)
    if args.out is not None:
        write_atomically(args.out, report)
    return 0 if "FAIL" not in report.split("## Verdict", 1)[1] else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except NoGPUError as error:
        raise SystemExit(f"gpu_check: {error}") from None
