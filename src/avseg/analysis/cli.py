"""The command line of ``python -m avseg.analysis <command> key=value ...``.

The first word names the command; every other word is a Hydra override (the grammar of train /
eval / predict) of ``conf/analysis/<command>.yaml``, composed by `avseg.cli.compose_command`.
The commands that evaluate a checkpoint pass any other ``conf/eval.yaml`` key on to the
evaluation (``split=val``, ``data=synth_s4``, ``data.eval_batch_size=2``, ``device=cpu``; not
``ckpt_path``, ``perturb``, ``perturb_snr_db``, which the command sets). Lists in Hydra's grammar:
``ckpt_paths=[A,B]``, ``snrs=[clean,20,-5]``.

Exit status: 0 done; 1 a project error (bad data / checkpoint / config, a required key missing, a
bad value; one ``error: ...`` line); 2 a command line that cannot be read (no or an unknown
command, a malformed word, a key neither the command nor conf/eval.yaml has; raised as
``SystemExit(2)``); 3 ``require_drop`` not met. The reports go to the ``avseg`` logger, printed on
stdout. ``--help`` lists the commands; ``<command> --help`` prints its config file."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from avseg.analysis.baselines import run_data_baselines
from avseg.analysis.codes import run_decomposition
from avseg.analysis.common import default_output_dir
from avseg.analysis.noise import parse_snr_list, run_noise
from avseg.analysis.reliance import run_reliance
from avseg.analysis.selectivity import run_selectivity
from avseg.analysis.sweeps import run_ablation_summary
from avseg.cli import CONF_DIR, EXIT_USAGE, Forward, compose_command, console_log, report_error
from avseg.errors import AvsegError, ConfigError, UsageError

__all__ = ["COMMANDS", "EXIT_USAGE", "EXIT_REQUIREMENT", "main"]

EXIT_REQUIREMENT = 3
# the command -> what it does (its config: conf/analysis/<command>.yaml)
COMMANDS = {
    "reliance": "M_J / M_F with the audio clean, muted, swapped",
    "noise": "M_J / M_F against the SNR of added white noise",
    "decomposition": "NMI / purity of the sub-space codes against the true sources",
    "selectivity": "share of heard / unheard object pixels predicted, audio clean, muted, swapped",
    "data-baselines": "audio-free and ideal-listener M_J / M_F on a SynthAVS split",
    "ablation-summary": "mean ± std over seeds of multirun sweeps",
}
# the commands that evaluate a checkpoint: they pass conf/eval.yaml keys on, except these (theirs)
EVAL_SET_BY_COMMAND = ("ckpt_path", "perturb", "perturb_snr_db")
REQUIRED = {
    "reliance": ("ckpt_path",),
    "noise": ("ckpt_paths",),
    "decomposition": ("ckpt_path",),
    "selectivity": ("ckpt_path",),
    "data-baselines": (),
    "ablation-summary": ("sweep_dirs",),
}
USAGE = "python -m avseg.analysis {" + ",".join(COMMANDS) + "} key=value ... (conf/analysis/<command>.yaml)"


def _usage_text() -> str:
    lines = [f"usage: {USAGE}", "", "commands:"]
    lines += [f"  {name:<17} {what}" for name, what in COMMANDS.items()]
    lines += ["", "python -m avseg.analysis <command> --help prints the command's keys (its config file)."]
    return "\n".join(lines)


def _strings(value: Any) -> list[str]:
    """A list argument (``key=[a,b]``) as strings; a single value is a list of one, null none."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [str(value)]
    return [str(item) for item in value]


def _single(key: str, value: Any) -> str:
    """A one-value argument (a checkpoint path) as a string; a list is an error."""
    if not isinstance(value, str) and isinstance(value, Sequence):
        raise ConfigError(f"{key}: this command takes one value, got {list(value)}")
    return str(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value


def _fraction(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key}={value!r}: a fraction in [0, 1]")
    return float(value)


def _output_dir(command: str, out: Any) -> Path:
    return Path(str(out)) if out is not None else default_output_dir(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``argv`` (default ``sys.argv[1:]``); returns the exit status (0, 1 or 3). A command
    line that cannot be read prints its ``error:`` line and raises ``SystemExit(2)``."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] in (["-h"], ["--help"]):
        sys.stdout.write(_usage_text() + "\n")
        return 0
    with console_log():
        try:
            if not words:
                raise UsageError(f"no command; usage: {USAGE}")
            command, *args = words
            if command not in COMMANDS:
                raise UsageError(f"unknown command {command!r}; usage: {USAGE}")
            if args[:1] in (["-h"], ["--help"]):
                sys.stdout.write((CONF_DIR / "analysis" / f"{command}.yaml").read_text())
                return 0
            return _run(command, args)
        except UsageError as error:
            report_error(error)
            raise SystemExit(EXIT_USAGE) from None
        except AvsegError as error:
            report_error(error)
            return 1


def _run(command: str, args: list[str]) -> int:
    usage = f"python -m avseg.analysis {command} key=value ...; keys: conf/analysis/{command}.yaml"
    if command == "ablation-summary":
        cfg = compose_command(f"analysis/{command}", args, required=REQUIRED[command], usage=usage)
        run_ablation_summary(
            _strings(cfg.sweep_dirs),
            metrics=_strings(cfg.metrics),
            drop_keys=_strings(cfg.drop_keys),
            output=None if cfg.out is None else Path(str(cfg.out)),
            reliance=_flag("reliance", cfg.reliance),
        )
        return 0
    to_eval = Forward("eval", reserved=EVAL_SET_BY_COMMAND)
    cfg = compose_command(f"analysis/{command}", args, required=REQUIRED[command], usage=usage, forward=to_eval)
    overrides = to_eval.words
    output_dir = _output_dir(command, cfg.out)
    if command == "reliance":
        require_drop = _fraction("require_drop", cfg.require_drop)
        payload = run_reliance(
            _single("ckpt_path", cfg.ckpt_path), overrides, output_dir=output_dir, require_drop=require_drop
        )
        return EXIT_REQUIREMENT if payload["passed"] is False else 0
    if command == "noise":
        snrs = parse_snr_list(_strings(cfg.snrs))
        labels = _strings(cfg.labels) or None
        run_noise(
            _strings(cfg.ckpt_paths),
            overrides,
            snrs=snrs,
            output_dir=output_dir,
            labels=labels,
            name=str(cfg.name),
            average=_flag("average", cfg.average),
        )
        return 0
    if command == "decomposition":
        permutations = cfg.permutations
        if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
            raise ConfigError(f"permutations={permutations!r}: an integer >= 1")
        run_decomposition(
            _single("ckpt_path", cfg.ckpt_path),
            overrides,
            output_dir=output_dir,
            clips=str(cfg.clips),
            permutations=permutations,
        )
        return 0
    if command == "selectivity":
        run_selectivity(_single("ckpt_path", cfg.ckpt_path), overrides, output_dir=output_dir)
        return 0
    assert command == "data-baselines"
    run_data_baselines(
        None if cfg.ckpt_path is None else _single("ckpt_path", cfg.ckpt_path), overrides, output_dir=output_dir
    )
    return 0
