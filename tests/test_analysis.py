"""avseg.analysis: the information measures against hand-computed values, the pure table / summary
helpers, the code collection on untrained in-process models (pq_split, vq, none), and every command
on tiny checkpoints made once per module by a very short multirun of ``python -m avseg.train``."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import REPO, TINY_MODEL, compose_train, run_train, synth_tree
from test_eval_predict import TRAIN_OVERRIDES

from avseg.analysis import (
    ClipCodes,
    audio_token_spread,
    average_curves,
    chance_nmi,
    collect_clip_codes,
    contingency_table,
    data_baselines,
    decomposition_tables,
    entropy,
    format_reliance_table,
    load_synth_sources,
    main,
    mutual_information,
    noise_table_markdown,
    normalized_mutual_information,
    parse_snr_list,
    pixel_selectivity,
    purity,
    reliance_rows,
    reliance_verdict,
    source_label,
    split_overrides,
    subspace_agreement,
    summarise_sweeps,
)
from avseg.errors import ConfigError, DataError

LN = math.log

# ---------------------------------------------------------------------------------------------
# information measures, by hand


def test_contingency_and_entropy():
    table = contingency_table([0, 0, 0, 1], ["a", "a", "b", "b"])
    assert table.tolist() == [[2, 1], [0, 1]]
    assert entropy(np.array([2, 2])) == pytest.approx(LN(2))
    assert entropy(np.array([3, 0, 1])) == pytest.approx(-(0.75 * LN(0.75) + 0.25 * LN(0.25)))
    assert entropy(np.array([5])) == 0.0
    with pytest.raises(ValueError):
        entropy(np.array([0, 0]))
    with pytest.raises(ValueError):
        contingency_table([0, 1], ["a"])


def test_nmi_hand_computed():
    # codes 0,0,0,1 against labels a,a,b,b:
    # I = 1/2 ln((1/2)/(3/4*1/2)) + 1/4 ln((1/4)/(3/4*1/2)) + 1/4 ln((1/4)/(1/4*1/2))
    mi = 0.5 * LN(4 / 3) + 0.25 * LN(2 / 3) + 0.25 * LN(2)
    h_codes = -(0.75 * LN(0.75) + 0.25 * LN(0.25))
    h_labels = LN(2)
    expected = mi / ((h_codes + h_labels) / 2)
    assert mutual_information(contingency_table([0, 0, 0, 1], ["a", "a", "b", "b"])) == pytest.approx(mi)
    assert normalized_mutual_information([0, 0, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.34372, abs=1e-5)
    # symmetric, and blind to renaming codes or labels
    assert normalized_mutual_information(["a", "a", "b", "b"], [0, 0, 0, 1]) == pytest.approx(expected)
    assert normalized_mutual_information([7, 7, 7, 3], ["x", "x", "y", "y"]) == pytest.approx(expected)


def test_nmi_extremes():
    assert normalized_mutual_information([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert normalized_mutual_information([5, 5, 9, 9], ["b", "b", "a", "a"]) == pytest.approx(1.0)
    assert normalized_mutual_information([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0, abs=1e-12)
    # one code for everything explains nothing; two single-value partitions are identical
    assert normalized_mutual_information([3, 3, 3, 3], ["a", "b", "a", "b"]) == 0.0
    assert normalized_mutual_information([3, 3], ["a", "a"]) == 1.0
    # a finer partition of the labels: I = H(labels) = ln 2, H(codes) = ln 4 -> 2 ln2 / (ln4 + ln2) = 2/3
    assert normalized_mutual_information([0, 1, 2, 3], ["a", "a", "b", "b"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        normalized_mutual_information([], [])


def test_purity_hand_computed():
    assert purity([0, 0, 0, 1, 1], [{"a"}, {"a"}, {"b"}, {"b"}, {"b"}]) == pytest.approx(4 / 5)
    assert purity([0, 1, 2], [{"a"}, {"a"}, {"a"}]) == 1.0
    # several sources sounding: the code's class only needs to be among them
    assert purity([0, 0, 0], [{"a", "b"}, {"a"}, {"b"}]) == pytest.approx(2 / 3)
    assert purity([0, 0, 1, 1], [{"a", "b"}, {"a"}, {"b", "c"}, {"c"}]) == 1.0
    with pytest.raises(ValueError):
        purity([], [])


def test_chance_nmi_is_below_a_real_alignment():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200).tolist()
    codes = [10 + label for label in labels]  # a perfect code
    assert normalized_mutual_information(codes, labels) == pytest.approx(1.0)
    chance = chance_nmi(codes, labels, permutations=20, seed=1)
    assert 0.0 <= chance < 0.1
    assert chance == chance_nmi(codes, labels, permutations=20, seed=1)  # seeded


def test_source_label_and_snr_list_and_override_split():
    assert source_label(["hen", "goose", "hen"]) == "goose+hen"
    assert source_label([]) == "(silence)"
    assert parse_snr_list("clean,20,10,5,0,-5") == [None, 20.0, 10.0, 5.0, 0.0, -5.0]
    assert parse_snr_list("[-2.5]") == [-2.5]
    for bad in ("loud", "", "10,10", "nan"):
        with pytest.raises(ConfigError):
            parse_snr_list(bad)
    assert split_overrides("a=1 b={x: 1, y: 2} c='p q' d=[1, 2]") == ["a=1", "b={x: 1, y: 2}", "c='p q'", "d=[1, 2]"]


# ---------------------------------------------------------------------------------------------
# pure table helpers


def test_decomposition_tables_perfect_and_shuffled_codes():
    # K = 2: sub-space 1 names the first sounding class, sub-space 2 is constant
    classes = ["a", "b", "c"]
    clips = []
    for i in range(6):
        sounding = [frozenset({classes[(i + t) % 3]}) for t in range(4)]
        local = np.array([[classes.index(next(iter(s))), 0] for s in sounding])
        clips.append(
            ClipCodes(video_id=f"v{i}", global_indices=np.array([i % 3, 0]), local_indices=local, sounding=sounding)
        )
    tables = decomposition_tables(clips, permutations=10)
    rows = {r["subspace"]: r for r in tables["second"]}
    assert set(rows) == {"1", "2", "pooled", "joint"}
    assert rows["1"]["nmi"] == pytest.approx(1.0) and rows["1"]["purity"] == 1.0 and rows["1"]["codes_used"] == 3
    assert rows["1"]["nmi_single"] == pytest.approx(1.0) and rows["1"]["single_samples"] == 24
    assert rows["2"]["nmi"] == 0.0 and rows["2"]["codes_used"] == 1 and rows["2"]["purity"] == pytest.approx(1 / 3)
    assert rows["pooled"]["samples"] == 48 and rows["joint"]["nmi"] == pytest.approx(1.0)
    assert rows["1"]["nmi_chance"] < 0.5
    # per clip: every clip hears all three classes over its four seconds -> one label value, no NMI
    clip_rows = {r["subspace"]: r for r in tables["clip"]}
    assert clip_rows["1"]["samples"] == 6 and math.isnan(clip_rows["1"]["nmi"]) and clip_rows["1"]["purity"] == 1.0


def _result(miou: float, fscore: float) -> dict:
    return {"test/miou": miou, "test/fscore": fscore, "test/fscore_global": fscore}


def test_reliance_rows_and_verdict():
    rows = reliance_rows({"none": _result(0.6, 0.7), "mute": _result(0.15, 0.35), "swap": _result(0.3, 0.6)})
    by = {r["perturb"]: r for r in rows}
    assert by["mute"]["miou_drop"] == pytest.approx(0.75) and by["swap"]["miou_drop"] == pytest.approx(0.5)
    assert by["swap"]["fscore_drop"] == pytest.approx(1 / 7)
    assert reliance_verdict(rows, 0.5)[0] is True
    ok, reason = reliance_verdict(rows, 0.6)
    assert ok is False and "swap" in reason and "mute" not in reason
    table = format_reliance_table(rows)
    assert "| mute | 0.1500 | 0.3500 | 75.0% | 50.0% |" in table
    # clean M_J of 0: no relative drop, never a pass
    zero = reliance_rows({"none": _result(0.0, 0.2), "mute": _result(0.0, 0.2), "swap": _result(0.0, 0.2)})
    assert reliance_verdict(zero, 0.0)[0] is False


def _write_summary(sweep: Path, rows: list[dict]) -> None:
    sweep.mkdir(parents=True)
    header = ["job", "status", "overrides", "test/fscore", "test/miou", "error"]
    with open(sweep / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def test_summarise_sweeps_groups_by_overrides_minus_seed(tmp_path):
    common = "experiment=ablation_synth_ms3 data.synth.clips_per_split={train:4,val:2,test:4}"
    _write_summary(
        tmp_path / "a",
        [
            {
                "job": 0,
                "status": "ok",
                "overrides": f"{common} model/decomposition=pq seed=0",
                "test/miou": "0.5",
                "test/fscore": "0.6",
            },
            {
                "job": 1,
                "status": "ok",
                "overrides": f"{common} model/decomposition=pq seed=1",
                "test/miou": "0.7",
                "test/fscore": "0.8",
            },
            {
                "job": 2,
                "status": "ok",
                "overrides": f"{common} model/decomposition=none seed=0",
                "test/miou": "0.2",
                "test/fscore": "0.3",
            },
            {"job": 3, "status": "failed", "overrides": f"{common} model/decomposition=none seed=1", "error": "boom"},
        ],
    )
    _write_summary(
        tmp_path / "b",
        [
            {
                "job": 0,
                "status": "ok",
                "overrides": f"{common} model.decomposition.num_subspaces=8 seed=2",
                "test/miou": "0.4",
                "test/fscore": "0.5",
            }
        ],
    )
    summary = summarise_sweeps([tmp_path / "a", tmp_path / "b"])
    assert summary["common"] == common.split()
    rows = {r["overrides"]: r for r in summary["rows"]}
    assert list(rows) == ["model/decomposition=pq", "model/decomposition=none", "model.decomposition.num_subspaces=8"]
    mean, std, n = rows["model/decomposition=pq"]["test/miou"]
    assert (mean, n) == (pytest.approx(0.6), 2) and std == pytest.approx(math.sqrt(0.02))  # sample std
    assert rows["model/decomposition=pq"]["seeds"] == ["0", "1"]
    none = rows["model/decomposition=none"]
    assert (
        none["runs"] == 2
        and none["failed"] == 1
        and none["test/miou"][0] == pytest.approx(0.2)
        and math.isnan(none["test/miou"][1])
    )
    with pytest.raises(DataError, match="no summary.csv"):
        summarise_sweeps([tmp_path / "missing"])

    out = tmp_path / "report" / "ablation.md"
    assert main(["ablation-summary", f"sweep_dirs=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"out={out}"]) == 0
    text = out.read_text()
    assert "| `model/decomposition=pq` | 0,1 | 2 / 2 | 0.6000 ± 0.1414 | 0.7000 ± 0.1414 |" in text
    assert "| `model/decomposition=none` | 0,1 | 1 / 2 | 0.2000 ± n/a | 0.3000 ± n/a |" in text
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("overrides,seeds,runs,failed,test/miou_mean")


def test_summarise_sweeps_adds_measured_job_metrics(tmp_path):
    """``job_metrics`` values join the grouping (here a stand-in for the reliance drops), computed
    for ok jobs only, from the job's own directory; a missing job directory is a DataError."""
    _write_summary(
        tmp_path / "s",
        [
            {
                "job": 0,
                "status": "ok",
                "overrides": "model/decomposition=pq seed=0",
                "test/miou": "0.5",
                "test/fscore": "0.6",
            },
            {
                "job": 1,
                "status": "ok",
                "overrides": "model/decomposition=pq seed=1",
                "test/miou": "0.7",
                "test/fscore": "0.8",
            },
            {"job": 2, "status": "failed", "overrides": "model/decomposition=pq seed=2", "error": "boom"},
        ],
    )
    for job in ("0", "1"):
        (tmp_path / "s" / job).mkdir()
        (tmp_path / "s" / job / "drop.txt").write_text({"0": "0.25", "1": "0.75"}[job])
    seen = []

    def measured(job_dir, record):
        seen.append(job_dir.name)
        return {"reliance/swap_drop": float((job_dir / "drop.txt").read_text())}

    summary = summarise_sweeps([tmp_path / "s"], metrics=["test/miou", "reliance/swap_drop"], job_metrics=measured)
    (row,) = summary["rows"]
    assert seen == ["0", "1"] and row["failed"] == 1
    assert row["reliance/swap_drop"][0] == pytest.approx(0.5) and row["reliance/swap_drop"][2] == 2
    (tmp_path / "s" / "1" / "drop.txt").unlink()
    (tmp_path / "s" / "1").rmdir()
    with pytest.raises(DataError, match="no job directory"):
        summarise_sweeps([tmp_path / "s"], metrics=["reliance/swap_drop"], job_metrics=measured)


