"""Format and lint: `ruff format --check` and `ruff check` over the tree (config in pyproject.toml);
every file the docs, docstrings, configs and notebooks name is in the repository."""

from __future__ import annotations

import json
import re
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


# what the scan reads: the docs, the README, the code (docstrings and comments), the configs' comments,
# the notebooks and the benchmark scripts
REFERRING = (
    "README.md",
    "docs/*.md",
    "src/**/*.py",
    "kernels/**/*.py",
    "conf/**/*.yaml",
    "notebooks/*.ipynb",
    "benchmarks/*",
)
# a repository path: one of the tree's top folders (or the package, avseg/... = src/avseg/...) and more
REPO_PATH = re.compile(
    r"(?<![\w./~-])((?:docs|src|conf|tests|benchmarks|tools|notebooks|kernels|avseg)/[\w./*-]*[\w*/])"
)
# a document cited by its bare upper-case file name, without a folder
BARE_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z0-9_-]*\.md)\b")


def _referring_text(path: Path) -> str:
    text = path.read_text(errors="replace")
    if path.suffix == ".ipynb":
        return "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
    return text


def test_every_referenced_file_is_in_the_repository() -> None:
    """A path that looks like one of the repository's (``docs/<name>.md``, ``src/...``, ``conf/...``,
    ``tests/...``, ``benchmarks/...``, ``tools/...``) and a document named bare (an upper-case name, no folder) must
    exist: at the root or next to the file that names it. Placeholders (``<run>``, ``{md,csv}``,
    ``$VAR``) are not paths; a ``*`` must match something."""
    names = {p.name for p in ROOT.rglob("*") if ".git" not in p.parts}
    files = sorted({p for pattern in REFERRING for p in ROOT.glob(pattern) if p.is_file()})
    assert len(files) > 50, files  # the scan reads the tree
    dangling = []
    for path in files:
        text = _referring_text(path)
        for match in REPO_PATH.finditer(text):
            ref = match.group(1).rstrip("/.")
            after = text[match.end() : match.end() + 2].lstrip(".")
            if any(c in ref for c in "<{$") or after[:1] in ("{", "<", "$"):
                continue
            target = f"src/{ref}" if ref.startswith("avseg/") else ref
            found = any(
                any(base.glob(target)) if "*" in target else (base / target).exists() for base in (ROOT, path.parent)
            )
            if not found:
                dangling.append(f"{path.relative_to(ROOT)}: {ref}")
        dangling += [
            f"{path.relative_to(ROOT)}: {m.group(1)}" for m in BARE_DOC.finditer(text) if m.group(1) not in names
        ]
    assert not dangling, "references to files that are not in the repository:\n" + "\n".join(sorted(set(dangling)))
