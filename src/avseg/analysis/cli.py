"""The command line of ``python -m avseg.analysis <command>`` (argparse): ``key=value`` words
(``ckpt_path``, ``snr``, ``clips`` and any `conf/eval.yaml` key or data override) and ``--flags``.
Exit status: 0 done, 1 a project error (one ``error: ...`` line), 2 bad arguments, 3
``--require-drop`` not met. The commands' reports go to the ``avseg`` logger, printed on stdout."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from avseg.analysis.baselines import run_data_baselines
from avseg.analysis.codes import run_decomposition
from avseg.analysis.common import default_output_dir
from avseg.analysis.noise import DEFAULT_SNRS, parse_snr_list, run_noise
from avseg.analysis.reliance import run_reliance
from avseg.analysis.selectivity import run_selectivity
from avseg.analysis.sweeps import run_ablation_summary
from avseg.cli import console_log, report_error
from avseg.errors import AvsegError, ConfigError

__all__ = ["EXIT_USAGE", "EXIT_REQUIREMENT", "build_parser", "main"]

EXIT_USAGE = 2
EXIT_REQUIREMENT = 3
DESCRIPTION = (
    "does the model listen, how robust is it to noise, do the quantised sub-space codes line up with "
    "the true sources, and what does an ablation sweep say (docs/ANALYSIS.md)"
)


def _split_words(words: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """key=value words -> (values of the analysis' own keys, the remaining eval overrides)."""
    own: dict[str, list[str]] = {}
    rest: list[str] = []
    for word in words:
        if "=" not in word:
            raise ConfigError(f"{word!r}: expected key=value (e.g. ckpt_path=PATH)")
        key, value = word.split("=", 1)
        if key in ("ckpt_path", "snr", "clips"):
            own.setdefault(key, []).append(value)
        else:
            rest.append(word)
    return own, rest


def _ckpt_paths(own: Mapping[str, list[str]], *, single: bool) -> list[str]:
    paths = [p for value in own.get("ckpt_path", []) for p in value.split(",") if p]
    if not paths:
        raise ConfigError("ckpt_path is required: ckpt_path=<run dir>/checkpoints/best.ckpt")
    if single and len(paths) != 1:
        raise ConfigError(f"this command takes one checkpoint, got {len(paths)}: {paths}")
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avseg.analysis", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--out", type=Path, default=None, help="output folder (default: $AVSEG_OUTPUTS/analysis/<command>/<time>)"
    )

    reliance = commands.add_parser("reliance", parents=[common], help="M_J / M_F with the audio clean, muted, swapped")
    reliance.add_argument("words", nargs="*", help="ckpt_path=PATH and eval overrides (split=..., data....)")
    reliance.add_argument(
        "--require-drop",
        type=float,
        default=None,
        metavar="FRACTION",
        help="exit 3 unless M_J drops by at least FRACTION under mute and swap",
    )

    noise = commands.add_parser("noise", parents=[common], help="M_J / M_F against the SNR of added white noise")
    noise.add_argument(
        "words", nargs="*", help="ckpt_path=A [ckpt_path=B ...] [snr=clean,20,10,5,0,-5] and eval overrides"
    )
    noise.add_argument(
        "--labels", default=None, help="comma-separated curve labels (default: each checkpoint's decomposition variant)"
    )
    noise.add_argument("--name", default="noise_robustness", help="base name of the .md / .json / .png files")
    noise.add_argument(
        "--average", action="store_true", help="one curve per label (mean ± std over its checkpoints, e.g. seeds)"
    )

    decomposition = commands.add_parser(
        "decomposition", parents=[common], help="NMI / purity of the sub-space codes against the true sources"
    )
    decomposition.add_argument(
        "words", nargs="*", help="ckpt_path=PATH [clips=multi|all] [split=test] and eval overrides"
    )
    decomposition.add_argument(
        "--permutations", type=int, default=50, help="label permutations for the NMI chance level"
    )

    selectivity = commands.add_parser(
        "selectivity",
        parents=[common],
        help="share of heard / unheard object pixels predicted, audio clean, muted, swapped",
    )
    selectivity.add_argument("words", nargs="*", help="ckpt_path=PATH and eval overrides (split=..., data....)")

    baselines = commands.add_parser(
        "data-baselines", parents=[common], help="audio-free and ideal-listener M_J / M_F on a SynthAVS split"
    )
    baselines.add_argument("words", nargs="*", help="[ckpt_path=PATH] (its data) or data overrides, [split=test]")

    ablation = commands.add_parser("ablation-summary", help="mean ± std over seeds of multirun sweeps")
    ablation.add_argument("sweep_dirs", nargs="+", help="sweep directories holding summary.csv")
    ablation.add_argument("--metrics", default="test/miou,test/fscore", help="comma-separated metric columns")
    ablation.add_argument("--drop-keys", default="seed", help="comma-separated override keys ignored when grouping")
    ablation.add_argument("--out", type=Path, default=None, help="markdown file (a .csv is written beside it)")
    ablation.add_argument(
        "--reliance",
        action="store_true",
        help="also the M_J drops under mute and swap of every job's best.ckpt (written to <job>/reliance/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console_log():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "ablation-summary":
            metrics = [m for m in args.metrics.split(",") if m]
            drop_keys = [k for k in args.drop_keys.split(",") if k]
            run_ablation_summary(
                args.sweep_dirs, metrics=metrics, drop_keys=drop_keys, output=args.out, reliance=args.reliance
            )
            return 0
        own, overrides = _split_words(args.words)
        output_dir = args.out if args.out is not None else default_output_dir(args.command)
        if args.command == "reliance":
            if args.require_drop is not None and not 0.0 <= args.require_drop <= 1.0:
                raise ConfigError(f"--require-drop {args.require_drop}: a fraction in [0, 1]")
            payload = run_reliance(
                _ckpt_paths(own, single=True)[0], overrides, output_dir=output_dir, require_drop=args.require_drop
            )
            return EXIT_REQUIREMENT if payload["passed"] is False else 0
        if args.command == "noise":
            snrs = parse_snr_list(",".join(own.get("snr", [",".join(DEFAULT_SNRS)])))
            labels = [label for label in args.labels.split(",")] if args.labels else None
            run_noise(
                _ckpt_paths(own, single=False),
                overrides,
                snrs=snrs,
                output_dir=output_dir,
                labels=labels,
                name=args.name,
                average=args.average,
            )
            return 0
        if args.command == "decomposition":
            clips = own.get("clips", ["multi"])[-1]
            if args.permutations < 1:
                raise ConfigError(f"--permutations {args.permutations}: an integer >= 1")
            run_decomposition(
                _ckpt_paths(own, single=True)[0],
                overrides,
                output_dir=output_dir,
                clips=clips,
                permutations=args.permutations,
            )
            return 0
        if args.command == "selectivity":
            run_selectivity(_ckpt_paths(own, single=True)[0], overrides, output_dir=output_dir)
            return 0
        if args.command == "data-baselines":
            paths = [p for value in own.get("ckpt_path", []) for p in value.split(",") if p]
            if len(paths) > 1:
                raise ConfigError(f"data-baselines takes at most one checkpoint, got {paths}")
            run_data_baselines(paths[0] if paths else None, overrides, output_dir=output_dir)
            return 0
        raise ConfigError(f"unknown command {args.command!r}")
    except AvsegError as error:
        report_error(error)
        return 1
