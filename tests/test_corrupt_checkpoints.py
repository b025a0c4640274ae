"""Corrupt or mismatched checkpoints and pretrained-weights files (issue 6, item 2).

Each is a clear `CheckpointError` naming the file and what is wrong; on the command line
(``python -m avseg.eval ckpt_path=...``, ``python -m avseg.train ckpt_path=...``) it is one
``error: <file>: <problem>`` line, the LAST line printed, with exit status 1 and no traceback
(`avseg.cli.run_main`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from avseg.cli import error_lines, guarded, run_main
from avseg.errors import CheckpointError, ConfigError, DataError
from avseg.lit.module import AVSLitModule
from avseg.models.audio import AudioEncoder, VGGish
from avseg.models.backbone import ResNetBackbone

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TINY_MODEL = [
    "model.dim=32",
    "model.decomposition.codebook_size=16",
    "model.decomposition.num_heads=2",
    "model.fusion.num_heads=2",
    "model.decoder.num_heads=2",
    "model.decoder.num_layers=1",
]


def _module(extra: list[str] | None = None) -> AVSLitModule:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY_MODEL, *(extra or [])])
    return instantiate(OmegaConf.to_container(cfg.model, resolve=True), _recursive_=False)


def _lightning_checkpoint(module: AVSLitModule) -> dict:
    """What Lightning writes, reduced to what loading needs (the tests never train)."""
    return {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    good = folder / "good.ckpt"
    torch.save(_lightning_checkpoint(_module()), good)
    other = folder / "other_config.ckpt"  # a wider model with another decomposition
    torch.save(_lightning_checkpoint(_module(["model.dim=64", "model/decomposition=pq_split"])), other)
    return {"good": good, "other": other}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _single_line_naming(error: BaseException, path: Path) -> str:
    lines = error_lines(error)
    last = lines[-1]
    assert last.startswith("error: ") and str(path) in last, lines
    return last


# ---------------------------------------------------------------------------------------------
# training checkpoints, in process


def test_good_checkpoint_loads(checkpoints):
    module = AVSLitModule.load_trained(checkpoints["good"])
    assert module.checkpoint_source == str(checkpoints["good"])
    assert not module.training


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.999])
def test_truncated_checkpoint(checkpoints, tmp_path, keep):
    data = checkpoints["good"].read_bytes()
    path = _write(tmp_path / "truncated.ckpt", data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as raised:
        AVSLitModule.load_trained(path)
    assert raised.value.path == str(path)
    assert any(word in raised.value.problem for word in ("empty", "truncated", "corrupt", "not a readable")), (
        raised.value.problem
    )
    _single_line_naming(raised.value, path)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 1000, os.urandom(4096), b"hello, I am not a checkpoint\n", b"PK\x03\x04" + os.urandom(200)],
    ids=["zeros", "random", "text", "fake_zip"],
)
def test_garbage_checkpoint(tmp_path, garbage):
    path = _write(tmp_path / "garbage.ckpt", garbage)
    with pytest.raises(CheckpointError) as raised:
        AVSLitModule.load_trained(path)
    assert raised.value.path == str(path)
    _single_line_naming(raised.value, path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        AVSLitModule.load_trained(tmp_path / "absent.ckpt")


class _Payload:
    """Unpickling this with weights_only=False would call os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_with_code_is_refused_and_not_run(checkpoints, tmp_path):
    sentinel = tmp_path / "payload-ran"
    checkpoint = _lightning_checkpoint(AVSLitModule.load_trained(checkpoints["good"]))
    checkpoint["callbacks"] = {"evil": _Payload(f"touch {sentinel}")}
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="refused by the safe loader") as raised:
        AVSLitModule.load_trained(path)
    assert not sentinel.exists()
    _single_line_naming(raised.value, path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (torch.zeros(3), "expected a dict checkpoint"),
        ({"state_dict": {}}, "no 'hyper_parameters' entry"),
        ({"hyper_parameters": {}}, "no 'state_dict' entry"),
    ],
    ids=["tensor", "no_hparams", "no_state_dict"],
)
def test_not_a_training_checkpoint(tmp_path, content, problem):
    path = tmp_path / "weird.ckpt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=problem) as raised:
        AVSLitModule.load_trained(path)
    _single_line_naming(raised.value, path)


def test_checkpoint_from_another_model_config(checkpoints):
    """Resuming / loading another config's weights into this model: one error with the counts."""
    module = _module()
    module.checkpoint_source = str(checkpoints["other"])
    other_state = torch.load(checkpoints["other"], weights_only=True)["state_dict"]
    with pytest.raises(CheckpointError) as raised:
        module.load_state_dict(other_state)
    problem = raised.value.problem
    assert raised.value.path == str(checkpoints["other"])
    assert "another model config" in problem and "keys of another shape" in problem
    _single_line_naming(raised.value, checkpoints["other"])


