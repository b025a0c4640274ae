"""Visual backbones: torchvision ResNet / Swin-T and any timm ``features_only`` model.

Every backbone maps ``x [B*T, 3, H, W]`` to a list of four feature maps at strides 4, 8, 16 and
32 (``[B*T, C_i, H/s, W/s]``) and exposes their channel counts as ``out_channels``. Pretrained
weights come only from a local file (never downloaded): ``weights=None`` is an error unless
``random_init=True``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from avseg.errors import CheckpointError, ConfigError

STRIDES: tuple[int, ...] = (4, 8, 16, 32)


def _list_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or one wrapped under ``state_dict`` / ``model``. Raises
    ``CheckpointError`` naming the file for a missing, unreadable or non-state-dict file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "weights file does not exist (set the path, or random_init: true)")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any load failure is reported with the file name
        raise CheckpointError(path, f"cannot be read as a weights-only torch file: {exc}") from exc
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "is not a state dict (a mapping of names to tensors)")
    return dict(obj)


def load_checked(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    drop_prefixes: Sequence[str] = (),
    ignore_missing_suffixes: Sequence[str] = ("num_batches_tracked",),
) -> dict[str, torch.Tensor]:
    """Load ``path`` into ``module`` strictly, after dropping keys under ``drop_prefixes``.

    Any other missing or unexpected key, or a shape mismatch, raises ``CheckpointError`` that
    names the file and the keys. Returns the state dict that was loaded.
    """
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in drop_prefixes)}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not any(k.endswith(s) for s in ignore_missing_suffixes)]
    unexpected = [k for k in state if k not in expected and not any(k.endswith(s) for s in ignore_missing_suffixes)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list_keys(unexpected)}")
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if wrong_shape:
        problems.append(f"shape mismatch: {_list_keys(wrong_shape)}")
    if problems:
        raise CheckpointError(path, "; ".join(problems))
    state = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(state, strict=False)
    return state


def _check_init(weights: str | None, random_init: bool, what: str) -> None:
    if weights is None and not random_init:
        raise ConfigError(
            f"{what}: `weights` is null and `random_init` is false; give a local weights path "
            "(no downloads) or set random_init: true"
        )
    if weights is not None and random_init:
        raise ConfigError(f"{what}: both `weights` ({weights}) and `random_init: true` are set; choose one")


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by ``FrozenBatchNorm2d`` holding the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


class VisualBackbone(nn.Module):
    """Base class: ``forward(x [N, 3, H, W]) -> list of 4 maps`` at strides ``STRIDES``."""

    out_channels: list[int]
    strides: tuple[int, ...] = STRIDES


class ResNetBackbone(VisualBackbone):
    """torchvision ResNet (``resnet18/34/50/101``) returning res2..res5.

    The torchvision network lives under ``body`` (keys ``body.conv1.weight``, ``body.layer1.0...``)
    so ImageNet state dicts and the ReferFormer ``backbone.0.body.*`` keys map by prefix.
    ``frozen_bn`` swaps BatchNorm for FrozenBatchNorm2d (detection practice for small batches).
    Only the parts listed in ``trainable_stages`` train (``"stem"`` = conv1/bn1, 1..4 = layer1..4);
    the default (2, 3, 4) is DETR's (stem and res2 frozen).
    ``channels_last`` keeps the weights and the input in NHWC memory format: the same numbers,
    and on CPU (oneDNN) about 25% less time for ResNet-50 (docs/BENCHMARKS.md); the outputs are
    NHWC-strided NCHW tensors, which the neck's token flattening reads without a copy.
    """

    def __init__(
        self,
        *,
        name: str = "resnet50",
        weights: str | None = None,
        random_init: bool = False,
        frozen_bn: bool = True,
        trainable_stages: Sequence[int | str] = (2, 3, 4),
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        factories = {
            "resnet18": torchvision.models.resnet18,
            "resnet34": torchvision.models.resnet34,
            "resnet50": torchvision.models.resnet50,
            "resnet101": torchvision.models.resnet101,
        }
        if name not in factories:
            raise ConfigError(f"model.backbone.name: {name!r} is not one of {sorted(factories)}")
        _check_init(weights, random_init, f"model.backbone ({name})")
        net = factories[name](weights=None)
        del net.fc, net.avgpool  # classification head is not part of the backbone
        if weights is not None:
            load_checked(net, weights, drop_prefixes=("fc.",))
        if frozen_bn:
            freeze_batch_norm(net)
        self.body = net
        wide = name in ("resnet50", "resnet101")
        base = [64, 128, 256, 512]
        self.out_channels = [c * 4 for c in base] if wide else base
        stages = {"stem": [net.conv1, net.bn1], 1: [net.layer1], 2: [net.layer2], 3: [net.layer3], 4: [net.layer4]}
        for key, modules in stages.items():
            train = key in tuple(trainable_stages)
            for module in modules:
                module.requires_grad_(train)
        self.channels_last = channels_last
        if channels_last:
            # load_state_dict copies into these tensors, so later loads keep the format
            net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [N, 3, H, W]`` -> ``[res2 [N, C2, H/4, W/4], res3, res4, res5 [N, C5, H/32, W/32]]``."""
        b = self.body
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c2, c3, c4, c5]


