"""Format and lint: `ruff format --check` and `ruff check` over the tree (config in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ["src", "kernels", "tests", "benchmarks"]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -c constraints.txt -e '.[dev]'")
    return [found]


def _python_trees() -> list[str]:
    return [t for t in TREES if (ROOT / t).is_dir()]


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check"]], ids=["format", "check"])
def test_ruff(command: list[str]) -> None:
    result = subprocess.run(
        [*_ruff(), *command, *_python_trees()], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} failed:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"


def test_every_package_is_listed_in_pyproject() -> None:
    """A wheel carries only the packages pyproject.toml lists: a new sub-package must be added there."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    found.add("avseg_kernels")
    assert found == listed, (
        f"packages on disk but not listed: {sorted(found - listed)}; listed but gone: {sorted(listed - found)}"
    )