def test_checkpoint_whose_config_and_weights_disagree(checkpoints, tmp_path):
    checkpoint = torch.load(checkpoints["good"], weights_only=True)
    checkpoint["hyper_parameters"]["dim"] = 64  # edited by hand: the weights are 32 wide
    path = tmp_path / "edited.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="do not fit this model config") as raised:
        AVSLitModule.load_trained(path)
    _single_line_naming(raised.value, path)


@pytest.mark.parametrize(
    ("part", "key", "value"),
    [
        ("decomposition", "num_subspaces", 0),  # a value the constructor refuses
        ("audio_encoder", "future_option", 3),  # a key only a newer avseg knows (Hydra's InstantiationException)
    ],
)
def test_checkpoint_whose_stored_config_cannot_be_built(checkpoints, tmp_path, part, key, value):
    checkpoint = torch.load(checkpoints["good"], weights_only=True)
    checkpoint["hyper_parameters"][part][key] = value
    path = tmp_path / "badconfig.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"stored model config cannot be built.*{key}") as raised:
        AVSLitModule.load_trained(path)
    _single_line_naming(raised.value, path)


# ---------------------------------------------------------------------------------------------
# pretrained weights: keys missing beyond the documented mapping


def test_backbone_weights_drop_only_the_classifier(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()  # has fc.* (documented: dropped)
    full = tmp_path / "resnet18.pth"
    torch.save(state, full)
    ResNetBackbone(name="resnet18", weights=str(full), frozen_bn=False)  # loads
    del state["layer3.1.conv2.weight"]
    short = tmp_path / "resnet18_short.pth"
    torch.save(state, short)
    with pytest.raises(CheckpointError, match=r"missing keys.*layer3\.1\.conv2\.weight") as raised:
        ResNetBackbone(name="resnet18", weights=str(short), frozen_bn=False)
    assert raised.value.path == str(short)
    _single_line_naming(raised.value, short)


def test_backbone_weights_garbage_file(tmp_path):
    path = _write(tmp_path / "resnet18.pth", os.urandom(512))
    with pytest.raises(CheckpointError) as raised:
        ResNetBackbone(name="resnet18", weights=str(path))
    _single_line_naming(raised.value, path)


def test_vggish_weights_with_a_missing_key(tmp_path):
    state = VGGish().state_dict()
    full = tmp_path / "vggish.pth"
    torch.save(state, full)
    AudioEncoder(dim=32, input="log_mel", vggish_weights=str(full), random_init=False)  # loads
    del state["embeddings.4.bias"]
    short = tmp_path / "vggish_short.pth"
    torch.save(state, short)
    with pytest.raises(CheckpointError, match=r"embeddings\.4\.bias") as raised:
        AudioEncoder(dim=32, input="log_mel", vggish_weights=str(short), random_init=False)
    assert raised.value.path == str(short)
    _single_line_naming(raised.value, short)


def test_vggish_weights_truncated(tmp_path):
    buffer = io.BytesIO()
    torch.save(VGGish().state_dict(), buffer)
    path = _write(tmp_path / "vggish.pth", buffer.getvalue()[:1000])
    with pytest.raises(CheckpointError) as raised:
        AudioEncoder(dim=32, input="log_mel", vggish_weights=str(path), random_init=False)
    _single_line_naming(raised.value, path)


# ---------------------------------------------------------------------------------------------
# avseg.cli


def test_run_main_prints_one_final_error_line_and_exits_1(capsys, tmp_path):
    path = tmp_path / "x.ckpt"

    def fails() -> None:
        print("some progress output")
        raise CheckpointError(path, "not a readable PyTorch checkpoint (truncated or corrupt?)")

    with pytest.raises(SystemExit) as raised:
        run_main(fails)
    assert raised.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "some progress output\n"
    assert captured.err.splitlines() == [f"error: {path}: not a readable PyTorch checkpoint (truncated or corrupt?)"]
    assert "Traceback" not in captured.err


def test_multi_line_message_keeps_the_headline_last(capsys):
    @guarded
    def fails() -> None:
        raise ConfigError("invalid configuration (2 problems):\n  a.b=1: allowed: 2\n  c=3: allowed: 4")

    with pytest.raises(SystemExit):
        fails()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "  a.b=1: allowed: 2",
        "  c=3: allowed: 4",
        "error: invalid configuration (2 problems): (listed above)",
    ]


def test_run_main_passes_results_and_other_exceptions_through(tmp_path):
    assert run_main(lambda x: x + 1, 1) == 2
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)  # a bug keeps its traceback


