"""The top-level error handler of avseg's commands (``avseg.train``, ``avseg.eval``, ``avseg.predict``),
and `compose_command`, the Hydra config of the commands without a Hydra run (``avseg.data.check``,
``.synth``, ``.embeddings``, ``avseg.analysis <command>``): every command takes Hydra ``key=value``
overrides of a ``conf/<command>.yaml`` (``conf/analysis/<command>.yaml`` for the analysis).

An `avseg.errors.AvsegError` (bad data, an unusable checkpoint or weights file, a bad config) is an
expected failure with a message that already names the file or key and the problem: the user
needs that message, not a stack trace. `run_main` / `guarded` catch it, flush what the command
printed so far, print any detail lines of a multi-line message, then ``error: <first line>`` as
the LAST line, and exit with status 1. Anything else (a bug) propagates with its traceback.

Under a Hydra multirun the error is re-raised instead, so that Hydra records the job as failed
and goes on with the other jobs.

Use as the Hydra task function's innermost decorator::

    @hydra.main(config_path="../../conf", config_name="train", version_base="1.3")
    @guarded
    def main(cfg: DictConfig) -> ...:
        return run(cfg)

or call ``run_main(run, cfg)`` inside the task function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from avseg.errors import AvsegError, ConfigError, UsageError

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "Forward",
    "avseg_cause",
    "compose_command",
    "console_log",
    "error_lines",
    "guarded",
    "in_hydra_multirun",
    "report_error",
    "run_main",
]

EXIT_ERROR = 1
EXIT_USAGE = 2

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

P = ParamSpec("P")
R = TypeVar("R")


def in_hydra_multirun() -> bool:
    """True inside a Hydra multirun job (False outside Hydra or in a single run)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return False
    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN


def error_lines(error: BaseException) -> list[str]:
    """What to print for ``error``: its detail lines, then ``error: <headline>`` last.

    The headline is the message's first line (for a DataError / CheckpointError it starts with the
    file's path); a multi-line message's other lines come first so the headline stays the last
    thing printed.
    """
    text = str(error).strip() or type(error).__name__
    headline, *details = text.splitlines()
    headline = headline.strip()
    details = [line.rstrip() for line in details if line.strip()]
    if details and headline.endswith(":"):
        headline = f"{headline} (listed above)"
    return [*details, f"error: {headline}"]


def report_error(error: BaseException, *, stream=None) -> None:
    """Flush stdout (buffered output must not land after the error), then print ``error_lines``."""
    stream = sys.stderr if stream is None else stream
    with contextlib.suppress(OSError, ValueError):  # a closed or broken stdout must not hide the error
        sys.stdout.flush()
    stream.write("\n".join(error_lines(error)) + "\n")
    stream.flush()


