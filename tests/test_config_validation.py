"""Start-up config validation (`avseg.config_validation`): every violation one line naming the key
and the allowed values, all of them collected into one `ConfigError`, before any data is read."""

from __future__ import annotations

import builtins
import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from avseg.config_validation import config_problems, validate_config
from avseg.errors import AvsegError, ConfigError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """A data folder and a weights folder shaped like the real ones (empty files; never read)."""
    base = tmp_path_factory.mktemp("realdata")
    data, weights = base / "data", base / "weights"
    for folder, csv in (
        ("Single-source", "s4_meta_data.csv"),
        ("Multi-sources", "ms3_meta_data.csv"),
        ("AVSBench-semantic", "metadata.csv"),
    ):
        (data / folder).mkdir(parents=True)
        (data / folder / csv).write_text("not read by the validator\n")
    weights.mkdir()
    for name in ("resnet50.pth", "vggish.pth"):
        (weights / name).write_bytes(b"not read by the validator")
    return data, weights


@pytest.fixture(scope="module")
def configs(real_data):
    """Composed once per module (composing is slow on a busy machine); tests take deep copies."""
    data, weights = real_data
    paths = [f"paths.data_dir={data}", f"paths.weights_dir={weights}"]
    return {
        "train": _compose("train", []),
        "synth_s4": _compose("train", ["experiment=synth_s4"]),
        "synth_avss": _compose("train", ["experiment=synth_avss"]),
        "s4_r50": _compose("train", ["experiment=s4_r50", *paths]),
        "avss_r50": _compose("train", ["experiment=avss_r50", *paths]),
        "avs_r50": _compose("train", ["experiment=avs_r50", *paths]),
        "ddp_cpu": _compose("train", ["trainer=ddp_cpu"]),
        "eval": _compose("eval", [f"ckpt_path={weights / 'vggish.pth'}"]),
    }


def _copy(configs, name):
    cfg = copy.deepcopy(configs[name])
    OmegaConf.set_struct(cfg, False)
    return cfg


def _only_problem(cfg, key: str) -> str:
    problems = config_problems(cfg)
    assert len(problems) == 1, problems
    line = problems[0]
    assert "\n" not in line
    assert line.startswith(key), line
    assert "allowed" in line, line
    return line


# ---------------------------------------------------------------------------------------------
# the shipped configs are valid


@pytest.mark.parametrize(
    "name", ["train", "synth_s4", "synth_avss", "s4_r50", "avss_r50", "avs_r50", "ddp_cpu", "eval"]
)
def test_shipped_configs_are_valid(configs, name):
    assert config_problems(configs[name]) == []
    assert validate_config(configs[name]) is None


@pytest.mark.parametrize("variant", ["pq", "pq_split", "vq", "none"])
def test_every_decomposition_variant_of_the_demo_is_valid(configs, variant):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.variant = variant
    assert config_problems(cfg) == []


# ---------------------------------------------------------------------------------------------
# decomposition


