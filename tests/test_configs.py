"""Every config in conf/ composes with Hydra's compose API, and the model part instantiates (on tiny
sizes); the start-up validation reports bad values one line per key."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_train import CONF, compose_train
from omegaconf import OmegaConf

from avseg.errors import ConfigError

# groups whose options are selected from train.yaml (nested groups by their path); conf/analysis/
# holds the analysis commands' own configs (composed in tests/test_analysis.py)
GROUPS = sorted(
    {
        str(path.parent.relative_to(CONF))
        for path in CONF.rglob("*.yaml")
        if path.parent != CONF and path.parent.relative_to(CONF).parts[0] != "analysis"
    }
)


def group_options() -> list[tuple[str, str]]:
    options = []
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            options.append((group, path.stem))
    return options


def test_groups_found() -> None:
    # the config layout this project documents (docs/TRAINING.md)
    for group in (
        "data",
        "model",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "hydra",
        "experiment",
        "debug",
        "hydra/launcher",
    ):
        assert group in GROUPS, f"conf/{group} missing"
    assert {"s4_r50", "ms3_r50", "avs_r50", "avss_r50", "synth_s4", "synth_ms3", "synth_avss"} <= {
        name for group, name in group_options() if group == "experiment"
    }
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= {
        name for group, name in group_options() if group == "trainer"
    }


@pytest.mark.parametrize("group,option", group_options(), ids=lambda v: str(v))
def test_every_option_composes(group: str, option: str) -> None:
    if group == "hydra":
        return  # the hydra node itself: composed with every config below
    if group in ("model/backbone", "model/audio_encoder", "model/decomposition", "model/decoder"):
        overrides = [f"{group}={option}"]
    else:
        overrides = [f"{group}={option}"]
    cfg = compose_train(overrides)
    # the whole config resolves (paths, interpolations) once the hydra node is there
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.resolve(cfg.hydra)
    HydraConfig.instance().set_config(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["model"]["_target_"] == "avseg.lit.module.AVSLitModule"
    assert plain["trainer"]["_target_"] == "lightning.pytorch.Trainer"
    assert plain["data"]["_target_"] == "avseg.lit.datamodule.AVSDataModule"
    assert plain["hydra"]["run"]["dir"].endswith(tuple("0123456789"))  # sub-second timestamp


def test_run_dir_has_subsecond_timestamp() -> None:
    cfg = compose_train([])
    run_dir = cfg.hydra.run.dir
    stamp = Path(run_dir).name  # %Y-%m-%d_%H-%M-%S-%f
    assert len(stamp.split("-")[-1]) == 6, run_dir
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] == "${hydra.job.num}"


def test_slurm_launcher_config_composes() -> None:
    cfg = compose_train(
        ["hydra/launcher=submitit_slurm_gpu", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.nodes == 2 and launcher.gpus_per_node == 4


def _tiny(model_cfg: dict) -> dict:
    """Shrinks any composed model config to CPU-test size without changing its structure."""
    model_cfg = dict(model_cfg)
    model_cfg["dim"] = 32
    for key in ("backbone",):
        sub = dict(model_cfg[key])
        if "weights" in sub:
            sub["weights"] = None
            sub["random_init"] = True
        if sub.get("name") == "pvt_v2_b5":
            sub["name"] = "pvt_v2_b0"
        model_cfg[key] = sub
    audio = dict(model_cfg["audio_encoder"])
    audio["vggish_weights"] = None
    audio["random_init"] = True
    model_cfg["audio_encoder"] = audio
    model_cfg["init_from"] = None
    for key in ("decomposition", "fusion", "decoder"):
        sub = dict(model_cfg[key])
        if "num_heads" in sub:
            sub["num_heads"] = 2
        if "num_layers" in sub:
            sub["num_layers"] = 1
        if "num_encoder_layers" in sub:
            sub["num_encoder_layers"] = 1
        if "ffn_dim" in sub:
            sub["ffn_dim"] = 64
        if "codebook_size" in sub:
            sub["codebook_size"] = 16
        model_cfg[key] = sub
    return model_cfg


MODEL_VARIANTS = [
    [],
    ["model=qdformer"],
    ["model/decomposition=vq"],
    ["model/decomposition=pq_split"],
    ["model/decomposition=none"],
    ["model/audio_encoder=embeddings"],
    ["experiment=synth_avss"],
    ["experiment=avss_r50"],
    ["experiment=s4_r50"],
]


@pytest.mark.parametrize("overrides", MODEL_VARIANTS, ids=lambda o: " ".join(o) or "default")
def test_model_part_instantiates_tiny(overrides: list[str]) -> None:
    import hydra.utils
    import torch

    from avseg.lit.module import AVSLitModule

    cfg = compose_train(overrides)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    model_cfg = _tiny(OmegaConf.to_container(cfg.model, resolve=True))
    module = hydra.utils.instantiate(model_cfg, skip_nonfinite=False)
    assert isinstance(module, AVSLitModule)
    assert module.semantic == (cfg.model.num_classes == 70)
    # plain hyper-parameters only: what load_from_checkpoint needs
    assert all(not OmegaConf.is_config(v) for v in module.hparams.values())
    optimizers = module.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs[-1] == pytest.approx(max(cfg.model.optim.lr, cfg.model.optim.backbone_lr))


def test_backbone_gets_its_own_learning_rate() -> None:
    import hydra.utils

    cfg = compose_train(["model.optim.lr=3e-4", "model.optim.backbone_lr=3e-5"])
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    module = hydra.utils.instantiate(_tiny(OmegaConf.to_container(cfg.model, resolve=True)))
    optimizer = module.configure_optimizers()["optimizer"]
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["main"]["lr"] == pytest.approx(3e-4)
    assert by_name["backbone"]["lr"] == pytest.approx(3e-5)
    backbone_ids = {id(p) for p in module.net.backbone.parameters()}
    assert all(id(p) in backbone_ids for p in by_name["backbone"]["params"])
    assert not any(id(p) in backbone_ids for p in by_name["main"]["params"])
    assert optimizer.defaults["weight_decay"] == pytest.approx(5e-4)


def test_validation_reports_every_bad_key_on_its_own_line() -> None:
    from avseg.config_validation import validate_config

    cfg = compose_train(
        [
            "model.decomposition.num_subspaces=0",
            "model.decomposition.variant=bogus",
            "model.num_classes=70",
            "trainer.accelerator=abacus",
            "callbacks.checkpoint.every_n_train_steps=-3",
        ]
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    lines = str(info.value).splitlines()[1:]
    keys = [line.strip().split("=")[0] for line in lines]
    assert keys == [
        "model.decomposition.variant",
        "model.decomposition.num_subspaces",
        "model.num_classes",
        "trainer.accelerator",
        "callbacks.checkpoint.every_n_train_steps",
    ]
    assert "allowed values are pq | pq_split | vq | none" in lines[0]


def test_validation_codebook_smaller_than_subspaces() -> None:
    from avseg.config_validation import validate_config

    cfg = compose_train(["model.decomposition.codebook_size=2"])
    with pytest.raises(ConfigError, match=r"model.decomposition.codebook_size=2: must be >= num_subspaces \(4\)"):
        validate_config(cfg)
    cfg = compose_train(["experiment=synth_avss", "data=synth_ms3"])
    with pytest.raises(ConfigError, match="expects data.subset=avss"):
        validate_config(cfg)


def test_wandb_offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from avseg.lit.runtime import wandb_credentials_available

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials_available()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials_available()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_credentials_available()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_credentials_available()


def test_bad_config_value_is_config_error_not_crash() -> None:
    cfg = compose_train(["model.scheduler.type=cosine"])
    import hydra.utils
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(_tiny(OmegaConf.to_container(cfg.model, resolve=True)))
    from avseg.cli import avseg_cause

    cause = avseg_cause(info.value)
    assert isinstance(cause, ConfigError)
    assert str(cause) == "model.scheduler.type='cosine': allowed values are step | none"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_top_level_config_composes(name: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[], return_hydra_config=True)
    assert cfg.task_name and "hydra" in cfg and "paths" in cfg
    # mandatory values (ckpt_path=???, input=???) are the only unset ones
    missing = [key for key in cfg if key != "hydra" and OmegaConf.is_missing(cfg, key)]
    assert set(missing) <= {"ckpt_path", "input"}
