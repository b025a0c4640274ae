"""Mixed-precision helpers: regions that must run in float32 under autocast.

Under ``precision=bf16-mixed`` (Lightning wraps the training step in ``torch.autocast``) matrix
products and convolutions run in bf16, which has an 8-bit mantissa. Some computations need more:
the Hungarian matching costs (a bf16 cost matrix turns near-ties into different assignments), the
losses, the codebook distances and argmin of the quantiser, and the sampling geometry of
deformable attention. Those run inside `autocast_disabled` on float32 copies of their inputs
(``docs/TRAINING.md``, "Mixed precision"). Imports torch only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch

__all__ = ["autocast_disabled", "full_precision"]

_F = TypeVar("_F", bound=Callable)
# the device types torch.autocast knows that avseg runs on
_DEVICE_TYPES = ("cpu", "cuda")


@contextmanager
def autocast_disabled() -> Iterator[None]:
    """Switch autocast off, for every device type where it is on, inside the ``with`` block.

    Tensors created before the block keep their dtype: cast them (``.float()``) inside it.
    """
    with ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def full_precision(function: _F) -> _F:
    """Decorator: run ``function`` with autocast off (see `autocast_disabled`)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with autocast_disabled():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
