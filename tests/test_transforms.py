"""Official resize/crop protocol (against PIL, as the official loaders use it) and joint augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from avseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    ClipTransform,
    normalize_frames,
    official_resize,
)
from avseg.errors import ConfigError


def random_clip(height: int, width: int, frames: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    masks = (rng.random((frames, height, width)) > 0.5).astype(np.uint8)
    return images, masks


def as_tensors(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks).long()


# 45x63 -> short side 32 gives 32x44: scale factors 45/32 and 63/44 put no output pixel centre exactly
# half-way between source pixels, where PIL and torch may round a tie differently.
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_official_resize_matches_pil(mode):
    images, masks = random_clip(45, 63)
    frames, mask = official_resize(*as_tensors(images, masks), image_size=32, mode=mode)
    assert frames.shape == (1, 3, 32, 32) and mask.shape == (1, 32, 32)
    size = (44, 32) if mode == "train" else (32, 32)
    ref_image = np.asarray(Image.fromarray(images[0]).resize(size, Image.BILINEAR)).astype(int)
    ref_mask = np.asarray(Image.fromarray(masks[0]).resize(size, Image.NEAREST)).astype(int)
    if mode == "train":  # centre crop, torchvision's offset rule
        left = int(round((size[0] - 32) / 2.0))
        ref_image, ref_mask = ref_image[:, left : left + 32], ref_mask[:, left : left + 32]
    assert np.array_equal(mask[0].numpy(), ref_mask)
    assert np.abs(frames[0].permute(1, 2, 0).numpy().astype(int) - ref_image).max() <= 1


def test_train_resize_keeps_aspect_eval_stretches():
    images = np.zeros((1, 32, 64, 3), dtype=np.uint8)
    images[0, :, :16] = 255  # left quarter white
    masks = np.zeros((1, 32, 64), dtype=np.uint8)
    train, _ = official_resize(*as_tensors(images, masks), image_size=32, mode="train")
    evaluation, _ = official_resize(*as_tensors(images, masks), image_size=32, mode="eval")
    # train: the centre crop drops the white quarter; eval: it becomes the first ~8 of 32 columns
    assert train.max() == 0
    assert (evaluation[0, 0, 0, :7] == 255).all() and (evaluation[0, 0, 0, 9:] == 0).all()


def test_already_sized_clip_is_untouched():
    frames, masks = as_tensors(*random_clip(32, 32, frames=3))
    out_frames, out_masks = official_resize(frames, masks, image_size=32, mode="train")
    assert out_frames is frames and out_masks is masks


def test_normalisation_is_imagenet():
    frames = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize_frames(frames)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.dtype == torch.float32 and torch.allclose(out[1, :, 2, 2], expected)


def test_flip_is_joint_and_shared_by_all_frames():
    images, masks = random_clip(16, 16, frames=4, seed=1)
    transform = ClipTransform(
        image_size=16,
        mode="eval",
        augment={"hflip_prob": 1.0, "brightness": 0, "contrast": 0, "saturation": 0},
    )
    frames, mask = transform(*as_tensors(images, masks))
    plain, plain_mask = ClipTransform(image_size=16, mode="eval")(*as_tensors(images, masks))
    assert torch.equal(frames, plain.flip(-1)) and torch.equal(mask, plain_mask.flip(-1))


def test_scale_crop_and_jitter_keep_masks_aligned_and_frames_consistent():
    # every frame identical, and its brightness encodes the mask: after a joint augmentation all frames
    # must still be identical and bright exactly where the mask is 1.
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[8:30, 12:40] = 1
    images = np.repeat((mask * 200 + 20)[None, :, :, None], 3, axis=3).repeat(3, axis=0).astype(np.uint8)
    masks = np.repeat(mask[None], 3, axis=0)
    config = AugmentConfig(hflip_prob=0.5, scale_min=0.3, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)
    transform = ClipTransform(image_size=32, mode="train", augment=config)
    for seed in range(8):
        frames, out_mask = transform(*as_tensors(images, masks), seed=seed)
        assert frames.shape == (3, 3, 32, 32) and out_mask.shape == (3, 32, 32)
        assert set(out_mask.unique().tolist()) <= {0, 1}
        assert torch.allclose(frames[0], frames[1]) and torch.allclose(frames[0], frames[2])
        assert torch.equal(out_mask[0], out_mask[1])
        grey = frames[0].mean(0)
        if 0 < out_mask[0].sum() < out_mask[0].numel():
            threshold = (grey[out_mask[0] == 1].mean() + grey[out_mask[0] == 0].mean()) / 2
            agreement = ((grey > threshold) == (out_mask[0] == 1)).float().mean()
            assert agreement > 0.9  # a misaligned mask (e.g. frames flipped, mask not) gives far less


def test_photometric_leaves_masks_alone():
    images, masks = random_clip(16, 16, frames=2, seed=3)
    transform = ClipTransform(
        image_size=16, mode="eval", augment={"hflip_prob": 0.0, "brightness": 0.5, "contrast": 0.5}
    )
    frames, out_mask = transform(*as_tensors(images, masks), seed=0)
    plain, _ = ClipTransform(image_size=16, mode="eval")(*as_tensors(images, masks))
    assert torch.equal(out_mask, torch.from_numpy(masks).long())
    assert not torch.allclose(frames, plain)


def test_seeded_augmentation_is_reproducible_and_spares_global_rng():
    images, masks = random_clip(24, 24, frames=2, seed=4)
    transform = ClipTransform(image_size=16, mode="train", augment={"scale_min": 0.5})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = transform(*as_tensors(images, masks), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    second = transform(*as_tensors(images, masks), seed=7)
    outputs = {transform(*as_tensors(images, masks), seed=s)[0].sum().item() for s in range(6)}
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len(outputs) > 1


def test_augment_options():
    assert AugmentConfig.from_option(False) is None and AugmentConfig.from_option(None) is None
    assert AugmentConfig.from_option(True) == AugmentConfig()
    assert AugmentConfig.from_option({"hflip_prob": 0.0, "ratio": [1, 1]}).ratio == (1.0, 1.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        AugmentConfig.from_option({"flip": 0.5})
    with pytest.raises(ConfigError, match="scale_min"):
        AugmentConfig(scale_min=0.0)
    with pytest.raises(ConfigError, match="hflip_prob"):
        AugmentConfig(hflip_prob=2.0)
    with pytest.raises(ConfigError, match="resize mode"):
        ClipTransform(image_size=16, mode="test")
