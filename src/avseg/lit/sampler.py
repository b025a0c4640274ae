"""A resumable training sampler and data loader: mid-epoch resume without replaying or skipping clips.

Lightning (2.x) saves the state of every training data loader that has ``state_dict`` /
``load_state_dict`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, when a
run restarts, calls ``load_state_dict`` before it creates the loader's iterator. The loader here
uses that hook:

- `ResumableSampler` shuffles with its own generator seeded by ``(seed, epoch)`` (the global RNG
  is never touched, so resuming does not shift the model's dropout stream), shards the order over
  DDP ranks like ``DistributedSampler`` (it subclasses it, so Lightning does not wrap it again) and
  can skip the first ``n`` samples of its next pass.
- `ResumableDataLoader` records how many batches of the current epoch were trained on. The count
  comes from the trainer (`avseg.lit.callbacks.ResumeState` sets ``progress_fn``), not from what
  the loader handed out, because Lightning prefetches one batch ahead of the training step.

The augmentation of a clip must not draw from the global RNG either (the datamodule seeds it per
item); together with ``trainer.deterministic=true`` an interrupted and resumed run then ends with the
same weights as an uninterrupted one (tests/test_train_slow.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableSampler", "ResumableDataLoader"]


def _world() -> tuple[int, int]:
    """(num_replicas, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffling, sharded over DDP ranks, that can start in the middle of an epoch.

    Every rank draws the same permutation of ``range(len(dataset))`` from ``(seed, epoch)``, pads it
    (repeating from the start) or, with ``drop_last``, trims it to a multiple of the world size, and
    takes every ``num_replicas``-th index from ``rank``. ``skip(n)`` drops the first ``n`` indices
    of this rank's next pass only.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        world, world_rank = _world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = world_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip_next = 0

    def skip(self, num_samples: int) -> None:
        if num_samples < 0:
            raise ValueError(f"ResumableSampler.skip: num_samples must be >= 0, got {num_samples}")
        self._skip_next = num_samples

    def _rank_indices(self) -> list[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            padding = self.total_size - len(order)
            while padding > 0:  # repeat from the start (several times for tiny sets)
                order += order[:padding]
                padding = self.total_size - len(order)
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._rank_indices()
        skip, self._skip_next = self._skip_next, 0
        return iter(indices[skip:])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "seed": int(self.seed), "dataset_size": len(self.dataset)}  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a `ResumableSampler` with Lightning's ``state_dict`` / ``load_state_dict``.

    ``state_dict()`` -> ``{"epoch", "batches_done", "seed", "dataset_size", "batch_size",
    "num_replicas"}``; ``batches_done`` is the number of batches of ``epoch`` already trained on,
    read from ``progress_fn`` (set by `avseg.lit.callbacks.ResumeState`) or, without one, the
    number of batches this loader has handed out in the current pass.
    ``load_state_dict`` positions the next pass right after those batches (or at the start of the
    next epoch when the saved epoch was complete) and refuses a state from a different data set
    size, batch size, seed or world size, where the positions would not mean the same clips.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        prefetch_factor: int | None = None,
    ) -> None:
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        # A private generator for the worker base seeds: creating an iterator never draws from the
        # global RNG (a resumed run creates one at a different moment than an uninterrupted run).
        generator = torch.Generator()
        generator.manual_seed(seed)
        kwargs: dict[str, Any] = {}
        if num_workers > 0 and prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            worker_init_fn=worker_init_fn,
            generator=generator,
            **kwargs,
        )
        self.seed = seed
        self.progress_fn: Callable[[], tuple[int, int]] | None = None
        self._handed_out = 0
        self._pass_epoch = 0
        self._start_batch = 0

    @property
    def resumable_sampler(self) -> ResumableSampler:
        assert isinstance(self.sampler, ResumableSampler)
        return self.sampler

    def __iter__(self) -> Iterator[Any]:
        sampler = self.resumable_sampler
        self._pass_epoch = int(sampler.epoch)
        self._handed_out = self._start_batch
        if self._start_batch:
            sampler.skip(self._start_batch * int(self.batch_size or 1))
        self._start_batch = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        if self.progress_fn is not None:
            epoch, batches_done = self.progress_fn()
        else:
            epoch, batches_done = self._pass_epoch, self._handed_out
        sampler = self.resumable_sampler
        return {
            "epoch": int(epoch),
            "batches_done": int(batches_done),
            "seed": int(self.seed),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": int(self.batch_size or 1),
            "num_replicas": int(sampler.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.resumable_sampler
        current = {
            "seed": int(self.seed),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": int(self.batch_size or 1),
            "num_replicas": int(sampler.num_replicas),
        }
        for key, value in current.items():
            if key in state and int(state[key]) != value:
                raise ValueError(
                    f"cannot resume the training data loader mid-epoch: the checkpoint was saved with "
                    f"{key}={int(state[key])}, this run has {key}={value}"
                )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        batches_per_epoch = len(self)
        if done >= batches_per_epoch:
            epoch, done = epoch + 1, 0
        sampler.set_epoch(epoch)
        self._pass_epoch = epoch
        self._start_batch = done

    def __len__(self) -> int:
        size = len(self.resumable_sampler)
        batch = int(self.batch_size or 1)
        return size // batch if self.drop_last else math.ceil(size / batch)
