"""Shared helpers of the benchmark commands (a helper module: it is no command itself).

- `use_checkout_if_not_installed`: lets a command run from a plain checkout (no ``pip install``);
- deformable attention: the AVS and Deformable DETR sizes, inputs, one timed forward + backward,
  relative errors, peak memory bandwidth by device name, the memory floors;
- training: the experiment's config composed as ``python -m avseg.train`` does, a random batch of
  its shape, and one optimiser step as Lightning runs it (autocast forward + loss, backward,
  gradient clipping, AdamW).

Imports torch only at import time (Hydra and avseg's training code inside the functions that
need them), so ``deform_attn.py`` runs where nothing but torch (+ triton) is installed.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def use_checkout_if_not_installed() -> None:
    """Put this checkout's ``src`` and ``kernels`` (as ``avseg_kernels``) on the path when avseg
    is not installed (e.g. a checkout copied to a GPU machine with torch + triton only)."""
    if importlib.util.find_spec("avseg") is None:
        sys.path.insert(0, str(REPO / "src"))
    if importlib.util.find_spec("avseg_kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "avseg_kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["avseg_kernels"] = module
        spec.loader.exec_module(module)


# ------------------------------------------------------------------------------------------------
# deformable attention

SIZES: dict[str, dict[str, Any]] = {
    "avs": dict(batch=5, level_shapes=[(28, 28), (14, 14), (7, 7), (4, 4)]),
    "detr": dict(batch=2, level_shapes=[(100, 167), (50, 84), (25, 42), (13, 21)]),
}
HEADS, HEAD_DIM, POINTS = 8, 32, 4
# Peak DRAM bandwidth in GB/s by device name fragment (vendor figures); --peak-gbps overrides.
PEAK_GBPS = {
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "H200": 4800.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}


def make_inputs(size: str | dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(value, shapes, start, locations, weights, grad_output) of a size (a name of `SIZES` or such
    a dict); Lq = S (an encoder), points around the map with some outside it."""
    spec = SIZES[size] if isinstance(size, str) else size
    heads, head_dim, points = spec.get("heads", HEADS), spec.get("head_dim", HEAD_DIM), spec.get("points", POINTS)
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spec["level_shapes"], dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    start = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    num_values = int(areas.sum())
    batch, levels = spec["batch"], len(spec["level_shapes"])
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator)
    # Deformable DETR's regime: points around a reference, some outside the map.
    locations = torch.rand(batch, num_values, heads, levels, points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(batch, num_values, heads, levels, points, generator=generator)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    grad_output = torch.randn(batch, num_values, heads * head_dim, generator=generator)
    to = dict(device=device, dtype=dtype)
    return (
        value.to(**to),
        shapes.to(device),
        start.to(device),
        locations.to(**to),
        weights.to(**to),
        grad_output.to(**to),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(function, inputs, device):
    """One forward (with autograd) and one backward; returns (fwd s, bwd s, output, grads)."""
    value, shapes, start, locations, weights, grad_output = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    sync(device)
    t0 = time.perf_counter()
    output = function(leaves[0], shapes, start, leaves[1], leaves[2])
    sync(device)
    t1 = time.perf_counter()
    output.backward(grad_output)
    sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, output.detach(), [leaf.grad for leaf in leaves]


def relative_errors(reference, candidate) -> list[float]:
    """max |a - b| / max(1, max |a|) for each pair, e.g. (output, grad_value, grad_loc, grad_attn)."""
    errors = []
    for ref, cand in zip(reference, candidate):
        scale = max(1.0, ref.abs().max().item())
        errors.append((ref.double() - cand.double()).abs().max().item() / scale)
    return errors


def memory_floor_bytes(inputs) -> tuple[int, int]:
    """(forward, backward) bytes that must cross DRAM at least once.

    Forward: read value, locations, weights; write the output. Backward: read those three and the
    output gradient; write the three gradients (each in its input's dtype)."""
    value, _, _, locations, weights, grad_output = inputs
    operands = sum(t.numel() * t.element_size() for t in (value, locations, weights))
    output = grad_output.numel() * grad_output.element_size()
    return operands + output, 2 * operands + output


def peak_bandwidth(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-gbps"
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    for fragment, gbps in PEAK_GBPS.items():
        if fragment in name:
            return gbps, name
    return None, name


# ------------------------------------------------------------------------------------------------
# training

# The paper setup with random weights (no downloads), and the default demo.
RANDOM_INIT = [
    "model.backbone.weights=null",
    "model.backbone.random_init=true",
    "model.audio_encoder.vggish_weights=null",
    "model.audio_encoder.random_init=true",
]
SETUPS: dict[str, list[str]] = {
    "synth_ms3": ["experiment=synth_ms3"],
    "s4_r50_224px": ["experiment=s4_r50", *RANDOM_INIT],
}


def compose_experiment(overrides: list[str]):
    """The ``train`` config with these overrides, composed as ``python -m avseg.train`` does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def build_module(cfg):
    """The LightningModule of a composed config (``hydra.utils.instantiate(cfg.model)``)."""
    import hydra.utils

    return hydra.utils.instantiate(cfg.model)


def clip_shape(cfg) -> tuple[int, int, int]:
    """(clips per batch, frames per clip, image size) of a composed config."""
    data = cfg.data
    size = int(data.synth.image_size) if data.get("synth") else int(data.image_size)
    return int(data.batch_size), (10 if data.subset == "avss" else 5), size


def random_batch(module, cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random batch of the experiment's shape: frames, audio (log-mel or embeddings), masks."""
    clips, frames_per_clip, size = clip_shape(cfg)
    frames = torch.randn(clips, frames_per_clip, 3, size, size, generator=generator)
    if module.hparams["audio_encoder"].get("input", "log_mel") == "embeddings":
        audio = torch.randn(clips, frames_per_clip, 128, generator=generator)
    else:
        audio = torch.randn(clips, frames_per_clip, 1, 96, 64, generator=generator)
    valid = torch.ones(clips, frames_per_clip, dtype=torch.bool)
    masks = (torch.rand(clips, frames_per_clip, size, size, generator=generator) > 0.7).long()
    return {"frames": frames, "audio": audio, "frame_valid": valid, "label_valid": valid, "masks": masks}


def train_step(
    module, optimizer, batch: dict[str, torch.Tensor], *, autocast_dtype: torch.dtype | None = None, clip: float = 0.1
) -> dict[str, torch.Tensor]:
    """One optimiser step as Lightning runs it: forward + loss under autocast (when
    ``autocast_dtype`` is given: ``precision=bf16-mixed`` is ``torch.bfloat16``), backward, gradient
    clipping (L2 norm, the configs' 0.1), AdamW step. Returns the loss terms (detached)."""
    device_type = batch["frames"].device.type
    with torch.autocast(
        device_type=device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        outputs = module.net(batch["frames"], batch["audio"], batch["frame_valid"])
        terms = module.criterion(outputs, batch["masks"], batch["label_valid"])
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


def optimizer_of(module):
    """The module's own optimiser (``configure_optimizers``), without the scheduler."""
    optimizers = module.configure_optimizers()
    return optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