def test_num_subspaces_below_one(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.num_subspaces = 0
    line = _only_problem(cfg, "model.decomposition.num_subspaces")
    assert "=0" in line and ">= 1" in line


def test_codebook_smaller_than_k(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.num_subspaces = 8
    cfg.model.decomposition.codebook_size = 4
    line = _only_problem(cfg, "model.decomposition.codebook_size")
    assert "must be >= num_subspaces (8)" in line


def test_vq_uses_one_code_whatever_k(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.variant = "vq"
    cfg.model.decomposition.num_subspaces = 8
    cfg.model.decomposition.codebook_size = 4
    assert config_problems(cfg) == []


def test_pq_split_chunks_must_divide_width(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.variant = "pq_split"
    cfg.model.decomposition.num_subspaces = 3  # dim 64 is not divisible by 3
    line = _only_problem(cfg, "model.decomposition.num_subspaces")
    assert "model.dim=64" in line and "[1, 2, 4, 8, 16, 32, 64]" in line
    cfg.model.decomposition.variant = "pq"  # pq does not split: 3 prototypes are fine
    assert config_problems(cfg) == []


def test_unknown_variant_and_distill_loss(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.variant = "pqq"
    line = _only_problem(cfg, "model.decomposition.variant")
    assert "pq | pq_split | vq | none" in line
    cfg.model.decomposition.variant = "pq"
    cfg.model.decomposition.distill_loss = "l1"
    line = _only_problem(cfg, "model.decomposition.distill_loss")
    assert "mse | ce" in line


def test_dual_stride_must_be_an_encoder_stride(configs):
    cfg = _copy(configs, "train")
    cfg.model.fusion.dual_stride = 64
    assert "8 | 16 | 32" in _only_problem(cfg, "model.fusion.dual_stride")


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("model.fusion.dual_form", "r2vos | gate"),
        ("model.decoder.box_head", "per_layer | shared"),
        ("model.decoder.controller_layout", "referformer | interleaved"),
        ("model.decoder.rel_coords_unit", "pixels | unit"),
        ("model.loss.match_level", "clip | frame"),
        ("model.decomposition.vq_loss_form", "vqvae | taming_legacy"),
    ],
)
def test_paper_fidelity_switches_name_their_values(configs, key, allowed):
    cfg = _copy(configs, "train")
    OmegaConf.update(cfg, key, "bogus", force_add=True)
    assert allowed in _only_problem(cfg, key)


def _without_similarity(cfg):
    """The demo (the train config's default experiment) turns the similarity switches on; off here."""
    cfg.model.fusion.audio_similarity_dim = 0
    cfg.model.fusion.similarity_to_masks = False
    cfg.model.loss.weight_similarity = 0.0
    return cfg


def test_audio_similarity_dim_is_a_non_negative_int_and_needs_audio_in_the_pixel_path(configs):
    cfg = _without_similarity(_copy(configs, "train"))
    cfg.model.fusion.audio_similarity_dim = -2
    assert "0 = off" in _only_problem(cfg, "model.fusion.audio_similarity_dim")
    cfg.model.fusion.audio_similarity_dim = 16
    cfg.model.fusion.fpn_type = "none"
    assert "fpn_type=none" in _only_problem(cfg, "model.fusion.audio_similarity_dim")


def test_early_fusion_form_is_one_of_three(configs):
    cfg = _copy(configs, "train")
    cfg.model.fusion.early_fusion_form = "concat"
    assert "product | residual_product | sum" in _only_problem(cfg, "model.fusion.early_fusion_form")


def test_heads_must_divide_width(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition.num_heads = 5
    assert "model.dim=64" in _only_problem(cfg, "model.decomposition.num_heads")


# ---------------------------------------------------------------------------------------------
# data


def test_real_data_root_must_exist(configs, tmp_path):
    cfg = _copy(configs, "s4_r50")
    cfg.data.root = str(tmp_path / "nowhere")
    line = _only_problem(cfg, "data.root")
    assert "no such folder" in line and "s4_meta_data.csv" in line
    cfg.data.root = str(tmp_path)  # exists but holds no CSV
    line = _only_problem(cfg, "data.root")
    assert "has no s4_meta_data.csv" in line


def test_avs_roots_checked_per_member(configs, tmp_path):
    cfg = _copy(configs, "avs_r50")
    cfg.data.roots.ms3 = str(tmp_path / "missing")
    line = _only_problem(cfg, "data.roots.ms3")
    assert "ms3_meta_data.csv" in line


def test_missing_weights_file_is_named(configs, tmp_path):
    cfg = _copy(configs, "s4_r50")
    cfg.model.backbone.weights = str(tmp_path / "r50.pth")
    line = _only_problem(cfg, "model.backbone.weights")
    assert "r50.pth" in line and "no such file" in line


@pytest.mark.parametrize(
    ("name", "subset"),
    [("synth_s4", "s4"), ("synth_avss", "avss"), ("s4_r50", "s4"), ("avss_r50", "avss"), ("avs_r50", "avs")],
)
def test_experiments_declare_their_subset(configs, name, subset):
    # the experiment's own keys must survive composition (train.yaml's defaults must not override
    # them), or the subset check below has nothing to compare with
    assert configs[name].expected_subset == subset
    assert configs[name].task_name == name


def test_subset_must_match_experiment_and_task(configs):
    # a binary s4 experiment run on the AVSS data: two violations, both named
    cfg = _copy(configs, "synth_s4")
    cfg.expected_subset = "s4"  # what experiment=synth_s4 sets (checked above)
    avss = _copy(configs, "synth_avss")
    cfg.data = avss.data
    problems = config_problems(cfg)
    assert len(problems) == 2, problems
    assert any(p.startswith("model.num_classes=1: allowed: 70 for data.subset=avss") for p in problems), problems
    assert any(p.startswith("data.subset='avss': this experiment expects data.subset=s4") for p in problems), problems


def test_semantic_model_on_binary_data(configs):
    cfg = _copy(configs, "train")
    cfg.model.num_classes = 70
    line = _only_problem(cfg, "model.num_classes")
    assert "1 for data.subset=ms3" in line


@pytest.mark.parametrize(("name", "good", "bad"), [("train", 20, 12), ("synth_avss", 40, 25)])
def test_frames_per_batch_multiple_of_clip_length(configs, name, good, bad):
    cfg = _copy(configs, name)
    cfg.model.metric.frames_per_batch = good
    assert config_problems(cfg) == []
    cfg.model.metric.frames_per_batch = bad
    line = _only_problem(cfg, "model.metric.frames_per_batch")
    clip_length = 10 if name == "synth_avss" else 5
    assert f"T={clip_length}" in line


def test_audio_source_allowed_values(configs):
    cfg = _copy(configs, "synth_avss")
    cfg.data.audio_source = "pkl"  # AVSS ships no .pkl
    assert "wav | embeddings" in _only_problem(cfg, "data.audio_source")
    cfg = _copy(configs, "train")
    cfg.data.audio_source = "pkl"  # SynthAVS writes pickles only with synth.write_pkl
    assert "write_pkl" in _only_problem(cfg, "data.audio_source")
    cfg.data.synth.write_pkl = True
    assert config_problems(cfg) == []


def test_unresolvable_interpolation_is_a_problem_not_a_crash(configs, monkeypatch):
    monkeypatch.delenv("AVSEG_TEST_UNSET_VARIABLE", raising=False)
    cfg = _copy(configs, "s4_r50")
    cfg.data.root = "${oc.env:AVSEG_TEST_UNSET_VARIABLE}/Single-source"
    line = _only_problem_unresolved(cfg)
    assert line.startswith("data.root: cannot be resolved") and "AVSEG_TEST_UNSET_VARIABLE" in line


def _only_problem_unresolved(cfg) -> str:
    problems = config_problems(cfg)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------------------------------------
# trainer


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("accelerator", "gpus", "cpu | cuda"),
        ("devices", 0, "auto | -1"),
        ("num_nodes", 0, ">= 1"),
        ("strategy", "dpp", "ddp"),
        ("precision", "fp16", "16-mixed"),
        ("precision", "16-mixed", "on trainer.accelerator=cpu"),
        ("max_epochs", 0, "an integer >= 1"),
        ("max_steps", 0, "-1 (no step limit)"),
        ("gradient_clip_val", -0.1, ">= 0"),
        ("gradient_clip_algorithm", "l2", "norm | value"),
        ("accumulate_grad_batches", 0, ">= 1"),
        ("limit_train_batches", 1.5, "float in [0, 1]"),
        ("deterministic", "yes", "true | false | warn"),
    ],
)
def test_trainer_values(configs, key, value, expected):
    cfg = _copy(configs, "train")
    cfg.trainer[key] = value
    line = _only_problem(cfg, f"trainer.{key}")
    assert expected in line


def test_trainer_must_stop(configs):
    cfg = _copy(configs, "train")
    cfg.trainer.max_epochs = -1
    cfg.trainer.max_steps = -1
    assert "never stop" in _only_problem(cfg, "trainer.max_epochs")
    cfg.trainer.max_steps = 100
    assert config_problems(cfg) == []


def test_min_epochs_above_max(configs):
    cfg = _copy(configs, "train")
    cfg.trainer.max_epochs = 4
    cfg.trainer.min_epochs = 9
    assert "max_epochs=4" in _only_problem(cfg, "trainer.min_epochs")


def test_nccl_needs_gpus_and_strategy_target_must_import(configs):
    cfg = _copy(configs, "ddp_cpu")
    cfg.trainer.strategy.process_group_backend = "nccl"
    assert "gloo" in _only_problem(cfg, "trainer.strategy.process_group_backend")
    cfg = _copy(configs, "ddp_cpu")
    cfg.trainer.strategy._target_ = "lightning.pytorch.strategies.NoSuchStrategy"
    line = _only_problem(cfg, "trainer.strategy._target_")
    assert "cannot be imported" in line


# ---------------------------------------------------------------------------------------------
# top level, eval, and collecting everything


def test_top_level_switches(configs, tmp_path):
    cfg = _copy(configs, "train")
    cfg.skip_nonfinite = "yes"
    assert "true | false" in _only_problem(cfg, "skip_nonfinite")
    cfg = _copy(configs, "train")
    cfg.ckpt_path = str(tmp_path / "last.ckpt")
    assert "last.ckpt" in _only_problem(cfg, "ckpt_path")
    cfg = _copy(configs, "train")
    cfg.callbacks.checkpoint.every_n_train_steps = -5
    _only_problem(cfg, "callbacks.checkpoint.every_n_train_steps")


def test_eval_keys(configs):
    cfg = _copy(configs, "eval")
    cfg.split = "tset"
    cfg.perturb = "mutee"
    cfg.device = "gpu"
    problems = config_problems(cfg)
    assert problems == [
        "split='tset': allowed values are train | val | test",
        "perturb='mutee': allowed values are none | mute | swap | noise",
        "device='gpu': allowed: auto | cpu | cuda | cuda:N",
    ]
    cfg = _compose("eval", [])  # ckpt_path: ??? (required)
    assert config_problems(cfg) == ["ckpt_path: required, but not set (???); give ckpt_path=..."]


def test_all_violations_collected_in_one_error(configs, tmp_path):
    cfg = _copy(configs, "s4_r50")
    cfg.model.decomposition.num_subspaces = 0
    cfg.model.decomposition.distill_loss = "kl"
    cfg.data.root = str(tmp_path / "nope")
    cfg.model.metric.frames_per_batch = 7
    cfg.trainer.precision = "half"
    cfg.trainer.accelerator = "tpuu"
    with pytest.raises(ConfigError) as raised:
        validate_config(cfg)
    assert isinstance(raised.value, AvsegError)
    lines = str(raised.value).splitlines()
    assert lines[0] == "invalid configuration (6 problems):"
    keys = [line.strip().split("=")[0].split(":")[0] for line in lines[1:]]
    assert sorted(keys) == sorted(
        [
            "model.decomposition.num_subspaces",
            "model.decomposition.distill_loss",
            "data.root",
            "model.metric.frames_per_batch",
            "trainer.precision",
            "trainer.accelerator",
        ]
    )
    assert all("allowed" in line for line in lines[1:])


def test_validation_opens_no_file(configs, monkeypatch):
    cfg = _copy(configs, "s4_r50")
    validate_config(cfg)  # warm: imports Lightning's registries once

    def refuse(*args, **kwargs):
        raise AssertionError(f"validate_config opened a file: {args[:1]}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    validate_config(cfg)
    cfg.data.root = "/definitely/not/here"
    with pytest.raises(ConfigError):
        validate_config(cfg)


def test_plain_mapping_accepted():
    cfg = {
        "model": {
            "dim": 64,
            "num_classes": 1,
            "decomposition": {"variant": "pq", "num_subspaces": 4, "codebook_size": 2},
        }
    }
    assert config_problems(cfg) == [
        "model.decomposition.codebook_size=2: must be >= num_subspaces (4); allowed: an integer >= K = 4, or a lower "
        "num_subspaces"
    ]


def test_train_cli_stops_before_any_data_is_read(tmp_path):
    """``python -m avseg.train`` with a bad decomposition exits 1 naming the key, and no SynthAVS
    tree was generated (the data cache stays empty)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "AVSEG_CACHE": str(cache), "AVSEG_OUTPUTS": str(tmp_path / "out"), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "avseg.train", "model.decomposition.num_subspaces=0", "logger=none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "model.decomposition.num_subspaces" in result.stderr
    assert "Traceback" not in result.stderr
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


def test_similarity_loss_weight_needs_the_similarity_map(configs):
    cfg = _without_similarity(_copy(configs, "train"))
    cfg.model.loss.weight_similarity = 1.0
    assert "audio_similarity_dim > 0" in _only_problem(cfg, "model.loss.weight_similarity")
    cfg.model.fusion.audio_similarity_dim = 16
    assert config_problems(cfg) == []
    cfg.model.loss.weight_similarity = -0.5
    assert ">= 0" in _only_problem(cfg, "model.loss.weight_similarity")


def test_source_loss_needs_per_source_class_labels(configs):
    cfg = _copy(configs, "train")  # the demo: binary SynthAVS MS3
    cfg.model.loss.weight_source = 1.0
    assert "avss" in _only_problem(cfg, "model.loss.weight_source")
    cfg = _copy(configs, "synth_avss")
    cfg.model.loss.weight_source = 1.0
    assert config_problems(cfg) == []
    cfg.model.loss.weight_source = -1.0
    assert ">= 0" in _only_problem(cfg, "model.loss.weight_source")


def test_similarity_to_masks_is_a_bool_that_needs_the_similarity_map(configs):
    cfg = _without_similarity(_copy(configs, "train"))
    cfg.model.fusion.similarity_to_masks = True
    assert "audio_similarity_dim > 0" in _only_problem(cfg, "model.fusion.similarity_to_masks")
    cfg.model.fusion.audio_similarity_dim = 8
    assert config_problems(cfg) == []
    cfg.model.fusion.similarity_to_masks = "yes"
    assert _only_problem(cfg, "model.fusion.similarity_to_masks")


def test_test_ckpt_is_best_or_last(configs):
    cfg = _copy(configs, "train")
    assert cfg.test_ckpt == "last"  # the demo's choice (conf/experiment/synth_ms3.yaml)
    cfg.test_ckpt = "newest"
    assert "best" in _only_problem(cfg, "test_ckpt")


# ---------------------------------------------------------------------------------------------
# each component's allowed values are stated once (its check_options) and read twice


def _constructors():
    from avseg.models.audio import AudioEncoder
    from avseg.models.build import build_decomposition
    from avseg.models.criterion import SetCriterion
    from avseg.models.decoder import SemanticGuidedDecoder
    from avseg.models.fusion import AudioVisualFusion
    from avseg.models.layers.deformable import DeformableLayerSpec

    spec = DeformableLayerSpec(
        dim=64, ffn_dim=128, dropout=0.0, num_levels=4, num_heads=4, num_points=2, backend="torch"
    )
    return {
        "model.audio_encoder": lambda **kw: AudioEncoder(dim=64, **kw),
        "model.decomposition": lambda **kw: build_decomposition(
            {"_target_": "avseg.models.decomposition.AudioDecomposition", **kw}, dim=64
        ),
        "model.fusion": lambda **kw: AudioVisualFusion(spec=spec, res2_channels=64, **kw),
        "model.decoder": lambda **kw: SemanticGuidedDecoder(spec=spec, num_classes=1, mask_dim=8, **kw),
        "model.loss": lambda **kw: SetCriterion(num_classes=1, semantic=False, **kw),
    }


@pytest.mark.parametrize(
    ("section", "option", "value", "allowed"),
    [
        ("model.audio_encoder", "network", "wavenet", "vggish | log_mel_cnn"),
        ("model.decomposition", "prototype_role", "key", "content | position"),
        ("model.decomposition", "codebook_update", "adam", "loss | ema"),
        ("model.decomposition", "vq_loss_form", "l2", "vqvae | taming_legacy"),
        ("model.fusion", "dual_form", "concat", "r2vos | gate"),
        ("model.decoder", "box_head", "none", "per_layer | shared"),
        ("model.loss", "mask_resolution", "full", "pred | target"),
    ],
)
def test_start_up_and_constructor_read_the_same_rule(configs, section, option, value, allowed):
    key = f"{section}.{option}"
    cfg = _copy(configs, "train")
    OmegaConf.update(cfg, key, value, force_add=True)
    line = _only_problem(cfg, key)
    assert line == f"{key}={value!r}: allowed values are {allowed}"
    with pytest.raises(ConfigError) as raised:
        _constructors()[section](**{option: value})
    assert str(raised.value) == f"{key}: got {value!r}; allowed: {allowed}"


def test_model_width_is_a_multiple_of_32_at_start_up(configs):
    cfg = _copy(configs, "train")
    cfg.model.dim = 48
    assert "multiple of 32" in _only_problem(cfg, "model.dim")


def test_a_section_whose_target_states_no_rules_is_left_to_it(configs):
    cfg = _copy(configs, "train")
    cfg.model.decomposition._target_ = "torch.nn.Identity"  # no check_options: its own rules apply
    cfg.model.decomposition.variant = "anything"
    assert config_problems(cfg) == []
