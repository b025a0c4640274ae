"""Pieces of ``python -m avseg.train`` that other entry points (eval, predict) reuse: logger and
callback construction from the config, wandb credentials, metrics.json and the result table."""

from __future__ import annotations

import math
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra.utils
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

from avseg.errors import ConfigError
from avseg.io import write_json_atomic
from avseg.lit.callbacks import ResumeState

__all__ = [
    "wandb_credentials_available",
    "build_callbacks",
    "build_loggers",
    "finish_wandb",
    "scalar_metrics",
    "write_metrics_json",
    "format_result_table",
]

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def wandb_credentials_available() -> bool:
    """True when wandb can go online: WANDB_MODE is not offline/disabled/dryrun and an API key is
    set (WANDB_API_KEY) or ~/.netrc (NETRC) has an entry for the wandb host. Only the presence of an
    entry is checked."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not netrc_path.is_file():
        return False
    try:
        return netrc.netrc(os.fspath(netrc_path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_callbacks(callbacks_cfg: Mapping[str, Any] | None) -> list[Callback]:
    """Instantiates every entry with a ``_target_`` (``null`` entries are dropped); always includes
    exactly one `ResumeState` (mid-epoch resume depends on it)."""
    callbacks: list[Callback] = []
    for name, node in (callbacks_cfg or {}).items():
        if node is None:
            continue
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise ConfigError(f"callbacks.{name}: expected a config with a _target_ (or null to disable), got {node!r}")
        callback = hydra.utils.instantiate(node)
        if not isinstance(callback, Callback):
            raise ConfigError(f"callbacks.{name}: {node['_target_']} is not a Lightning Callback")
        callbacks.append(callback)
    if not any(isinstance(c, ResumeState) for c in callbacks):
        callbacks.append(ResumeState())
    return callbacks


def build_loggers(
    logger_cfg: Mapping[str, Any] | None, *, run_name: str | None = None, sweep_group: str | None = None
) -> list[Any]:
    """Instantiates the configured loggers. WandbLogger: ``offline: auto`` becomes offline unless
    `wandb_credentials_available`; ``group: null`` becomes ``sweep_group`` (multirun); ``name: null``
    becomes ``run_name``; its ``save_dir`` is created."""
    loggers = []
    for name, node in (logger_cfg or {}).items():
        if node is None:
            continue
        options = dict(_container(node))
        if "_target_" not in options:
            raise ConfigError(f"logger.{name}: expected a config with a _target_ (or null to disable)")
        if options["_target_"] == WANDB_TARGET:
            offline = options.get("offline", "auto")
            if offline == "auto":
                options["offline"] = not wandb_credentials_available()
            elif not isinstance(offline, bool):
                raise ConfigError(f"logger.{name}.offline={offline!r}: allowed values are auto | true | false")
            if options.get("group") is None and sweep_group:
                options["group"] = sweep_group
            if options.get("name") is None and run_name:
                options["name"] = run_name
            Path(options.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
        loggers.append(hydra.utils.instantiate(options))
    return loggers


def finish_wandb() -> None:
    """Closes the wandb run of this process (one run per multirun job)."""
    import sys

    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logged metrics -> ``{name: float}`` (tensors of one element included)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out


def write_metrics_json(path: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    """One flat JSON object keyed by the logged names (numbers, and strings such as the tested
    checkpoint's path); NaN / inf become null (valid JSON)."""
    payload = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sorted(metrics.items())}
    write_json_atomic(path, payload)


def format_result_table(metrics: Mapping[str, float], *, title: str) -> str:
    """The printed result: one row per evaluated set with M_J (miou) and M_F (fscore, and the
    batch-independent fscore_global for binary data)."""
    rows: list[tuple[str, str, str, str]] = []
    prefixes = sorted({k.rsplit("/", 1)[0] for k in metrics if k.startswith("test") and k.endswith("/miou")})
    for prefix in prefixes:
        glob = metrics.get(f"{prefix}/fscore_global")
        rows.append(
            (
                prefix,
                f"{metrics[f'{prefix}/miou']:.4f}",
                f"{metrics.get(f'{prefix}/fscore', float('nan')):.4f}",
                "-" if glob is None else f"{glob:.4f}",
            )
        )
    header = ("split", "M_J (mIoU)", "M_F (F-score)", "M_F global")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(4)]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [title, line, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", line]
    for row in rows:
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    out.append(line)
    return "\n".join(out)
