"""Safe loading, enforced statically: no unsafe deserialisation can come back unnoticed.

An `ast` scan of every ``.py`` under ``src/`` and ``kernels/``:

- every call of ``torch.load`` (however it was imported: ``torch.load``, ``import torch as th``,
  ``from torch import load``, ``torch.serialization.load``) passes ``weights_only=True`` literally
  (a variable or ``**kwargs`` does not count: the reader must see it is safe);
- ``pickle.load`` / ``pickle.loads`` / ``pickle.Unpickler`` (also via ``_pickle``/``cPickle`` or a
  ``from pickle import ...``) appear only in ``src/avseg/data/safe_pickle.py``, the restricted
  unpickler (docs/AVSBENCH.md section 4);
- other pickle-based loaders are refused outright: ``numpy.load`` with ``allow_pickle`` anything
  but a literal ``False``, ``pandas.read_pickle``, ``joblib.load``, ``dill``, ``shelve``,
  ``marshal.load(s)``, ``torch.jit.load``, ``torch.hub.load``, ``yaml.load`` / ``yaml.unsafe_load``.

The scanner itself is tested on planted files, good and bad.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("src", "kernels")
# the one module allowed to touch pickle's loaders (relative to the repo, POSIX form)
PICKLE_ALLOWED = {"src/avseg/data/safe_pickle.py"}

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "pickle5"}
PICKLE_LOADERS = {"load", "loads", "Unpickler"}
# module -> attribute names that deserialise arbitrary objects (None: every use of the module)
ALWAYS_UNSAFE: dict[str, set[str] | None] = {
    "pandas": {"read_pickle"},
    "joblib": {"load"},
    "dill": None,
    "shelve": None,
    "marshal": {"load", "loads"},
    "yaml": {"load", "unsafe_load", "load_all", "unsafe_load_all", "full_load", "full_load_all"},
    "torch.jit": {"load"},
    "torch.hub": {"load", "load_state_dict_from_url"},
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


class _UnsafeLoadVisitor(ast.NodeVisitor):
    """Resolves import aliases to dotted names, then judges every load-like call or reference."""

    def __init__(self, path: str, *, pickle_allowed: bool) -> None:
        self.path = path
        self.pickle_allowed = pickle_allowed
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("th" -> "torch")
        self.findings: list[Finding] = []

    # ------------------------------------------------------------------ imports
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top
            self._judge_reference(alias.name, node.lineno, imported=True)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module is None or node.level:
            return  # relative import inside the package: never a third-party loader
        for alias in node.names:
            origin = f"{node.module}.{alias.name}"
            self.aliases[alias.asname or alias.name] = origin
            self._judge_reference(origin, node.lineno, imported=True)

    # ------------------------------------------------------------------ names
    def _dotted(self, node: ast.AST) -> str | None:
        """``a.b.c`` with the head resolved through the import aliases, else None."""
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name) or node.id not in self.aliases:
            return None
        parts.append(self.aliases[node.id])
        return ".".join(reversed(parts))

    def _add(self, line: int, problem: str) -> None:
        self.findings.append(Finding(self.path, line, problem))

    def _judge_reference(self, dotted: str, line: int, *, imported: bool = False) -> None:
        module, _, attr = dotted.rpartition(".")
        if module in PICKLE_MODULES and attr in PICKLE_LOADERS and not self.pickle_allowed:
            self._add(line, f"{dotted} outside src/avseg/data/safe_pickle.py (use load_tensor_pickle)")
        for unsafe_module, names in ALWAYS_UNSAFE.items():
            if names is None and (dotted == unsafe_module or dotted.startswith(unsafe_module + ".")):
                self._add(line, f"{dotted}: {unsafe_module} deserialises arbitrary objects")
                return
            if names is not None and module == unsafe_module and attr in names:
                self._add(line, f"{dotted}: unsafe deserialiser")
                return

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = self._dotted(node)
        if dotted is not None:
            self._judge_reference(dotted, node.lineno)
            return  # the inner parts are prefixes of this name: judged through it
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        # a bare name bound by `from pickle import loads` etc.: judged at the import; a use of it
        # is judged again so that a file cannot hide it behind an alias
        if node.id in self.aliases and self.aliases[node.id] != node.id:
            self._judge_reference(self.aliases[node.id], node.lineno)

    # ------------------------------------------------------------------ calls
    def visit_Call(self, node: ast.Call) -> None:
        dotted = self._dotted(node.func)
        if dotted in {"torch.load", "torch.serialization.load"}:
            flag = next((kw for kw in node.keywords if kw.arg == "weights_only"), None)
            if flag is None or not (isinstance(flag.value, ast.Constant) and flag.value.value is True):
                self._add(node.lineno, f"{dotted}(...) without a literal weights_only=True")
        elif dotted in {"numpy.load"}:
            flag = next((kw for kw in node.keywords if kw.arg == "allow_pickle"), None)
            if flag is not None and not (isinstance(flag.value, ast.Constant) and flag.value.value is False):
                self._add(node.lineno, f"{dotted}(...) with allow_pickle not literally False")
            if any(kw.arg is None for kw in node.keywords):
                self._add(node.lineno, f"{dotted}(...) with **kwargs (allow_pickle must be visible)")
        self.generic_visit(node)


def scan_source(source: str, path: str, *, pickle_allowed: bool = False) -> list[Finding]:
    """Every unsafe load in one module's source text."""
    tree = ast.parse(source, filename=path)
    visitor = _UnsafeLoadVisitor(path, pickle_allowed=pickle_allowed)
    visitor.visit(tree)
    return visitor.findings


