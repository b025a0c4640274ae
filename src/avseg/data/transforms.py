"""Clip transforms: the official AVSBench resize/crop protocol and optional joint augmentation.

Every transform here acts on a whole clip at once (frames `[T, 3, H, W]` uint8 and masks `[T, H, W]`
long), so all frames of a clip share one flip, one crop and one colour jitter, and the masks follow
the frames exactly (torchvision transforms v2 with `tv_tensors.Video` / `tv_tensors.Mask`).

Protocol (docs/AVSBENCH.md section 3): train = short side to `image_size` (bilinear for images, nearest
for masks) then centre crop `image_size`; val/test = resize to `image_size x image_size`.
Masks use `NEAREST_EXACT`, which picks the same source pixel as PIL's nearest filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from avseg.errors import ConfigError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

ResizeMode = Literal["train", "eval"]


def official_resize(
    frames: torch.Tensor, masks: torch.Tensor, *, image_size: int, mode: ResizeMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a clip the way the official loaders do.

    frames: uint8 [T, 3, H, W]; masks: long [T, H, W]. Returns both at [.., image_size, image_size].
    `mode="train"`: short side to image_size, then centre crop; `mode="eval"`: plain resize (the
    aspect ratio is not kept). A clip already at image_size x image_size is returned unchanged.
    """
    if mode not in ("train", "eval"):
        raise ConfigError(f"resize mode must be 'train' or 'eval', got {mode!r}")
    height, width = frames.shape[-2:]
    if (height, width) == (image_size, image_size):
        return frames, masks
    size = [image_size] if mode == "train" else [image_size, image_size]
    frames = TF.resize(frames, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    masks = TF.resize(masks, size, interpolation=InterpolationMode.NEAREST_EXACT)
    if mode == "train":
        frames = TF.center_crop(frames, [image_size, image_size])
        masks = TF.center_crop(masks, [image_size, image_size])
    return frames, masks


@dataclass(frozen=True)
class AugmentConfig:
    """Joint training augmentation; every part can be switched off.

    hflip_prob: probability of a horizontal flip of the whole clip (0 = off).
    scale_min: lower bound of the area fraction kept by a random resized crop back to image_size
        (1.0 = off; the crop's aspect ratio is drawn from `ratio`).
    brightness/contrast/saturation/hue: ColorJitter strengths on the frames only (0 = off).
    """

    hflip_prob: float = 0.5
    scale_min: float = 1.0
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0

    @classmethod
    def from_option(cls, option: bool | Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig | None:
        """`False`/`None` -> no augmentation; `True` -> defaults; a mapping -> those fields."""
        if option is None or option is False:
            return None
        if option is True:
            return cls()
        if isinstance(option, AugmentConfig):
            return option
        if isinstance(option, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(option) - known)
            if unknown:
                raise ConfigError(f"augment: unknown keys {unknown}; allowed: {sorted(known)}")
            values = dict(option)
            if "ratio" in values:
                values["ratio"] = tuple(float(r) for r in values["ratio"])
            return cls(**values)
        raise ConfigError(f"augment must be a bool or a mapping of {AugmentConfig.__name__} fields, got {option!r}")

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ConfigError(f"augment.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        if not 0.0 < self.scale_min <= 1.0:
            raise ConfigError(f"augment.scale_min must be in (0, 1], got {self.scale_min}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue must be in [0, 0.5], got {self.hue}")


def build_augmentation(config: AugmentConfig, *, image_size: int) -> v2.Compose:
    """A v2 pipeline applied once per clip to (Video [T,3,H,W] uint8, Mask [T,H,W])."""
    parts: list[v2.Transform] = []
    if config.hflip_prob > 0:
        parts.append(v2.RandomHorizontalFlip(p=config.hflip_prob))
    if config.scale_min < 1.0:
        # Masks take nearest interpolation automatically (tv_tensors.Mask).
        parts.append(
            v2.RandomResizedCrop(image_size, scale=(config.scale_min, 1.0), ratio=config.ratio, antialias=True)
        )
    if any(getattr(config, k) > 0 for k in ("brightness", "contrast", "saturation", "hue")):
        # ColorJitter leaves tv_tensors.Mask untouched.
        parts.append(
            v2.ColorJitter(
                brightness=config.brightness or None,
                contrast=config.contrast or None,
                saturation=config.saturation or None,
                hue=config.hue or None,
            )
        )
    return v2.Compose(parts)


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, 3, H, W] -> float32 [T, 3, H, W], ImageNet-normalised."""
    # (x / 255 - mean) / std as one subtract and one multiply (fewer passes over the clip)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return frames.to(torch.float32).sub_(mean).mul_(scale)


class ClipTransform:
    """Official resize (+ optional joint augmentation) + ImageNet normalisation for one clip.

    `__call__(frames uint8 [T,3,H,W], masks long [T,H,W])` -> (float32 [T,3,S,S], long [T,S,S]),
    S = image_size.
    """

    def __init__(
        self,
        *,
        image_size: int,
        mode: ResizeMode,
        augment: bool | Mapping[str, Any] | AugmentConfig | None = None,
    ) -> None:
        if image_size <= 0:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        if mode not in ("train", "eval"):
            raise ConfigError(f"resize mode must be 'train' or 'eval', got {mode!r}")
        self.image_size = int(image_size)
        self.mode: ResizeMode = mode
        self.augment_config = AugmentConfig.from_option(augment)
        self.augmentation = (
            build_augmentation(self.augment_config, image_size=self.image_size)
            if self.augment_config is not None
            else None
        )

    def __call__(
        self, frames: torch.Tensor, masks: torch.Tensor, *, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`seed`: draw the augmentation from a private RNG seeded with it (the global RNG is saved
        and restored), so an item's augmentation depends only on the seed; None draws from the
        global RNG."""
        frames, masks = official_resize(frames, masks, image_size=self.image_size, mode=self.mode)
        if self.augmentation is not None:
            if seed is None:
                video, mask = self.augmentation(tv_tensors.Video(frames), tv_tensors.Mask(masks))
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    video, mask = self.augmentation(tv_tensors.Video(frames), tv_tensors.Mask(masks))
            frames, masks = video.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return normalize_frames(frames), masks.to(torch.long)

    def __repr__(self) -> str:
        return f"ClipTransform(image_size={self.image_size}, mode={self.mode!r}, augment={self.augment_config})"
