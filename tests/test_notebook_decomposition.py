"""notebooks/decomposition.ipynb runs top to bottom in the venv's kernel (nbclient) on a tiny
checkpoint (a very short `python -m avseg.train`) and draws its figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers_train import REPO, run_train
from test_eval_predict import TRAIN_OVERRIDES
from test_notebooks import _kernel_name


@pytest.mark.slow
def test_decomposition_notebook_runs_and_draws(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    cache = Path(os.environ["AVSEG_CACHE"])
    run_dir = tmp_path / "run"
    run_train([*TRAIN_OVERRIDES, f"hydra.run.dir={run_dir}"], cache_dir=cache, timeout=900)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()

    monkeypatch.setenv("DECOMPOSITION_CKPT", str(ckpt))
    monkeypatch.setenv("AVSEG_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    notebook = nbformat.read(REPO / "notebooks" / "decomposition.ipynb", as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        notebook, kernel_name=_kernel_name(), timeout=600, resources={"metadata": {"path": str(work)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"checkpoint : {ckpt}" in text and "variant    : pq K = 4, N = 64" in text
    assert "clips: 4 (4 with several sources), seconds: 20" in text
    assert "codes used: global" in text and "sub-space 4:" in text
    assert "| sub-space | samples | codes used | NMI |" in text
    assert "PCA explained variance (2 components)" in text and "audio-token spread across seconds:" in text
    assert "attention maps: 3 clips, rows sum to [1.0, 1.0, 1.0, 1.0]" in text
    # issue 13: the source-set table beside its oracle rows, and the per-sub-space code timelines
    assert "| codes | agreement | source-set F1 |" in text and "| oracle: decomposition | " in text
    assert "timeline " in text and "  second 1: sounding " in text and "code timelines: 2 clips" in text
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) == 4  # codebook usage, PCA, attention maps, code timelines
    assert not any(work.iterdir())  # the notebook writes nothing
