"""The Triton-interpreter tests run only in a process started with TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates the kernels, i.e. when
``avseg_kernels.ms_deform_attn`` is imported, so these tests cannot share a process with code that
imported the kernels without it. The normal ``pytest`` run skips collecting them;
``tests/test_ops_deform_attn.py::test_triton_interpreter_suite`` runs them in a subprocess:

    TRITON_INTERPRET=1 python -m pytest tests/interpret -q -p no:cacheprovider
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") != "1":
    collect_ignore_glob = ["test_*.py"]


_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    for item in items:
        if os.path.dirname(str(item.path)) == _HERE:
            item.add_marker(pytest.mark.interpret)
