"""``model.init_from``: start a ``QDFormer`` from a ReferFormer checkpoint (``r50_pretrained.pth``).

A ReferFormer checkpoint (``main.py`` / ``main_pretrain.py``) is ``{"model": state_dict,
"optimizer": ..., "lr_scheduler": ..., "epoch": int, "args": argparse.Namespace}``. It is read with
``torch.load(weights_only=True)`` and only ``argparse.Namespace`` allow-listed: no code in the
file runs, and the ``args`` attribute bag does not make loading fail. A bare state dict also works.

Every checkpoint key falls in one group that is either copied into the avseg parameter of the same
meaning (``REFERFORMER_COPIED``) or skipped with a stated reason (``REFERFORMER_SKIPPED``):

========================  =========================================  ==============================
ReferFormer               avseg                                      how
========================  =========================================  ==============================
backbone.0.body.*         backbone.body.*                            copied (torchvision ResNet)
input_proj.{l}.*          neck.proj.{l}.*                            copied
transformer.level_embed   fusion.encoder.level_embed                 copied
transformer.encoder.*     fusion.encoder.layers.*                    copied (layers beyond depth skipped)
transformer.decoder.*     decoder.layers.*                           copied (layers beyond depth skipped)
transformer.reference_..  decoder.reference_points                   copied
bbox_embed.{l}.*          decoder.bbox_embed.{l}.*                   copied (``box_head: per_layer``)
controller.*              decoder.mask_head.controller.*             copied; the last layer's rows
                                                                     reordered when avseg reads
                                                                     ``controller_layout: interleaved``
========================  =========================================  ==============================

Skipped: the text encoder, text resizer, text-visual fusion and text pixel decoder (no counterpart
in an audio model), ``query_embed`` (ReferFormer's query slots are text-conditioned; avseg's query
positions index the K audio sub-spaces), ``class_embed`` (starts fresh, as ReferFormer's own
fine-tuning loader, the ``load_pretrained_weights.py`` script of wjn922/ReferFormer, deletes it),
``transformer.decoder.bbox_embed`` (the same tensors as ``bbox_embed``, stored twice by
ReferFormer), box heads when avseg shares one (``box_head: shared``), layers beyond this model's
depth.

Errors (``CheckpointError`` naming the file): an unknown checkpoint key, a shape mismatch, a mapped
key this model lacks, or a model key no group provides outside ``REFERFORMER_ALLOWED_MISSING``.
The report (copied / reordered / skipped groups with reasons, left at init) goes to ``logging``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from avseg.errors import CheckpointError

log = logging.getLogger(__name__)

COPY, SKIP = "copy", "skip"


# group name -> (checkpoint regex, avseg template): copied into the parameter of the same meaning
REFERFORMER_COPIED: dict[str, tuple[str, str]] = {
    "backbone": (r"^backbone\.0\.body\.(.+)$", r"backbone.body.\1"),
    "input_proj": (r"^input_proj\.(\d+)\.(.+)$", r"neck.proj.\1.\2"),
    "level_embed": (r"^transformer\.level_embed$", r"fusion.encoder.level_embed"),
    "encoder": (r"^transformer\.encoder\.layers\.(\d+)\.(.+)$", r"fusion.encoder.layers.\1.\2"),
    "decoder": (r"^transformer\.decoder\.layers\.(\d+)\.(.+)$", r"decoder.layers.\1.\2"),
    "reference_points": (r"^transformer\.reference_points\.(.+)$", r"decoder.reference_points.\1"),
    "box heads": (r"^bbox_embed\.(\d+)\.(.+)$", r"decoder.bbox_embed.\1.\2"),
    "controller": (r"^controller\.(.+)$", r"decoder.mask_head.controller.\1"),
}
# group name -> (checkpoint regex, why it is skipped); no key matches both tables
REFERFORMER_SKIPPED: dict[str, tuple[str, str]] = {
    "decoder box-head alias": (
        r"^transformer\.decoder\.(bbox_embed|class_embed)\.",
        "the same tensors as the top-level bbox_embed (ReferFormer hands its box heads to the decoder)",
    ),
    "class head": (
        r"^class_embed\.",
        "starts fresh, as ReferFormer's fine-tuning loader does (its classes are not AVS's)",
    ),
    "query embedding": (
        r"^query_embed\.",
        "ReferFormer's query slots are text-conditioned; avseg's query positions index the K audio sub-spaces",
    ),
    "text encoder": (r"^text_encoder\.", "text branch: no counterpart in an audio model"),
    "text resizer": (r"^resizer\.", "text branch: no counterpart in an audio model"),
    "text-visual fusion": (r"^fusion_module\.", "text-visual early fusion: avseg's audio fusion is new"),
    "text position": (r"^text_pos\.", "text branch: no counterpart in an audio model"),
    "pixel decoder": (
        r"^pixel_decoder\.",
        "ReferFormer's text-conditioned FPN; avseg's FPN (with the audio-dual block) has other modules",
    ),
}

# Model keys a ReferFormer checkpoint does not provide (left at their init).
REFERFORMER_ALLOWED_MISSING: tuple[str, ...] = (
    r"^audio_encoder\.",
    r"^decomposition\.",
    r"^fusion\.(early_fusion|dual|out16|out8|reduce8|lateral4|out4|mask_proj|similarity)\.",
    r"^decoder\.(query_pos|extra_content|class_embed)\.",
    r"\.num_batches_tracked$",
)

_LAYER_KEY = re.compile(r"^(fusion\.encoder\.layers|decoder\.layers|decoder\.bbox_embed)\.(\d+)\.")


@dataclass
class InitReport:
    """What ``load_init_from`` did, by group: ``copied`` / ``reordered`` (model keys),
    ``skipped`` (checkpoint keys per reason), ``left_at_init`` (model keys)."""

    path: str
    copied: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    reordered: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    left_at_init: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> list[str]:
        """Every model key that received a checkpoint tensor."""
        return sorted(k for keys in (*self.copied.values(), *self.reordered.values()) for k in keys)

    @property
    def skipped_keys(self) -> list[str]:
        return sorted(k for keys in self.skipped.values() for k in keys)

    def summary(self) -> str:
        lines = [f"init_from {self.path}: {len(self.loaded)} tensors loaded"]
        for title, groups in (("copied", self.copied), ("reordered", self.reordered)):
            for name, keys in sorted(groups.items()):
                lines.append(f"  {title}: {name} ({len(keys)} tensors)")
        for reason, keys in sorted(self.skipped.items()):
            lines.append(f"  skipped: {reason} ({len(keys)} tensors)")
        modules = sorted({".".join(k.split(".")[:2]) for k in self.left_at_init})
        lines.append(
            f"  left at init (not in the checkpoint): {len(self.left_at_init)} tensors in {', '.join(modules)}"
        )
        return "\n".join(lines)


def read_referformer_state(path: str) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a ReferFormer checkpoint (or a bare state dict), read safely."""
    if not os.path.isfile(path):
        raise CheckpointError(path, "init_from checkpoint does not exist")
    try:
        # weights only; ReferFormer stores its argparse.Namespace `args`: a plain attribute bag
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise CheckpointError(path, f"cannot be read as a weights-only torch file: {exc}") from exc
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(path, "expected a state dict, or a dict with the state dict under `model`")
    return dict(state)


