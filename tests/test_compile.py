"""``model.compile`` (issue 17): the option's values, the compiled parts, and the tiny model trained
through Lightning with the network's parts compiled (``aot_eager``: dynamo tracing and AOT
autograd without code generation, seconds; inductor, the default backend, in a slow test)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch
from helpers_train import QUIET, TINY_MODEL, TINY_SYNTH, compose_train

from avseg.errors import ConfigError
from avseg.lit.compilation import COMPILED_PARTS, compile_options


def test_compile_option_values() -> None:
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"backend": "aot_eager", "dynamic": False}) == {"backend": "aot_eager", "dynamic": False}
    with pytest.raises(ConfigError, match="model.compile: unknown keys"):
        compile_options({"backen": "inductor"})
    with pytest.raises(ConfigError, match="model.compile='yes'"):
        compile_options("yes")


def test_compiled_module_keeps_parameter_names_and_leaves_the_quantiser_eager() -> None:
    from test_model_build import model_config

    from avseg.lit.module import AVSLitModule

    cfg = model_config("qdformer_tiny", ["audio_encoder=embeddings"])
    eager = AVSLitModule(**cfg)
    compiled = AVSLitModule(**{**cfg, "compile": {"backend": "aot_eager"}})
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints are interchangeable
    for name, child in compiled.net.named_children():
        assert (child._compiled_call_impl is not None) == (name in COMPILED_PARTS), name


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("AVSEG_CACHE") or tmp_path_factory.mktemp("cache"))


def _train(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, compile_value: str) -> list[float]:
    from avseg.train import run

    monkeypatch.setenv("AVSEG_CACHE", str(cache_dir))
    torch._dynamo.reset()
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=synth_s4",
        *TINY_SYNTH,
        *TINY_MODEL,
        *QUIET,
        f"model.compile={compile_value}",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=0",
        "test=false",
    ]
    run(compose_train(overrides, run_dir=run_dir))  # training only: evaluation would trace eval-mode graphs too
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    return losses


def test_tiny_model_trains_compiled_aot_eager(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train(tmp_path, cache_dir, monkeypatch, "{backend:aot_eager}")


@pytest.mark.slow  # inductor generates and compiles C++ for every graph: 1-3 minutes on 2 cores
def test_tiny_model_trains_compiled_inductor(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _train(tmp_path, cache_dir, monkeypatch, "true")