def test_subspace_agreement():
    """Share of equal-code sub-space pairs: hand-computed on 2 samples of K = 3 (3 pairs each)."""
    indices = np.array([[5, 5, 5], [1, 2, 1]])  # 3/3 pairs agree, then 1/3
    assert subspace_agreement(indices) == pytest.approx((3 + 1) / 6)
    assert subspace_agreement(np.array([[0, 1, 2, 3]])) == 0.0
    assert math.isnan(subspace_agreement(np.array([[4], [2]])))
    with pytest.raises(ValueError, match="samples, K"):
        subspace_agreement(np.array([1, 2, 3]))


def test_average_curves_and_their_table():
    """Checkpoints sharing a label average into one curve (mean, sample std, n), in first-seen order."""

    def curve(j: float, f: float) -> dict:
        return {"clean": {"miou": j, "fscore": f}, "0": {"miou": j / 2, "fscore": f / 2}}

    averaged = average_curves([curve(0.4, 0.6), curve(0.2, 0.4), curve(0.5, 0.5)], ["pq", "pq", "none"])
    assert list(averaged) == ["pq", "none"]
    assert averaged["pq"]["clean"]["miou"] == pytest.approx(0.3) and averaged["pq"]["clean"]["n"] == 2
    assert averaged["pq"]["0"]["fscore_std"] == pytest.approx(np.std([0.3, 0.2], ddof=1))
    assert math.isnan(averaged["none"]["clean"]["miou_std"])
    table = noise_table_markdown(averaged, [None, 0.0])
    assert "| pq | M_J | 0.3000 ± 0.1414 | 0.1500 ± 0.0707 |" in table


