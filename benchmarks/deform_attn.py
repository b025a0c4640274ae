"""Benchmark multi-scale deformable attention: grid_sample reference vs the torch path (vs Triton).

Prints a markdown table of forward and backward medians, measured side by side (interleaved
repeats in one process), and checks in the same run that the implementations agree. Needs only
torch (+ triton for the GPU rows): runs on a GPU machine where nothing else is installed.

    python benchmarks/deform_attn.py                      # CPU, AVS and Deformable DETR sizes
    python benchmarks/deform_attn.py --device cuda        # + Triton, GB/s, fraction of the floor
    python benchmarks/deform_attn.py --sizes avs --compile  # + torch.compile of the reference

Sizes: ``avs`` = one 5-frame clip at 224 px (N=5, levels 28x28, 14x14, 7x7, 4x4, Lq = S = 1045);
``detr`` = the Deformable DETR encoder at 800x1333 (N=2, levels 100x167, 50x84, 25x42, 13x21,
Lq = S = 22,223). Both M=8, D=32, L=P=4, fp32.

Errors are relative to the grid_sample reference (max |diff| / max(1, max |ref|)). grad_loc can
differ by more at a few samples: where fp32 rounding of ``loc * W - 0.5`` puts a point on the other
side of an integer pixel coordinate, the bilinear gradient jumps (both fp32 implementations are
then equally far from fp64).

Memory floor (forward): bytes of value + locations + weights + output over the peak bandwidth
(DEFORM_ATTN.md); "floor %" is floor time / measured time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    SIZES,
    make_inputs,
    memory_floor_bytes,
    peak_bandwidth,
    relative_errors,
    run_once,
    use_checkout_if_not_installed,
)

use_checkout_if_not_installed()

from avseg.ops import ms_deform_attn, ms_deform_attn_grid_sample, ms_deform_attn_torch  # noqa: E402


def benchmark(size, device, functions, repeats, warmup):
    inputs = make_inputs(size, device, torch.float32)
    times = {name: ([], []) for name in functions}
    results = {}
    for name, function in functions.items():  # warm-up (and compile, counted separately)
        start = time.perf_counter()
        for _ in range(warmup):
            forward, backward, output, grads = run_once(function, inputs, device)
        results[name] = (output, *grads)
        times[name + "/first"] = time.perf_counter() - start
    for _ in range(repeats):  # interleaved: every implementation sees the same machine state
        for name, function in functions.items():
            forward, backward, _, _ = run_once(function, inputs, device)
            times[name][0].append(forward)
            times[name][1].append(backward)
    reference = results["grid_sample"]
    rows = []
    for name in functions:
        forward = statistics.median(times[name][0])
        backward = statistics.median(times[name][1])
        rows.append(
            dict(
                size=size,
                name=name,
                forward_ms=forward * 1e3,
                backward_ms=backward * 1e3,
                total_ms=(forward + backward) * 1e3,
                first_s=times[name + "/first"],
                errors=relative_errors(reference, results[name]),
            )
        )
    base = next(r for r in rows if r["name"] == "grid_sample")
    for row in rows:
        row["speedup"] = base["total_ms"] / row["total_ms"]
        row["fwd_speedup"] = base["forward_ms"] / row["forward_ms"]
    floor_bytes = memory_floor_bytes(inputs)[0]
    return rows, floor_bytes


def bf16_check(device: torch.device) -> float:
    """Triton on bf16 inputs vs the torch path on the same (rounded) inputs in fp32."""
    value, shapes, start, locations, weights, _ = make_inputs("avs", device, torch.float32)
    low = [t.bfloat16() for t in (value, locations, weights)]
    output = ms_deform_attn(low[0], shapes, start, low[1], low[2], backend="triton")
    expected = ms_deform_attn_torch(low[0].float(), shapes, start, low[1].float(), low[2].float())
    return (output.float() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="avs,detr", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile(grid_sample path)")
    parser.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth, GB/s")
    parser.add_argument(
        "--impls", default="", help="comma list of grid_sample, torch, triton (default: all that apply)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)

    functions = {"grid_sample": ms_deform_attn_grid_sample, "torch": ms_deform_attn_torch}
    if args.compile:
        functions["grid_sample+compile"] = torch.compile(ms_deform_attn_grid_sample)
    if device.type == "cuda":
        functions["triton"] = lambda *a: ms_deform_attn(*a, backend="triton")
    if args.impls:
        wanted = ["grid_sample"] + [name.strip() for name in args.impls.split(",") if name.strip() != "grid_sample"]
        unknown = [name for name in wanted if name not in functions]
        if unknown:
            raise SystemExit(f"--impls: {unknown} not available here (have {list(functions)})")
        functions = {name: functions[name] for name in wanted}
    peak, peak_source = peak_bandwidth(device, args.peak_gbps)

    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", threads {torch.get_num_threads()}, repeats {args.repeats} (medians), fp32"
    )
    header = (
        "| size | impl | fwd ms | bwd ms | fwd+bwd ms | vs grid_sample (fwd+bwd) | vs grid_sample (fwd) "
        "| first call s | rel. err out / grad_value / grad_attn | rel. err grad_loc |"
    )
    if device.type == "cuda":
        header += " fwd GB/s | floor % |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.sizes.split(","):
        rows, floor_bytes = benchmark(size.strip(), device, functions, args.repeats, args.warmup)
        for row in rows:
            line = (
                f"| {row['size']} | {row['name']} | {row['forward_ms']:.2f} | {row['backward_ms']:.2f} | "
                f"{row['total_ms']:.2f} | {row['speedup']:.2f}x | {row['fwd_speedup']:.2f}x | "
                f"{row['first_s']:.2f} | {max(row['errors'][0], row['errors'][1], row['errors'][3]):.1e} | "
                f"{row['errors'][2]:.1e} |"
            )
            if device.type == "cuda":
                gbps = floor_bytes / (row["forward_ms"] * 1e-3) / 1e9
                floor = f"{100 * gbps / peak:.1f}" if peak else "n/a"
                line += f" {gbps:.0f} | {floor} |"
            print(line, flush=True)
        print(f"<!-- {size}: forward memory floor {floor_bytes / 1e6:.1f} MB -->")
    if device.type == "cuda":
        print(f"\npeak bandwidth used for 'floor %': {peak} GB/s ({peak_source or 'unknown device'})")
        print(f"bf16 Triton forward vs fp32 torch path, max rel. error: {bf16_check(device):.2e}")


if __name__ == "__main__":
    main()
