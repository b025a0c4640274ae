"""SynthAVS command line: `python -m avseg.data.synth` / `avseg-synth`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avseg.cli import key_value
from avseg.data.synth.options import DEFAULT_CLIPS, SUBSETS, default_cache_dir
from avseg.data.synth.tree import ensure_synth_tree, generate
from avseg.errors import ConfigError, DataError


def _parse_value(key: str, text: str) -> Any:
    import yaml  # PyYAML comes with hydra-core / omegaconf

    if key == "snr_db" and "," in text and not text.strip().startswith("["):
        text = f"[{text}]"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {text!r}: {err}") from err


def _parse_args(argv: Sequence[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for arg in argv:
        key, text = key_value(arg)
        value = text if key in ("out", "cache", "subset") else _parse_value(key, text)
        if key.startswith("clips_per_split."):
            split = key.split(".", 1)[1]
            clips = parsed.setdefault("clips_per_split", {})
            if not isinstance(clips, dict):
                raise ConfigError("clips_per_split: give either the mapping or per-split keys")
            clips[split] = value
        else:
            parsed[key] = value
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m avseg.data.synth [out=PATH] [subset=s4|ms3|avss] [cache=PATH] [key=value ...]`."""
    try:
        args = _parse_args(sys.argv[1:] if argv is None else argv)
        out = args.pop("out", None)
        cache = args.pop("cache", None)
        subset = args.pop("subset", None)
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