def test_ablation_experiment_is_the_demo_shortened():
    """conf/experiment/ablation_synth_ms3.yaml differs from the default demo only in length, LR step,
    logging, the task name, the demo's audio-reliance switches (off: the sweep compares the paper's
    model) and the tested checkpoint (best, as when the sweep ran), so an ablation row differs from
    that model by the factor it names."""
    from omegaconf import OmegaConf

    from avseg.train import validate_config

    def flat(cfg, prefix=""):
        out = {}
        for key, value in cfg.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    demo = compose_train(["experiment=synth_ms3"])
    ablation = compose_train(["experiment=ablation_synth_ms3", "model/decomposition=vq"])
    validate_config(ablation)
    plain = {
        name: flat(OmegaConf.to_container(cfg, resolve=False)) for name, cfg in (("demo", demo), ("ablation", ablation))
    }
    for name in plain:
        plain[name] = {k: v for k, v in plain[name].items() if not k.startswith(("hydra.", "logger."))}
    differing = {
        k for k in set(plain["demo"]) | set(plain["ablation"]) if plain["demo"].get(k) != plain["ablation"].get(k)
    }
    allowed = (
        "task_name",
        "trainer.max_epochs",
        "model.scheduler.milestones",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "callbacks.mask_overlays",
        "model.decomposition.",  # the factor of this row
        "model.fusion.audio_similarity_dim",
        "model.fusion.similarity_to_masks",
        "model.loss.weight_similarity",
        "test_ckpt",
    )
    assert [k for k in differing if not k.startswith(allowed)] == []
    assert {"task_name", "trainer.max_epochs", "model.scheduler.milestones", "model.decomposition.variant"} <= differing
    assert ablation.trainer.max_epochs == demo.trainer.max_epochs // 2 and ablation.model.decomposition.variant == "vq"
    assert list(ablation.logger) == ["csv"] and ablation.data == demo.data
    fusion, loss = ablation.model.fusion, ablation.model.loss
    assert (fusion.audio_similarity_dim, fusion.similarity_to_masks, loss.weight_similarity) == (0, False, 0.0)
    assert ablation.test_ckpt == "best" and demo.test_ckpt == "last"
    assert demo.model.fusion.similarity_to_masks and demo.model.loss.weight_similarity > 0


