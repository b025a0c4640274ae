"""The notebooks run top to bottom in the venv's own kernel (nbclient) and produce their figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _kernel_name() -> str:
    """``python3`` after checking it starts this interpreter: jupyter_client swaps a kernelspec
    argv of ``python`` for ``sys.executable``; any other interpreter would test another install."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    executable = spec.argv[0]
    assert executable in (
        "python",
        f"python{sys.version_info[0]}",
        f"python{sys.version_info[0]}.{sys.version_info[1]}",
    ) or (Path(executable).resolve() == Path(sys.executable).resolve()), (
        f"the python3 kernel runs {executable}, not {sys.executable}"
    )
    return "python3"


@pytest.mark.slow
def test_quickstart_notebook_runs_and_draws(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("QUICKSTART_STEPS", "3")  # the plumbing, not a trained model
    monkeypatch.setenv("AVSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    notebook = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=_kernel_name(), timeout=900, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"python : {sys.executable}" in text or f"python : {os.path.realpath(sys.executable)}" in text
    assert "steps done: 3" in text
    assert "'miou':" in text and "'fscore':" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= 3  # a clip, predicted vs ground-truth masks, codebook usage
    assert not any((tmp_path / name).exists() for name in ("lightning_logs", "checkpoints"))