def controller_permutation(head: nn.Module) -> torch.Tensor | None:
    """Row order that turns ReferFormer's controller output ([all weights, all biases]) into the
    layout ``head`` reads; None when they are the same."""
    if head.controller_layout == "referformer":
        return None
    source = type(head).param_slices_for(head.layer_shapes, "referformer")
    target = head.param_slices()
    total = sum(o * i + o for o, i in head.layer_shapes)
    order = torch.empty(total, dtype=torch.long)
    for (src_w, src_b), (dst_w, dst_b) in zip(source, target):
        order[dst_w] = torch.arange(src_w.start, src_w.stop)
        order[dst_b] = torch.arange(src_b.start, src_b.stop)
    return order


def _group_of(key: str) -> tuple[str, str | None, str, str] | None:
    """(group, avseg key or None, COPY | SKIP, reason) of a checkpoint key; None: no group."""
    for name, (pattern, template) in REFERFORMER_COPIED.items():
        if re.match(pattern, key):
            return name, re.sub(pattern, template, key), COPY, ""
    for name, (pattern, reason) in REFERFORMER_SKIPPED.items():
        if re.match(pattern, key):
            return name, None, SKIP, reason
    return None


def load_init_from(net: nn.Module, path: str | os.PathLike) -> InitReport:
    """Initialise ``net`` (a ``QDFormer``) from a ReferFormer checkpoint; see the module docstring."""
    path = os.fspath(path)
    state = read_referformer_state(path)
    own = net.state_dict()
    depth = {
        "fusion.encoder.layers": len(net.fusion.encoder.layers),
        "decoder.layers": len(net.decoder.layers),
        "decoder.bbox_embed": len(net.decoder.layers),
    }
    shared_box_head = net.decoder.box_head == "shared"
    controller_order = controller_permutation(net.decoder.mask_head)
    last_controller = f"decoder.mask_head.controller.layers.{len(net.decoder.mask_head.controller.layers) - 1}."
    report = InitReport(path=path)
    to_load: dict[str, torch.Tensor] = {}
    unknown, absent, wrong_shape = [], [], []
    for key, value in state.items():
        group = _group_of(key)
        if group is None:
            unknown.append(key)
            continue
        name, target, action, reason = group
        if action == SKIP:
            report.skipped[f"{name}: {reason}"].append(key)
            continue
        if name == "box heads" and shared_box_head:
            report.skipped["box heads: this model shares one box head (model.decoder.box_head: shared)"].append(key)
            continue
        layer = _LAYER_KEY.match(target)
        if layer and int(layer.group(2)) >= depth[layer.group(1)]:
            report.skipped[f"{name}: layers beyond this model's depth ({depth[layer.group(1)]})"].append(key)
            continue
        if target not in own:
            if key.endswith(".num_batches_tracked"):  # a BatchNorm counter; avseg's FrozenBatchNorm has none
                report.skipped[f"{name}: BatchNorm step counters (this model's norm layers keep none)"].append(key)
            else:
                absent.append(f"{key} -> {target}")
            continue
        if own[target].shape != value.shape:
            wrong_shape.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
            continue
        if controller_order is not None and target.startswith(last_controller):
            to_load[target] = value[controller_order]
            report.reordered["controller output rows: [all weights, all biases] -> [w0 b0 w1 b1 ...]"].append(target)
        else:
            to_load[target] = value
            report.copied[name].append(target)
    not_provided = [k for k in own if k not in to_load]
    disallowed_missing = [k for k in not_provided if not any(re.search(p, k) for p in REFERFORMER_ALLOWED_MISSING)]
    if shared_box_head:
        disallowed_missing = [k for k in disallowed_missing if not k.startswith("decoder.bbox_embed.")]
    groups = {
        "unexpected checkpoint keys (no ReferFormer group)": unknown,
        "mapped keys this model does not have": absent,
        "shape mismatches": wrong_shape,
        "model keys the checkpoint does not provide": disallowed_missing,
    }
    problems = [f"{what}: {sorted(keys)}" for what, keys in groups.items() if keys]
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    net.load_state_dict(to_load, strict=False)
    report.left_at_init = sorted(not_provided)
    log.info("%s", report.summary())
    return report