def test_cli_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert main(["reliance", "split=test", f"out={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ckpt_path is required")
    assert main(["noise", "ckpt_paths=[x.ckpt]", "snrs=[loud]", f"out={tmp_path}"]) == 1
    assert "neither 'clean' nor a number" in capsys.readouterr().err
    assert main(["reliance", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'r'}"]) == 1
    assert "missing.ckpt" in capsys.readouterr().err
    assert main(["ablation-summary", f"sweep_dirs=[{tmp_path / 'nowhere'}]"]) == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["unknown-command"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------------------------
# code collection on untrained in-process models (fast)


@pytest.fixture(scope="module")
def ms3_tree():
    return synth_tree(Path(os.environ["AVSEG_CACHE"]), "ms3", image_size=48, clips=3)


def _untrained(variant: str):
    import hydra

    cfg = compose_train(["experiment=synth_ms3", *TINY_MODEL, f"model/decomposition={variant}"])
    torch.manual_seed(0)
    return hydra.utils.instantiate(cfg.model).eval()


@pytest.mark.parametrize("variant,k", [("pq_split", 4), ("vq", 1), ("pq", 4)])
def test_collect_clip_codes_pairs_codes_with_sources(ms3_tree, variant, k):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(ms3_tree, "test", image_size=48)
    sidecar = load_synth_sources(ms3_tree)
    clips = collect_clip_codes(_untrained(variant).net, dataset, sidecar, batch_size=2)
    assert [c.video_id for c in clips] == dataset.video_ids
    for clip in clips:
        assert clip.global_indices.shape == (k,) and clip.local_indices.shape == (5, k)
        assert (clip.local_indices >= 0).all() and (clip.local_indices < 16).all()
        truth = sidecar["clips"][clip.video_id]["sounding"]
        assert [sorted(s) for s in clip.sounding] == [sorted(x["class"] for x in second) for second in truth]
    tables = decomposition_tables(clips, permutations=5)
    assert len(tables["second"]) == (1 if k == 1 else k + 2)
    for row in tables["second"]:
        assert 0 <= row["purity"] <= 1 and row["samples"] in (15, 15 * k)


def test_collect_clip_codes_puts_none_features_through_kmeans(ms3_tree):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(ms3_tree, "test", image_size=48)
    clips = collect_clip_codes(
        _untrained("none").net, dataset, load_synth_sources(ms3_tree), batch_size=2, kmeans_size=6
    )
    assert [c.video_id for c in clips] == dataset.video_ids
    local = np.concatenate([c.local_indices for c in clips])
    assert local.shape == (15, 4) and local.min() >= 0 and local.max() < 6
    assert all(c.global_indices.shape == (4,) and (c.global_indices < 6).all() for c in clips)


def test_collect_clip_codes_refuses_none_and_trees_without_sidecar(ms3_tree, tmp_path):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(ms3_tree, "test", image_size=48)
    with pytest.raises(ConfigError, match="not applicable"):
        collect_clip_codes(_untrained("none").net, dataset, load_synth_sources(ms3_tree))
    with pytest.raises(DataError, match="no SynthAVS sidecar"):
        load_synth_sources(tmp_path)
    (tmp_path / "synth_sources.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable sidecar"):
        load_synth_sources(tmp_path)


def test_audio_token_spread_formula():
    """Tokens = position code + per-second content: the spread ignores the position code and
    measures the content's variance against its mean squared norm."""
    from torch import nn

    from avseg.models.layers.position import sine_position_1d

    content = torch.tensor([[3.0, 4.0], [3.0, 4.0], [3.0, 4.0], [5.0, 4.0]])  # 4 seconds, C = 2

    class Encoder(nn.Module):
        def embed(self, audio, frame_valid=None):
            return audio * 10.0

        def forward(self, audio, frame_valid=None):
            return audio + sine_position_1d(audio.shape[1], audio.shape[2])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_encoder = Encoder()

    dataset = [
        {
            "audio": content[:2],
            "frame_valid": torch.tensor([True, True]),
            "frames": torch.zeros(2, 3, 4, 4),
            "masks": torch.zeros(2, 4, 4, dtype=torch.long),
            "label_valid": torch.ones(2, dtype=torch.bool),
            "video_id": "a",
            "index": 0,
        },
        {
            "audio": content[2:],
            "frame_valid": torch.tensor([True, True]),
            "frames": torch.zeros(2, 3, 4, 4),
            "masks": torch.zeros(2, 4, 4, dtype=torch.long),
            "label_valid": torch.ones(2, dtype=torch.bool),
            "video_id": "b",
            "index": 1,
        },
    ]
    spread = audio_token_spread(Net(), dataset, batch_size=2)
    # variance over seconds: dim 0 values 3,3,3,5 -> 0.75; dim 1 constant; mean squared norm (25*3 + 41) / 4 = 29
    assert spread["token_spread"] == pytest.approx(math.sqrt(0.75 / 29))
    assert spread["embedding_spread"] == pytest.approx(math.sqrt(0.75 / 29))  # scale-free


def test_data_baselines_on_a_tiny_tree(ms3_tree, tmp_path, capsys):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(ms3_tree, "test", image_size=48)
    rows = {r["predictor"]: r for r in data_baselines(dataset, load_synth_sources(ms3_tree), frames_per_batch=10)}
    assert rows["ideal listener, clean"]["miou"] == pytest.approx(1.0, abs=1e-6)
    assert rows["ideal listener, clean"]["fscore"] == pytest.approx(1.0, abs=1e-3)
    assert rows["ideal listener, mute"]["miou"] == 0.0
    # every sounding object is visible, plus the silent ones: IoU below 1 unless no clip has a distractor
    assert 0.0 < rows["all visible objects"]["miou"] <= 1.0
    assert 0.0 <= rows["ideal listener, swap"]["miou"] < 1.0
    # the same from the command line, with the tree named by data overrides
    overrides = [
        "data.synth.image_size=48",
        "data.synth.clips_per_split={train: 3, val: 3, test: 3}",
        "data.eval_batch_size=2",
    ]
    assert main(["data-baselines", *overrides, f"out={tmp_path}"]) == 0
    stored = {r["predictor"]: r for r in json.loads((tmp_path / "data_baselines.json").read_text())["rows"]}
    assert stored["all visible objects"]["miou"] == pytest.approx(rows["all visible objects"]["miou"])
    assert "| ideal listener, swap |" in capsys.readouterr().out


def test_pixel_selectivity_with_rule_predictors(ms3_tree):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(ms3_tree, "test", image_size=48)
    sidecar = load_synth_sources(ms3_tree)

    def run(predict):
        return {r["perturb"]: r for r in pixel_selectivity(predict, dataset, sidecar, batch_size=2)}

    # the clip's own ground truth, whatever the audio: a model that does not listen at all
    truth = run(lambda batch: batch["masks"] > 0)
    assert (truth["none"]["heard objects"], truth["none"]["unheard objects"], truth["none"]["background"]) == (
        1.0,
        0.0,
        0.0,
    )
    assert truth["mute"]["heard objects"] is None and truth["mute"]["pixels"]["heard objects"] == 0
    assert 0.0 < truth["mute"]["unheard objects"] < 1.0  # the sounding share of all object pixels
    everything = run(lambda batch: torch.ones_like(batch["masks"], dtype=torch.bool))
    nothing = run(lambda batch: torch.zeros_like(batch["masks"], dtype=torch.bool))
    pixels = len(dataset) * 5 * 48 * 48
    for perturb in ("none", "mute", "swap"):
        assert sum(everything[perturb]["pixels"].values()) == pixels
        objects = everything[perturb]["pixels"]["heard objects"] + everything[perturb]["pixels"]["unheard objects"]
        assert (
            objects == everything["none"]["pixels"]["heard objects"] + everything["none"]["pixels"]["unheard objects"]
        )
        assert all(
            v in (None, 1.0)
            for k, v in everything[perturb].items()
            if k in ("heard objects", "unheard objects", "background")
        )
        assert all(
            v in (None, 0.0)
            for k, v in nothing[perturb].items()
            if k in ("heard objects", "unheard objects", "background")
        )


# ---------------------------------------------------------------------------------------------
# every command on tiny checkpoints (one multirun: pq and none, two seeds each)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_sweep")
    sweep_dir = root / "sweep"
    run_train(
        ["-m", *TRAIN_OVERRIDES, "model/decomposition=pq,none", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
        cache_dir=Path(os.environ["AVSEG_CACHE"]),
        timeout=900,
    )
    jobs = {}
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        overrides = json.loads((job_dir / "job_status.json").read_text())["overrides"]
        variant = "pq" if "model/decomposition=pq" in overrides else "none"
        seed = overrides.rsplit("seed=", 1)[1].split()[0]
        jobs[(variant, seed)] = {
            "ckpt": job_dir / "checkpoints" / "best.ckpt",
            "metrics": json.loads((job_dir / "metrics.json").read_text()),
        }
    assert len(jobs) == 4
    return {"dir": sweep_dir, "jobs": jobs}


@pytest.mark.slow
def test_reliance_command(sweep, tmp_path):
    job = sweep["jobs"][("pq", "0")]
    out = tmp_path / "reliance"
    code = main(["reliance", f"ckpt_path={job['ckpt']}", "require_drop=0.5", f"out={out}"])
    payload = json.loads((out / "reliance.json").read_text())
    rows = {r["perturb"]: r for r in payload["rows"]}
    assert list(rows) == ["none", "mute", "swap"]
    # the clean row is the training run's own test: the same batches through the same predictor
    # (avseg.inference) with the same thread count (conftest), so the same numbers
    assert rows["none"]["miou"] == pytest.approx(job["metrics"]["test/miou"], abs=1e-6)
    assert rows["none"]["fscore"] == pytest.approx(job["metrics"]["test/fscore"], abs=1e-6)
    for perturb in ("mute", "swap"):
        stored = json.loads((out / perturb / "metrics.json").read_text())
        assert stored["perturb"] == perturb and stored["test/miou"] == pytest.approx(rows[perturb]["miou"])
    clean = rows["none"]["miou"]
    passed = clean > 0 and all((clean - rows[p]["miou"]) / clean >= 0.5 for p in ("mute", "swap"))
    assert payload["passed"] is passed and code == (0 if passed else 3)
    assert ("PASS" if passed else "FAIL") in (out / "reliance.md").read_text()
    assert 0.0 <= payload["token_spread"] < 2.0 and 0.0 <= payload["embedding_spread"] < 2.0
    assert "audio tokens F_a (position code removed) vary across seconds by" in (out / "reliance.md").read_text()


@pytest.mark.slow
def test_selectivity_command(sweep, tmp_path, capsys):
    job = sweep["jobs"][("pq", "0")]
    out = tmp_path / "selectivity"
    assert main(["selectivity", f"ckpt_path={job['ckpt']}", f"out={out}"]) == 0
    rows = {r["perturb"]: r for r in json.loads((out / "selectivity.json").read_text())["rows"]}
    assert list(rows) == ["none", "mute", "swap"]
    for row in rows.values():
        for kind in ("unheard objects", "background"):
            assert 0.0 <= row[kind] <= 1.0
    assert rows["mute"]["heard objects"] is None
    assert "| swap |" in capsys.readouterr().out and (out / "selectivity.md").is_file()


@pytest.mark.slow
def test_reliance_from_the_command_line(sweep, tmp_path):
    job = sweep["jobs"][("pq", "1")]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "avseg.analysis",
            "reliance",
            f"ckpt_path={job['ckpt']}",
            "require_drop=1.0",
            f"out={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    payload = json.loads((tmp_path / "reliance.json").read_text())
    rows = {r["perturb"]: r for r in payload["rows"]}
    # a drop of 100% needs M_J exactly 0 under both perturbations and a non-zero clean M_J
    passed = rows["none"]["miou"] > 0 and rows["mute"]["miou"] == 0 and rows["swap"]["miou"] == 0
    assert result.returncode == (0 if passed else 3), result.stderr[-2000:]
    assert "| perturb | M_J (mIoU) | M_F (F-score) | M_J drop | M_F drop |" in result.stdout
    assert "require-drop 1: " + ("PASS" if passed else "FAIL") in result.stdout


@pytest.mark.slow
def test_noise_command(sweep, tmp_path):
    pq, none = sweep["jobs"][("pq", "0")], sweep["jobs"][("none", "0")]
    assert main(["noise", f"ckpt_paths=[{pq['ckpt']},{none['ckpt']}]", "snrs=[clean,0,-5]", f"out={tmp_path}"]) == 0
    payload = json.loads((tmp_path / "noise_robustness.json").read_text())
    assert payload["snr_db"] == ["clean", "0", "-5"] and payload["labels"] == ["pq", "none"]
    for label, job in (("pq", pq), ("none", none)):
        clean = payload["curves"][label]["clean"]
        assert clean["miou"] == pytest.approx(job["metrics"]["test/miou"], abs=1e-6)
        for snr in ("0", "-5"):
            point = payload["curves"][label][snr]
            assert 0 <= point["miou"] <= 1 and 0 <= point["fscore"] <= 1
    noisy = json.loads((tmp_path / "noise_robustness_runs" / "0" / "-5" / "metrics.json").read_text())
    assert noisy["perturb"] == "noise" and noisy["perturb_snr_db"] == -5.0
    table = (tmp_path / "noise_robustness.md").read_text()
    assert "| model | metric | clean | 0 dB | -5 dB |" in table and "| none | M_J |" in table
    png = (tmp_path / "noise_robustness.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # two seeds per variant, averaged: one curve per variant, mean ± std of the per-seed curves
    ckpts = ",".join(str(sweep["jobs"][(v, seed)]["ckpt"]) for v in ("pq", "none") for seed in ("0", "1"))
    out = tmp_path / "averaged"
    assert main(["noise", f"ckpt_paths=[{ckpts}]", "snrs=[clean,-5]", "average=true", f"out={out}"]) == 0
    averaged = json.loads((out / "noise_robustness.json").read_text())
    assert averaged["average"] is True and set(averaged["curves"]) == {"pq", "none"}
    for variant in ("pq", "none"):
        values = [sweep["jobs"][(variant, seed)]["metrics"]["test/miou"] for seed in ("0", "1")]
        clean = averaged["curves"][variant]["clean"]
        assert clean["n"] == 2 and clean["miou"] == pytest.approx(np.mean(values), abs=1e-6)
    assert " ± " in (out / "noise_robustness.md").read_text()


@pytest.mark.slow
def test_decomposition_command(sweep, tmp_path, capsys):
    pq = sweep["jobs"][("pq", "0")]
    assert main(["decomposition", f"ckpt_path={pq['ckpt']}", "permutations=5", f"out={tmp_path / 'pq'}"]) == 0
    payload = json.loads((tmp_path / "pq" / "decomposition.json").read_text())
    assert payload["applicable"] is True and payload["variant"] == "pq" and payload["num_subspaces"] == 4
    assert payload["num_clips"] == 4  # every MS3 test clip has several sources
    second = payload["tables"]["second"]
    assert [r["subspace"] for r in second] == ["1", "2", "3", "4", "pooled", "joint"]
    for row in second:
        assert 1 <= row["codes_used"] <= 64 and 0 <= row["purity"] <= 1
        assert row["nmi"] is None or 0 <= row["nmi"] <= 1
    assert second[0]["samples"] == 4 * 5 and second[4]["samples"] == 4 * 4 * 5
    printed = capsys.readouterr().out
    assert "Per second: local codes" in printed and "| sub-space | samples | codes used | NMI |" in printed
    assert "sub-space agreement" in printed and 0 <= payload["subspace_agreement"]["second"] <= 1

    sources = {r["codes"]: r for r in payload["source_sets"]}
    assert list(sources)[0] == "model (pq)" and "oracle: mixture code" in sources
    assert "source-set F1" in printed and sources["oracle: mixture code"]["agreement"] == 1.0
    for row in sources.values():  # 4 clips: too few for known values (held-out maps), ranges only
        assert 0 <= row["f1"] <= 1 and 0 <= row["agreement"] <= 1 and row["seconds"] == 4 * 5

    none = sweep["jobs"][("none", "0")]
    assert main(["decomposition", f"ckpt_path={none['ckpt']}", "permutations=5", f"out={tmp_path / 'none'}"]) == 0
    assert "k-means codebook" in capsys.readouterr().out
    payload = json.loads((tmp_path / "none" / "decomposition.json").read_text())
    assert payload["applicable"] is True and payload["source_sets"][0]["codes"] == "model (none)"


@pytest.mark.slow
def test_ablation_summary_on_a_real_sweep(sweep, tmp_path):
    out = tmp_path / "summary.md"
    assert main(["ablation-summary", f"sweep_dirs=[{sweep['dir']}]", f"out={out}", "reliance=true"]) == 0
    rows = {r[0]: r for r in csv.reader(out.with_suffix(".csv").read_text().splitlines())}
    header = out.with_suffix(".csv").read_text().splitlines()[0].split(",")
    swap_mean = header.index("reliance/swap_drop_mean")
    for variant in ("pq", "none"):
        drops = []
        for seed in ("0", "1"):
            ckpt = sweep["jobs"][(variant, seed)]["ckpt"]
            stored = json.loads((ckpt.parent.parent / "reliance" / "reliance.json").read_text())
            drops.append({r["perturb"]: r for r in stored["rows"]}["swap"]["miou_drop"])
        if all(d is not None for d in drops):  # null: clean M_J of 0, no relative drop
            assert float(rows[f"model/decomposition={variant}"][swap_mean]) == pytest.approx(np.mean(drops), abs=1e-5)
    for variant in ("pq", "none"):
        values = [sweep["jobs"][(variant, seed)]["metrics"]["test/miou"] for seed in ("0", "1")]
        row = rows[f"model/decomposition={variant}"]
        assert row[1] == "0 1" and row[2] == "2" and row[3] == "0"
        assert float(row[4]) == pytest.approx(np.mean(values), abs=1e-5)
        assert float(row[5]) == pytest.approx(np.std(values, ddof=1), abs=1e-5)


@pytest.mark.parametrize("command", sorted(p.stem for p in (REPO / "conf" / "analysis").glob("*.yaml")))
def test_every_analysis_config_composes(command):
    """Each command's config composes with no argument; its keys are the command's own."""
    from avseg.analysis.cli import COMMANDS
    from avseg.cli import compose_command

    assert command in COMMANDS
    cfg = compose_command(f"analysis/{command}", [])
    assert "out" in cfg and "paths" not in cfg and "analysis" not in cfg


def test_cli_arguments_are_hydra_overrides(tmp_path, capsys):
    """Lists in Hydra's grammar; eval keys passed on; an unknown, reserved or malformed key is
    exit status 2 with one line naming it."""
    from avseg.analysis.cli import REQUIRED
    from avseg.cli import Forward, compose_command

    forward = Forward("eval", reserved=("ckpt_path", "perturb"))
    cfg = compose_command(
        "analysis/noise",
        ["ckpt_paths=[a.ckpt,b/c.ckpt]", "snrs=[clean,20,-5]", "split=val", "data.eval_batch_size=2"],
        required=REQUIRED["noise"],
        forward=forward,
    )
    assert list(cfg.ckpt_paths) == ["a.ckpt", "b/c.ckpt"] and parse_snr_list(cfg.snrs) == [None, 20.0, -5.0]
    assert forward.words == ["split=val", "data.eval_batch_size=2"]
    for words, named in (
        (["reliance", "ckpt_path=x.ckpt", "nope=1"], "'nope=1'"),
        (["reliance", "ckpt_path=x.ckpt", "perturb=mute"], "'perturb=mute'"),
        (["noise", "ckpt_path=x.ckpt"], "'ckpt_path=x.ckpt'"),
        (["reliance", "ckpt_path=x.ckpt", "data.nope=1"], "data.nope"),
        (["reliance", "ckpt_path"], "'ckpt_path'"),
        (["ablation-summary", "sweep_dirs=[a]", "split=val"], "'split=val'"),
        ([], "no command"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(words)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and named in err[-1], err
    assert main(["reliance", f"ckpt_path=[{tmp_path}/a,{tmp_path}/b]"]) == 1
    assert "takes one value" in capsys.readouterr().err
    assert main(["reliance", f"ckpt_path={tmp_path}/a", "require_drop=2"]) == 1
    assert "require_drop=2: a fraction in [0, 1]" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "ablation-summary" in capsys.readouterr().out
    assert main(["noise", "--help"]) == 0 and "snrs:" in capsys.readouterr().out
