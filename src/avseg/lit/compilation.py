"""``model.compile``: `torch.compile` of the network parts that trace cleanly.

``model.compile`` is ``false`` (the default), ``true`` (``torch.compile`` with its defaults:
inductor) or a mapping of `torch.compile` keyword arguments (``{backend: aot_eager}``,
``{mode: max-autotune}``, ...), which also switches it on.

What is compiled: the visual backbone, the neck, the fusion (deformable encoder + FPN) and the
decoder, each with ``nn.Module.compile`` (in place: parameter names and checkpoints are the same as
without compilation). The audio encoder and the decomposition stay eager: the quantiser keeps
codebook statistics in Python integers and changes its buffers in place every training step, which
would make dynamo re-trace each step. The deformable-attention op's ``tolist`` of the level sizes
is a graph break (its forward and backward run eagerly, as written). Measured speed, and why the
default is off: docs/BENCHMARKS.md, "torch.compile".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from avseg.errors import ConfigError

__all__ = ["COMPILED_PARTS", "compile_options", "compile_network"]

log = logging.getLogger(__name__)

COMPILED_PARTS = ("backbone", "neck", "fusion", "decoder")
_ALLOWED_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


def compile_options(setting: Any) -> dict[str, Any] | None:
    """``model.compile`` -> keyword arguments for `torch.compile`, or None when it is off."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, Mapping):
        unknown = sorted(set(setting) - set(_ALLOWED_KEYS))
        if unknown:
            raise ConfigError(f"model.compile: unknown keys {unknown}; allowed: {list(_ALLOWED_KEYS)}")
        return dict(setting)
    raise ConfigError(
        f"model.compile={setting!r}: allowed values are false | true | a mapping of torch.compile options"
    )


def compile_network(net: nn.Module, options: Mapping[str, Any]) -> list[str]:
    """Compile `COMPILED_PARTS` of ``net`` in place; returns the compiled parts' names."""
    compiled = []
    for name in COMPILED_PARTS:
        net.get_submodule(name).compile(**options)
        compiled.append(name)
    log.info("model.compile: torch.compile(%s) of %s", dict(options), ", ".join(compiled))
    return compiled
