"""Batching of clip dicts from the AVSBench loaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def collate_clips(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of clip dicts into one batch.

    Tensors are stacked on a new leading batch axis (`frames` [B,T,3,H,W], `masks` [B,T,H,W],
    `frame_valid` / `label_valid` [B,T] bool, `audio` [B,T,1,96,64] or [B,T,128]); ints become a
    long tensor (`index` [B]); strings stay a list (`video_id`). Every item must carry the same keys
    and, per key, tensors of one shape and dtype.
    """
    if len(items) == 0:
        raise ValueError("collate_clips: empty batch")
    keys = list(items[0].keys())
    for position, item in enumerate(items[1:], start=1):
        if list(item.keys()) != keys:
            raise ValueError(f"collate_clips: item {position} has keys {list(item.keys())}, item 0 has {keys}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            for position, value in enumerate(values):
                if not isinstance(value, torch.Tensor) or value.shape != first.shape or value.dtype != first.dtype:
                    raise ValueError(
                        f"collate_clips: {key!r} of item {position} is "
                        f"{getattr(value, 'shape', type(value).__name__)} {getattr(value, 'dtype', '')}, "
                        f"item 0 has {tuple(first.shape)} {first.dtype}"
                    )
            batch[key] = torch.stack(values, dim=0)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(first, str):
            batch[key] = list(values)
        else:
            raise TypeError(f"collate_clips: cannot batch {key!r} of type {type(first).__name__}")
    return batch
