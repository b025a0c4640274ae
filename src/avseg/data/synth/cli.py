"""SynthAVS command line: `python -m avseg.data.synth` / `avseg-synth`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avseg.cli import compose_command
from avseg.data.synth.options import DEFAULT_CLIPS, SUBSETS, default_cache_dir
from avseg.data.synth.tree import ensure_synth_tree, generate
from avseg.errors import ConfigError, DataError


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m avseg.data.synth [out=PATH] [subset=s4|ms3|avss] [cache=PATH] [key=value ...]`
    (config ``conf/synth.yaml``, Hydra's override grammar)."""
    from omegaconf import OmegaConf

    try:
        cfg = compose_command("synth", argv, usage="[out=PATH | cache=PATH] [subset=s4|ms3|avss] [key=value ...]")
        given = OmegaConf.to_container(cfg, resolve=True)
        out, cache, subset = (given.pop(key) for key in ("out", "cache", "subset"))
        out, cache, subset = (None if value is None else str(value) for value in (out, cache, subset))
        clips = {split: count for split, count in (given.pop("clips_per_split") or {}).items() if count is not None}
        # A generation option left null takes the generator's default (one home: synth.options).
        args: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
        if clips:
            args["clips_per_split"] = clips
        subsets = list(SUBSETS) if subset is None else [subset]
        if out is not None and cache is not None:
            raise ConfigError("out and cache: give one of them")
        if subset is not None and subset not in SUBSETS:
            raise ConfigError(f"subset: {subset!r} is not one of {list(SUBSETS)}")
        if "clips_per_split" in args and isinstance(args["clips_per_split"], dict):
            # Per-split keys given on their own: fill the others from the subset's defaults.
            partial = args["clips_per_split"]
            per_subset = {s: {**DEFAULT_CLIPS[s], **partial} for s in subsets}
        else:
            per_subset = {s: args.get("clips_per_split") for s in subsets}
        for name in subsets:
            options = {**args, "clips_per_split": per_subset[name]}
            if out is not None:
                target = Path(out) if subset is not None else Path(out) / name
                root = generate(target, name, **options)
            else:
                root = ensure_synth_tree(Path(cache) if cache else default_cache_dir(), name, **options)
            print(f"{name}: {root}")
    except (ConfigError, DataError) as err:
        print(f"avseg.data.synth: {err}", file=sys.stderr)
        return 2
    return 0