def scan_tree(root: Path, dirs: tuple[str, ...] = SCANNED_DIRS) -> tuple[list[Finding], int]:
    """(findings, number of files scanned) for every ``.py`` under ``root/<dir>``."""
    findings: list[Finding] = []
    scanned = 0
    for folder in dirs:
        for file in sorted((root / folder).rglob("*.py")):
            relative = file.relative_to(root).as_posix()
            findings += scan_source(
                file.read_text(encoding="utf-8"), relative, pickle_allowed=relative in PICKLE_ALLOWED
            )
            scanned += 1
    return findings, scanned


# ---------------------------------------------------------------------------------------------


def test_repository_has_no_unsafe_loads():
    findings, scanned = scan_tree(REPO)
    assert scanned >= 20, f"only {scanned} files scanned under {SCANNED_DIRS}: wrong repository root {REPO}?"
    assert not findings, "unsafe deserialisation:\n" + "\n".join(map(str, findings))


def test_the_restricted_unpickler_module_exists_and_is_the_one_exemption():
    # if safe_pickle.py moved, the exemption would silently stop meaning anything
    for relative in PICKLE_ALLOWED:
        source = (REPO / relative).read_text(encoding="utf-8")
        assert scan_source(source, relative, pickle_allowed=False), f"{relative} should use pickle's loader"
        assert not scan_source(source, relative, pickle_allowed=True)


BAD_SNIPPETS = {
    "plain": "import torch\nx = torch.load('a.pt')\n",
    "weights_only_false": "import torch\nx = torch.load('a.pt', weights_only=False)\n",
    "weights_only_variable": "import torch\nsafe = True\nx = torch.load('a.pt', weights_only=safe)\n",
    "weights_only_in_kwargs": "import torch\nkw = {'weights_only': True}\nx = torch.load('a.pt', **kw)\n",
    "alias_module": "import torch as th\nx = th.load('a.pt', map_location='cpu')\n",
    "from_import": "from torch import load\nx = load('a.pt')\n",
    "from_import_alias": "from torch import load as tl\nx = tl('a.pt')\n",
    "serialization": "import torch.serialization\nx = torch.serialization.load('a.pt')\n",
    "pickle_load": "import pickle\nwith open('a', 'rb') as f:\n    x = pickle.load(f)\n",
    "pickle_loads": "import pickle\nx = pickle.loads(b'')\n",
    "pickle_unpickler_subclass": "import pickle\nclass U(pickle.Unpickler):\n    pass\n",
    "pickle_from_import": "from pickle import loads\n",
    "pickle_alias": "import pickle as pk\nx = pk.loads(b'')\n",
    "cpickle": "import _pickle\nx = _pickle.loads(b'')\n",
    "numpy_allow_pickle": "import numpy as np\nx = np.load('a.npy', allow_pickle=True)\n",
    "pandas_read_pickle": "import pandas as pd\nx = pd.read_pickle('a.pkl')\n",
    "yaml_load": "import yaml\nx = yaml.load(open('a'))\n",
    "torch_jit_load": "import torch\nm = torch.jit.load('a.pt')\n",
    "nested_in_function": "def f(p):\n    import torch\n    return torch.load(p, map_location='cpu')\n",
}

GOOD_SNIPPETS = {
    "weights_only_true": "import torch\nx = torch.load('a.pt', weights_only=True, map_location='cpu')\n",
    "pickle_errors_only": "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    raise\n",
    "pickle_dump": "import pickle\npickle.dumps([1])\n",
    "numpy_no_pickle": "import numpy as np\nx = np.load('a.npy', allow_pickle=False)\ny = np.load('b.npy')\n",
    "yaml_safe": "import yaml\nx = yaml.safe_load('a: 1')\n",
    "unrelated_load": "import json\nx = json.load(open('a'))\nclass M:\n"
    "    def load(self):\n        return 1\nM().load()\n",
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_scanner_catches_planted_bad_call(tmp_path, name):
    planted = tmp_path / "src" / "pkg" / f"bad_{name}.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(BAD_SNIPPETS[name])
    findings, scanned = scan_tree(tmp_path)
    assert scanned == 1
    assert findings, f"the scanner missed {name!r}"
    assert all(f.path == f"src/pkg/bad_{name}.py" for f in findings)
    assert findings[0].line >= 1


@pytest.mark.parametrize("name", sorted(GOOD_SNIPPETS))
def test_scanner_accepts_safe_code(tmp_path, name):
    planted = tmp_path / "kernels" / f"good_{name}.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(GOOD_SNIPPETS[name])
    findings, scanned = scan_tree(tmp_path)
    assert scanned == 1
    assert findings == []


def test_planted_bad_call_next_to_the_real_tree_fails_the_scan(tmp_path):
    # a copy of the real src/ with one unsafe module added: the scan must now fail on exactly it
    import shutil

    for folder in SCANNED_DIRS:
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    planted = tmp_path / "src" / "avseg" / "data" / "sneaky.py"
    planted.write_text(
        textwrap.dedent(
            """
            from __future__ import annotations
            import torch

            def read(path):
                return torch.load(path, map_location="cpu")
            """
        )
    )
    findings, _ = scan_tree(tmp_path)
    assert [(f.path, f.line) for f in findings] == [("src/avseg/data/sneaky.py", 6)]
    # and pickle's loader is refused anywhere but safe_pickle.py, even next to it
    planted.write_text("import pickle\n\ndef read(b):\n    return pickle.loads(b)\n")
    findings, _ = scan_tree(tmp_path)
    assert [(f.path, f.line) for f in findings] == [("src/avseg/data/sneaky.py", 4)]
