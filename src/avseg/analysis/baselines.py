"""``python -m avseg.analysis data-baselines``: what a binary SynthAVS split allows without a model:
the M_J / M_F of every visible object (the best an audio-blind model can do) and of an ideal
listener with clean, muted and swapped audio (what mute / swap can cost at most)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avseg.analysis.common import (
    SIDECAR_NAME,
    analysis_dataset,
    choose_data_config,
    compose_eval,
    fmt,
    load_synth_sources,
    markdown_table,
    synth_plans,
    write_bytes_atomic,
    write_json,
)
from avseg.errors import ConfigError

__all__ = ["data_baselines", "run_data_baselines"]

log = logging.getLogger(__name__)


def data_baselines(
    dataset: Any, sidecar: Mapping[str, Any], *, seed: int = 0, frames_per_batch: int = 20
) -> list[dict[str, Any]]:
    """M_J / M_F of rule-based predictors on a binary SynthAVS split (scored by the project's
    metric at the dataset's image size, clip index * T + t as frame index):

    - ``all visible objects``: every object pixel, sounding or not (the best a model that ignores the
      audio can do when every class sounds equally often);
    - ``ideal listener, clean``: the objects whose class sounds in that second (the ground truth);
    - ``ideal listener, mute``: nothing (silence names no class);
    - ``ideal listener, swap``: the objects whose class sounds in that second of the partner clip
      whose audio `avseg.eval` swaps in (same seeded derangement as ``perturb=swap``).
    """
    import torch.nn.functional as F

    from avseg.data.perturb import clip_signature, derangement
    from avseg.metrics import BinaryAVSMetric

    if getattr(dataset, "semantic", False) or getattr(dataset, "subset", None) not in ("s4", "ms3"):
        raise ConfigError("data-baselines works on binary SynthAVS trees (s4 / ms3)")
    where = Path(dataset.root) / SIDECAR_NAME
    video_ids = [str(v) for v in dataset.video_ids]
    split = str(dataset.split)
    plans = synth_plans(sidecar, dataset.subset, split, video_ids, where)
    partner = derangement([clip_signature(dataset, i) for i in range(len(dataset))], seed=seed, names=video_ids)
    size = int(dataset.image_size)

    def resized(mask: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
        return F.interpolate(tensor, size=(size, size), mode="nearest")[0, 0] > 0.5

    predictors = ("all visible objects", "ideal listener, clean", "ideal listener, mute", "ideal listener, swap")
    metrics = {name: BinaryAVSMetric(frames_per_batch=frames_per_batch) for name in predictors}
    for index, plan in enumerate(plans):
        other = plans[partner[index]]
        truth, masks = [], {name: [] for name in predictors}
        for t in range(plan.num_frames):
            truth.append(resized(plan.sounding_mask(t)))
            masks["all visible objects"].append(resized(plan.instances[t] > 0))
            masks["ideal listener, clean"].append(truth[-1])
            masks["ideal listener, mute"].append(torch.zeros(size, size, dtype=torch.bool))
            heard = {other.classes[j].name for j in np.flatnonzero(other.sounding[:, t])}
            ids = [j + 1 for j, spec in enumerate(plan.classes) if spec.name in heard]
            masks["ideal listener, swap"].append(resized(np.isin(plan.instances[t], ids)))
        target = torch.stack(truth).long()
        frame_index = index * plan.num_frames + torch.arange(plan.num_frames)
        for name in predictors:
            logits = torch.stack(masks[name]).float() * 20.0 - 10.0
            metrics[name].update(logits, target, frame_index)
    rows = []
    for name in predictors:
        values = metrics[name].compute()
        rows.append({"predictor": name, "miou": float(values["miou"]), "fscore": float(values["fscore"])})
    return rows


def run_data_baselines(words_ckpt: str | None, overrides: Sequence[str], *, output_dir: Path) -> dict[str, Any]:
    """`data_baselines` on the evaluation split of a checkpoint's data (or of the data overrides);
    writes ``data_baselines.md`` / ``.json``."""
    cfg = compose_eval([f"ckpt_path={words_ckpt}" if words_ckpt else "ckpt_path=none", *overrides])
    data_source = (
        choose_data_config(cfg, overrides)
        if words_ckpt
        else ("command line" if overrides else "conf/eval.yaml default")
    )
    split = str(cfg.split)
    datamodule, dataset = analysis_dataset(cfg, split)
    sidecar = load_synth_sources(dataset.root)
    batch_size = int(cfg.batch_size) if cfg.get("batch_size") is not None else int(datamodule.eval_batch_size)
    frames_per_batch = batch_size * int(datamodule.num_frames)
    rows = data_baselines(dataset, sidecar, seed=int(cfg.perturb_seed), frames_per_batch=frames_per_batch)
    table = markdown_table(
        ("predictor", "M_J (mIoU)", "M_F (F-score)"), [(r["predictor"], fmt(r["miou"]), fmt(r["fscore"])) for r in rows]
    )
    text = (
        f"Rule-based baselines on {datamodule.subset} {split} ({len(dataset)} clips, {dataset.root}; "
        f"F-score batch {frames_per_batch} frames; swap seed {int(cfg.perturb_seed)})\n\n{table}\n"
    )
    payload = {
        "rows": rows,
        "data_subset": datamodule.subset,
        "split": split,
        "num_clips": len(dataset),
        "root": str(dataset.root),
        "data_config": data_source,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output_dir / "data_baselines.md", text.encode())
    write_json(output_dir / "data_baselines.json", payload)
    log.info(text + f"\noutputs: {output_dir}")
    return payload
