"""Allowed values of a component's options, stated once and read twice.

A component (e.g. `avseg.models.decomposition.AudioDecomposition`) states its allowed values in a
``check_options`` classmethod that returns a list of `Problem`: its constructor raises the first
one (`raise_first`), and `avseg.config_validation` reports all of them at start-up, before any
data is read, each on one line naming the full config key (``model.decomposition.variant``).
The helpers below check one value each and return a `Problem` or None; a key the options do not
hold is not checked (the constructor's keyword default applies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from avseg.errors import ConfigError

__all__ = [
    "Problem",
    "raise_first",
    "is_int",
    "is_number",
    "one_of",
    "int_at_least",
    "number_in",
    "boolean",
    "present",
    "choice",
    "at_least",
    "non_negative",
    "positive",
    "below_one",
]


class Problem(NamedTuple):
    """One violation: the full config key, the value given, what is allowed (in words), and an
    optional ``reason`` said before it. ``choices``: the value must be one of these."""

    key: str
    value: Any
    allowed: str
    reason: str = ""
    choices: bool = False

    def line(self) -> str:
        """The start-up form: ``key=value: [reason; ]allowed: ...`` (``allowed values are a | b``)."""
        reason = f"{self.reason}; " if self.reason else ""
        allowed = f"allowed values are {self.allowed}" if self.choices else f"allowed: {self.allowed}"
        return f"{self.key}={self.value!r}: {reason}{allowed}"

    def error(self) -> ConfigError:
        """The constructor's form: ``key: got value; [reason; ]allowed: ...``."""
        reason = f"{self.reason}; " if self.reason else ""
        return ConfigError(f"{self.key}: got {self.value!r}; {reason}allowed: {self.allowed}")


def raise_first(problems: Sequence[Problem]) -> None:
    """Raise the first problem as a one-line `ConfigError` (a constructor's check)."""
    if problems:
        raise problems[0].error()


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(key: str, value: Any, allowed: Sequence[Any]) -> Problem | None:
    if value in allowed and not isinstance(value, bool):
        return None
    return Problem(key, value, " | ".join(str(a) for a in allowed), choices=True)


def int_at_least(key: str, value: Any, low: int, *, nullable: bool = False, note: str = "") -> Problem | None:
    if (nullable and value is None) or (is_int(value) and value >= low):
        return None
    return Problem(key, value, f"{'null or ' if nullable else ''}an integer >= {low}{note}")


def number_in(
    key: str, value: Any, check: Callable[[float], bool], allowed: str, *, nullable: bool = False
) -> Problem | None:
    if (nullable and value is None) or (is_number(value) and check(float(value))):
        return None
    return Problem(key, value, f"{'null or ' if nullable else ''}{allowed}")


def boolean(key: str, value: Any) -> Problem | None:
    return None if isinstance(value, bool) else Problem(key, value, "true | false")


Check = Callable[[str, Any], Problem | None]


def choice(allowed: Sequence[Any]) -> Check:
    """A check: the value is one of ``allowed``."""
    return lambda key, value: one_of(key, value, allowed)


def at_least(low: int, note: str = "") -> Check:
    """A check: the value is an integer >= ``low``."""
    return lambda key, value: int_at_least(key, value, low, note=note)


def non_negative(key: str, value: Any) -> Problem | None:
    return number_in(key, value, lambda v: v >= 0, "a number >= 0")


def positive(key: str, value: Any) -> Problem | None:
    return number_in(key, value, lambda v: v > 0, "a number > 0")


def below_one(key: str, value: Any) -> Problem | None:
    return number_in(key, value, lambda v: 0 <= v < 1, "a number in [0, 1)")


def present(options: Mapping[str, Any], checks: Mapping[str, Check], prefix: str) -> list[Problem]:
    """Run ``checks[name](prefix + name, value)`` for every ``name`` the options hold; the problems found."""
    found = (check(prefix + name, options[name]) for name, check in checks.items() if name in options)
    return [problem for problem in found if problem is not None]
