"""``python -m avseg.analysis selectivity``: where a binary model's foreground goes with the audio
clean, muted and swapped: the share of the pixels of heard objects, unheard objects and the
background that it predicts foreground (through the one predictor, `avseg.inference`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avseg.analysis.common import (
    SIDECAR_NAME,
    compose_eval,
    fmt,
    load_analysis_inputs,
    markdown_table,
    synth_plans,
    write_bytes_atomic,
    write_json,
)
from avseg.errors import ConfigError
from avseg.inference import batch_scores, evaluation_loader, scores_to_labels

__all__ = ["SELECTIVITY_KINDS", "pixel_selectivity", "run_selectivity"]

log = logging.getLogger(__name__)


SELECTIVITY_KINDS = ("heard objects", "unheard objects", "background")


def pixel_selectivity(
    predict: Callable[[Mapping[str, Any]], torch.Tensor],
    dataset: Any,
    sidecar: Mapping[str, Any],
    *,
    seed: int = 0,
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Where a binary model's foreground goes, with the audio clean, muted and swapped, on a
    binary SynthAVS split: for each kind of pixel, the share predicted foreground.

    - ``heard objects``: pixels of the objects whose class sounds in the audio the model is given,
      at that second (its own clip's for ``none``, the partner clip's for ``swap``, none for ``mute``);
    - ``unheard objects``: the other object pixels (silent distractors, and for ``swap`` the clip's
      own sources that the partner's audio does not contain);
    - ``background``.

    A model that listens selects heard over unheard objects by the same margin whatever audio it
    gets; one that segments "whatever usually sounds" keeps its masks when the audio changes.
    ``predict(batch) -> bool [B, T, H, W]`` at the dataset's image size. Partners: the seeded
    derangement of ``perturb=swap``.
    """
    from avseg.data.perturb import PerturbedDataset, clip_signature, derangement

    if getattr(dataset, "semantic", False) or getattr(dataset, "subset", None) not in ("s4", "ms3"):
        raise ConfigError("selectivity works on binary SynthAVS trees (s4 / ms3)")
    where = Path(dataset.root) / SIDECAR_NAME
    video_ids = [str(v) for v in dataset.video_ids]
    plans = synth_plans(sidecar, dataset.subset, str(dataset.split), video_ids, where)
    partner = derangement([clip_signature(dataset, i) for i in range(len(dataset))], seed=seed, names=video_ids)
    size = int(dataset.image_size)
    rows = []
    for perturb in ("none", "mute", "swap"):
        source = dataset if perturb == "none" else PerturbedDataset(dataset, mode=perturb, seed=seed)
        hits = {kind: 0 for kind in SELECTIVITY_KINDS}
        totals = {kind: 0 for kind in SELECTIVITY_KINDS}
        for batch in evaluation_loader(source, batch_size=batch_size):
            foreground = predict(batch).cpu()
            for row, index in enumerate(batch["index"].tolist()):
                plan = plans[index]
                played = plans[partner[index]] if perturb == "swap" else plan
                for t in range(plan.num_frames):
                    instances = torch.from_numpy(plan.instances[t].astype(np.int64))[None, None].float()
                    instances = torch.nn.functional.interpolate(instances, size=(size, size), mode="nearest")[
                        0, 0
                    ].long()
                    heard = (
                        set()
                        if perturb == "mute"
                        else {played.classes[j].name for j in np.flatnonzero(played.sounding[:, t])}
                    )
                    heard_ids = torch.tensor(
                        [j + 1 for j, spec in enumerate(plan.classes) if spec.name in heard], dtype=torch.long
                    )
                    is_heard = torch.isin(instances, heard_ids)
                    kinds = {
                        "heard objects": is_heard,
                        "unheard objects": (instances > 0) & ~is_heard,
                        "background": instances == 0,
                    }
                    predicted = foreground[row, t]
                    for kind, where_kind in kinds.items():
                        hits[kind] += int(predicted[where_kind].sum())
                        totals[kind] += int(where_kind.sum())
        rows.append(
            {
                "perturb": perturb,
                **{kind: (hits[kind] / totals[kind] if totals[kind] else None) for kind in SELECTIVITY_KINDS},
                "pixels": dict(totals),
            }
        )
    return rows


def run_selectivity(ckpt_path: str, overrides: Sequence[str], *, output_dir: Path) -> dict[str, Any]:
    """`pixel_selectivity` of a checkpoint on its SynthAVS evaluation split; writes
    ``selectivity.md`` / ``.json``."""
    inputs = load_analysis_inputs(ckpt_path, overrides)
    assert inputs.sidecar is not None
    if inputs.module.semantic:
        raise ConfigError(f"selectivity works on binary checkpoints; {ckpt_path} is semantic (AVSS)")
    net = inputs.module.net.eval()
    device = inputs.device
    seed = int(compose_eval([f"ckpt_path={ckpt_path}", *overrides]).perturb_seed)

    def predict(batch: Mapping[str, Any]) -> torch.Tensor:
        on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            return scores_to_labels(batch_scores(net, on_device, semantic=False), semantic=False) > 0

    rows = pixel_selectivity(predict, inputs.dataset, inputs.sidecar, seed=seed, batch_size=inputs.batch_size)
    table = markdown_table(
        ("audio", *SELECTIVITY_KINDS),
        [
            (r["perturb"], *(fmt(r[kind], 3) if r[kind] is not None else "n/a" for kind in SELECTIVITY_KINDS))
            for r in rows
        ],
    )
    text = (
        f"Share of each kind of pixel predicted foreground: {ckpt_path} on {inputs.datamodule.subset} {inputs.split} "
        f"({len(inputs.dataset)} clips; swap seed {seed}; heard = the objects whose class sounds in the audio "
        f"given)\n\n{table}\n"
    )
    payload = {
        "ckpt_path": str(ckpt_path),
        "rows": rows,
        "split": inputs.split,
        "num_clips": len(inputs.dataset),
        "data_config": inputs.data_source,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output_dir / "selectivity.md", text.encode())
    write_json(output_dir / "selectivity.json", payload)
    log.info(text + f"\noutputs: {output_dir}")
    return payload