def avseg_cause(error: BaseException) -> AvsegError | None:
    """The project's own error behind ``error``, if any: Hydra's ``instantiate`` (and other
    libraries) wrap the exceptions raised inside them, so the chain is followed."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, AvsegError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def run_main(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)``; an `AvsegError` (also when wrapped by another exception) is printed
    as one final ``error: ...`` line and the process exits with status 1 (re-raised under a Hydra
    multirun). Any other exception is a bug and propagates with its traceback."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        cause = avseg_cause(error)
        if cause is None or in_hydra_multirun():
            raise
        report_error(cause)
        raise SystemExit(EXIT_ERROR) from None


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator form of `run_main`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return run_main(fn, *args, **kwargs)

    return wrapper


def _hydra_message(error: BaseException) -> str:
    """A Hydra / OmegaConf error on one line: its first paragraph, without the link to the grammar."""
    lines = []
    for line in str(error).strip().splitlines():
        if not line.strip():
            break
        if not line.startswith("See https://"):
            lines.append(line.strip())
    return "; ".join(lines) or type(error).__name__


@dataclass
class Forward:
    """The arguments a command passes on to another config (``avseg.analysis`` to ``conf/eval.yaml``):
    `compose_command` puts there, as written, those whose key is one of ``conf/<config>.yaml``'s
    (not the command's own, not ``reserved``: the keys the command sets itself), once that config
    composes with them."""

    config: str
    reserved: Sequence[str] = ()
    words: list[str] = field(default_factory=list)


def compose_command(
    config_name: str,
    argv: Sequence[str] | None = None,
    *,
    required: Sequence[str] = (),
    usage: str = "",
    forward: Forward | None = None,
) -> DictConfig:
    """The config of a command without a Hydra run (``avseg.data.check``, ``.synth``,
    ``.embeddings``, ``avseg.analysis <command>``): ``conf/<config_name>.yaml`` (``config_name``
    may name a group's file, e.g. ``analysis/reliance``) with the command line's ``key=value``
    arguments applied in Hydra's override grammar, as for train / eval / predict (``argv``
    defaults to ``sys.argv[1:]``).

    Composed with Hydra's compose API, not ``@hydra.main``: these commands write into folders the
    user names, so they get no run directory, no ``.hydra/`` and no log file, and they can be called
    in-process with their exit code returned. A malformed argument or a key the config does not
    have is an `UsageError` naming it; a ``required`` key left null (or an empty list) is a
    `ConfigError` naming it (both with ``usage``). The ``paths`` and ``task_name`` keys of a
    top-level config are not the command's arguments.

    With ``forward`` (a `Forward`), the arguments whose key is not the command's own but a key of
    ``conf/<forward.config>.yaml`` (other than ``forward.reserved``) are passed on: checked by
    composing that config with them (a bad one is a `UsageError`) and left in ``forward.words``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    args = list(sys.argv[1:] if argv is None else argv)
    hint = f" ({usage})" if usage else ""
    parser = OverridesParser.create()
    not_arguments = ("hydra", "paths", "task_name")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name.replace("/", "_")):
        allowed = [key for key in compose(config_name=config_name) if key not in not_arguments]
        passed_on: list[str] = []
        if forward is not None:
            skip = {*not_arguments, *allowed, *forward.reserved}
            passed_on = [key for key in compose(config_name=forward.config) if key not in skip]
        own: list[str] = []
        forwarded: list[str] = []
        for arg in args:
            try:
                (override,) = parser.parse_overrides([arg])
            except HydraException as err:
                raise UsageError(f"argument {arg!r}: expected key=value{hint}: {_hydra_message(err)}") from None
            key = override.key_or_group.split(".")[0]
            if key in allowed and override.is_delete():
                raise UsageError(f"argument {arg!r}: a command's own key cannot be deleted; give key=value{hint}")
            if key in allowed:
                own.append(arg)
            elif key in passed_on:
                forwarded.append(arg)
            else:
                also = f", or a conf/{forward.config}.yaml key in {passed_on}" if forward is not None else ""
                raise UsageError(f"unknown argument {arg!r}; expected key=value with key in {allowed}{also}")

        def composed(name: str, words: list[str]) -> DictConfig:
            try:
                return compose(config_name=name, overrides=words)
            except (HydraException, OmegaConfBaseException) as err:
                raise UsageError(f"arguments {words} (conf/{name}.yaml): {_hydra_message(err)}{hint}") from None

        cfg = composed(config_name, own)
        if forward is not None:
            if forwarded:
                composed(forward.config, forwarded)
            forward.words = forwarded
    for key in required:
        value = cfg.get(key)
        if value is None or (not isinstance(value, str) and hasattr(value, "__len__") and len(value) == 0):
            raise ConfigError(f"{key} is required{hint}")
    with open_dict(cfg):
        for key in ("paths", "task_name"):
            cfg.pop(key, None)
    return cfg


@contextlib.contextmanager
def console_log(name: str = "avseg", *, status: str | None = None) -> Iterator[None]:
    """For the commands without a Hydra run (`compose_command`'s; Hydra's run sets up its own log): while inside,
    the INFO records of logger ``name`` are printed on stdout as plain lines (a command's report is
    what the user asked for), warnings and errors on stderr. Records of the logger ``status`` (a
    child of ``name``: the command's progress and summary lines, not its report) go to stderr at
    every level."""

    def on_stderr(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (status is not None and record.name == status)

    logger = logging.getLogger(name)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda record: not on_stderr(record))
    err = logging.StreamHandler(sys.stderr)
    err.addFilter(on_stderr)
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    saved = (logger.propagate, logger.level)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in (out, err):
            handler.flush()
            logger.removeHandler(handler)
        logger.propagate, logger.level = saved