class SwinTBackbone(VisualBackbone):
    """torchvision Swin-T; stage outputs (NHWC inside torchvision) returned as NCHW.

    The classification ``head.*`` keys are dropped on load; torchvision's final ``norm`` is
    applied to the stride-32 stage (the other stages go to the neck's GroupNorm projections).
    """

    def __init__(self, *, weights: str | None = None, random_init: bool = False) -> None:
        super().__init__()
        _check_init(weights, random_init, "model.backbone (swin_t)")
        net = torchvision.models.swin_t(weights=None)
        del net.head
        if weights is not None:
            load_checked(net, weights, drop_prefixes=("head.",))
        self.features = net.features
        self.norm = net.norm
        self.out_channels = [96, 192, 384, 768]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [N, 3, H, W]`` -> four NCHW maps at strides 4/8/16/32 (96/192/384/768 channels)."""
        outputs = []
        for index, block in enumerate(self.features):
            x = block(x)
            if index in (1, 3, 5, 7):  # after each stage (0 = patch embed, even = patch merging)
                outputs.append(self.norm(x) if index == 7 else x)
        return [o.permute(0, 3, 1, 2).contiguous() for o in outputs]


class TimmBackbone(VisualBackbone):
    """Any timm model with ``features_only=True`` whose feature reductions include 4, 8, 16, 32.

    Weights from a local file: the keys are checked against the full timm model (classifier keys
    of ``pretrained_cfg['classifier']`` dropped; any other mismatch is a CheckpointError), then
    timm loads them into the feature extractor (``pretrained_cfg_overlay.file``).
    """

    def __init__(
        self,
        *,
        name: str,
        weights: str | None = None,
        random_init: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        import timm

        _check_init(weights, random_init, f"model.backbone (timm {name})")
        if out_indices is None:
            probe = timm.create_model(name, pretrained=False, features_only=True)
            reductions = probe.feature_info.reduction()
            missing = [s for s in STRIDES if s not in reductions]
            if missing:
                raise ConfigError(
                    f"model.backbone.name: timm model {name!r} has feature reductions {reductions}, "
                    f"lacking {missing}; set model.backbone.out_indices"
                )
            out_indices = [reductions.index(s) for s in STRIDES]
            del probe
        kwargs: dict = dict(features_only=True, out_indices=tuple(out_indices))
        if weights is not None:
            full = timm.create_model(name, pretrained=False, num_classes=0)  # no classifier
            classifier = full.pretrained_cfg.get("classifier") or ()
            prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
            load_checked(full, weights, drop_prefixes=prefixes)  # validates keys; raises on mismatch
            del full
            self.body = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=os.fspath(weights)), **kwargs
            )
        else:
            self.body = timm.create_model(name, pretrained=False, **kwargs)
        reductions = self.body.feature_info.reduction()
        if list(reductions) != list(STRIDES):
            raise ConfigError(
                f"model.backbone.out_indices: timm model {name!r} gives reductions {reductions}, need {list(STRIDES)}"
            )
        self.out_channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x [N, 3, H, W]`` -> four NCHW maps at strides 4/8/16/32."""
        return list(self.body(x))
