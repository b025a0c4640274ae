"""CPU latency, FLOPs and parameters of QDFormer (the s4_r50 model: ResNet-50, C = 256, 5 frames,
224 px, binary AVS, VGGish on log-mel) against the machine's own matmul throughput.

    python benchmarks/model_latency.py [--repeats 5] [--threads N] [--out latency.md]

Prints a markdown report (and writes it to --out atomically when given): forward time of the whole model and
of the ResNet-50 backbone alone, their FLOPs (torch.utils.flop_counter.FlopCounterMode), achieved
GFLOP/s, the fp32 matmul GFLOP/s measured in the same run, a per-part time table (forward hooks)
and parameter counts per part. Weights are random (no downloads); timings do not depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from avseg.models.build import build_qdformer

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

# part name -> submodule path; "fpn" is the fusion module minus its early fusion, encoder and dual block
PARTS = {
    "backbone": "backbone",
    "audio encoder": "audio_encoder",
    "decomposition": "decomposition",
    "neck (input projection)": "neck",
    "early fusion (gated cross-attn)": "fusion.early_fusion",
    "deformable encoder": "fusion.encoder",
    "dual block": "fusion.dual",  # R2VOS's clip-level block in the paper setup (model.fusion.dual_form)
    "decoder + heads": "decoder",
}


def s4_r50_model_config() -> dict:
    overrides = [
        "backbone.weights=null",
        "backbone.random_init=true",
        "audio_encoder.vggish_weights=null",
        "audio_encoder.random_init=true",
        "num_classes=1",
        "ms_deform_backend=torch",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="qdformer", overrides=overrides)
    root = OmegaConf.create({"paths": {"weights_dir": "unused"}, "model": cfg})
    return OmegaConf.to_container(root.model, resolve=True)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(repeats: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_time(lambda: torch.mm(a, b), repeats=max(repeats, 5), warmup=2)
    return 2 * n**3 / seconds / 1e9


def count_flops(fn) -> tuple[int, dict[str, int]]:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def part_times(net, run, repeats: int) -> dict[str, float]:
    """Median seconds per part from forward pre/post hooks over ``repeats`` runs."""
    samples: dict[str, list[float]] = {name: [] for name in list(PARTS) + ["fusion (all)"]}
    starts: dict[str, float] = {}
    handles = []
    modules = dict(PARTS, **{"fusion (all)": "fusion"})
    for name, path in modules.items():
        module = net.get_submodule(path)
        handles.append(
            module.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, name=name: samples[name].append(time.perf_counter() - starts[name])
            )
        )
    run()
    for values in samples.values():
        values.clear()
    for _ in range(repeats):
        run()
    for handle in handles:
        handle.remove()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    fusion_parts = ("early fusion (gated cross-attn)", "deformable encoder", "dual block")
    medians["top-down FPN (stride 32 -> 4)"] = medians.pop("fusion (all)") - sum(medians[p] for p in fusion_parts)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here (atomically)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    load_start = f"{os.getloadavg()[0]:.2f}"
    net = build_qdformer(s4_r50_model_config()).eval()
    frames = torch.randn(1, args.frames, 3, args.size, args.size)
    audio = torch.randn(1, args.frames, 1, 96, 64)
    batch_frames = frames.flatten(0, 1)

    @torch.inference_mode()
    def run_model():
        return net(frames, audio)

    @torch.inference_mode()
    def run_backbone():
        return net.backbone(batch_frames)

    # FlopCounterMode's module tracker needs autograd on (it hooks grad_fns): count with grad enabled
    model_flops, model_breakdown = count_flops(lambda: net(frames, audio))
    backbone_flops, _ = count_flops(lambda: net.backbone(batch_frames))

    # interleave matmul / backbone / model so a busy neighbour affects all three alike
    mm_rate = matmul_gflops(args.repeats)
    backbone_s = median_time(run_backbone, args.repeats)
    model_s = median_time(run_model, args.repeats)
    mm_rate_after = matmul_gflops(args.repeats)
    parts = part_times(net, run_model, args.repeats)
    mm_ref = max(mm_rate, mm_rate_after)
    load_end = f"{os.getloadavg()[0]:.2f}"

    def flops_of(path: str) -> int:
        key = "QDFormer." + path if path else "QDFormer"
        return model_breakdown.get(key, 0)

    lines = [
        "# QDFormer CPU latency (benchmarks/model_latency.py)",
        "",
        f"s4_r50 model part (ResNet-50, C = 256, {len(net.fusion.encoder.layers)}+{len(net.decoder.layers)} layers, "
        f"FFN {net.decoder.layers[0].linear1.out_features}, mask_dim {net.fusion.mask_dim}, "
        f"{net.decoder.box_head} box heads, dual block {net.fusion.dual_form}, VGGish on log-mel, binary), one clip "
        f"[1, {args.frames}, 3, {args.size}, {args.size}], fp32, eval, `torch.inference_mode` (FLOPs counted in a "
        "separate grad-enabled pass), "
        f"deformable attention torch path; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
        f"Load average at the start {load_start}, at the end {load_end} (1 min; other jobs on the "
        f"machine slow every row, compare ratios within one run): medians of {args.repeats} runs; "
        "matmul measured before and after the model in the same process, the better of the two is 100%.",
        "",
        "| | time (ms, median) | GFLOP | GFLOP/s | % of matmul |",
        "|---|---:|---:|---:|---:|",
        f"| fp32 matmul 2048^2 (before / after) | | | {mm_rate:.1f} / {mm_rate_after:.1f} | 100 |",
        f"| ResNet-50 backbone alone | {backbone_s * 1e3:.1f} | {backbone_flops / 1e9:.2f} | "
        f"{backbone_flops / backbone_s / 1e9:.1f} | {100 * backbone_flops / backbone_s / 1e9 / mm_ref:.0f} |",
        f"| whole model | {model_s * 1e3:.1f} | {model_flops / 1e9:.2f} | {model_flops / model_s / 1e9:.1f} | "
        f"{100 * model_flops / model_s / 1e9 / mm_ref:.0f} |",
        "",
        "Per part (forward hooks, one extra pass per repeat; medians):",
        "",
        "| part | time (ms) | share | GFLOP | GFLOP/s | params (M) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total_parts = sum(parts.values())
    fusion_known = sum(
        flops_of(PARTS[p]) for p in ("early fusion (gated cross-attn)", "deformable encoder", "dual block")
    )
    for name, seconds in parts.items():
        if name.startswith("top-down FPN"):
            flops = flops_of("fusion") - fusion_known
            params = sum(
                p.numel()
                for n, p in net.fusion.named_parameters()
                if not n.startswith(("early_fusion", "encoder", "dual"))
            )
        else:
            flops = flops_of(PARTS[name])
            params = sum(p.numel() for p in net.get_submodule(PARTS[name]).parameters())
        rate = flops / seconds / 1e9 if seconds > 0 else float("nan")
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {100 * seconds / total_parts:.0f}% | {flops / 1e9:.2f} | {rate:.1f} | "
            f"{params / 1e6:.2f} |"
        )
    total_params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    lines += [
        f"| **sum of parts** | {total_parts * 1e3:.1f} | 100% | {model_flops / 1e9:.2f} | | {total_params / 1e6:.2f} |",
        "",
        f"Parameters: {total_params / 1e6:.2f} M in all, {trainable / 1e6:.2f} M trainable "
        "(frozen: VGGish, ResNet stem + res2, FrozenBatchNorm statistics).",
        "FLOPs count matmuls and convolutions (FlopCounterMode); the deformable-attention sampling "
        "(gather / bilinear weights) is memory traffic and is not counted.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is None:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as handle:
        handle.write(report)
    os.replace(handle.name, args.out)


if __name__ == "__main__":
    main()