def test_run_main_reraises_under_hydra_multirun(monkeypatch, tmp_path):
    import avseg.cli

    monkeypatch.setattr(avseg.cli, "in_hydra_multirun", lambda: True)
    with pytest.raises(DataError):
        run_main(lambda: (_ for _ in ()).throw(DataError(tmp_path / "a.png", "bad")))


def _cli(module: str, args: list[str], tmp_path: Path, timeout: float = 300) -> tuple[int, list[str]]:
    """Run ``python -m MODULE ARGS`` with stdout and stderr in ONE pipe (their real order);
    stdout stays block-buffered as in a pipe, so the handler must flush it before the error."""
    env = {
        **os.environ,
        "AVSEG_CACHE": str(tmp_path / "cache"),
        "AVSEG_OUTPUTS": str(tmp_path / "outputs"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, [line for line in proc.stdout.splitlines() if line.strip()]


def _assert_last_line_names(code: int, lines: list[str], path: Path, words: str) -> None:
    output = "\n".join(lines[-40:])
    assert code == 1, output
    assert lines, "nothing printed"
    assert lines[-1].startswith("error: ") and str(path) in lines[-1] and words in lines[-1], output
    assert "Traceback" not in output, output


@pytest.mark.timeout(300)
def test_eval_cli_truncated_checkpoint(checkpoints, tmp_path):
    data = checkpoints["good"].read_bytes()
    path = _write(tmp_path / "truncated.ckpt", data[: len(data) // 2])
    code, lines = _cli("avseg.eval", [f"ckpt_path={path}"], tmp_path)
    _assert_last_line_names(code, lines, path, "truncated or corrupt")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_cli_garbage_checkpoint(tmp_path):
    path = _write(tmp_path / "garbage.ckpt", os.urandom(2048))
    code, lines = _cli("avseg.eval", [f"ckpt_path={path}"], tmp_path)
    _assert_last_line_names(code, lines, path, "")


_TINY_TRAIN = [
    "logger=none",
    "callbacks.mask_overlays=null",
    "data.synth.image_size=32",
    "data.synth.clips_per_split={train:2,val:1,test:1}",
    "data.batch_size=2",
    "data.eval_batch_size=1",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    *TINY_MODEL,
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_cli_resume_from_truncated_checkpoint(checkpoints, tmp_path):
    data = checkpoints["good"].read_bytes()
    path = _write(tmp_path / "last.ckpt", data[: len(data) - 100])
    code, lines = _cli("avseg.train", [*_TINY_TRAIN, f"ckpt_path={path}"], tmp_path, timeout=600)
    _assert_last_line_names(code, lines, path, "")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_cli_resume_from_another_model_config(checkpoints, tmp_path):
    code, lines = _cli("avseg.train", [*_TINY_TRAIN, f"ckpt_path={checkpoints['other']}"], tmp_path, timeout=600)
    _assert_last_line_names(code, lines, checkpoints["other"], "another model config")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_cli_backbone_weights_missing_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer2.0.bn1.running_mean"]
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    args = [*_TINY_TRAIN, f"model.backbone.weights={path}", "model.backbone.random_init=false"]
    code, lines = _cli("avseg.train", args, tmp_path, timeout=600)
    _assert_last_line_names(code, lines, path, "missing keys")


def test_checkpoint_with_the_untyped_hparams_layout_loads(tmp_path: Path) -> None:
    """Checkpoints written before AVSLitModule took typed arguments stored only the keys the model
    config set (no defaults for the training sections): they load into the same weights."""
    module = _module(["+model.matcher={cost_class: 1.0}"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        model_cfg = compose(config_name="train", overrides=[*TINY_MODEL, "+model.matcher={cost_class: 1.0}"]).model
    given = {key for key in model_cfg if not str(key).startswith("_")}
    checkpoint = _lightning_checkpoint(module)
    checkpoint["hyper_parameters"] = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in given}
    assert set(checkpoint["hyper_parameters"]) < set(module.hparams) and "matcher" in checkpoint["hyper_parameters"]
    path = tmp_path / "untyped_layout.ckpt"
    torch.save(checkpoint, path)
    loaded = AVSLitModule.load_trained(path)
    assert loaded.criterion.matcher.costs.class_ == 1.0 and loaded.criterion.matcher.costs.dice == 5.0
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in module.state_dict().items())


def test_module_rejects_unknown_arguments_but_not_hydra_keys() -> None:
    module = _module()
    hparams = dict(module.hparams)
    AVSLitModule(**hparams, _target_="avseg.lit.module.AVSLitModule", _recursive_=False)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['dimm'\\]"):
        AVSLitModule(**hparams, dimm=32)
