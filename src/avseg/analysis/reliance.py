"""``python -m avseg.analysis reliance``: does the model listen? M_J / M_F with the audio clean,
muted and swapped (three `avseg.eval` runs), their relative drops, an optional ``require_drop``
verdict, and how much the audio tokens vary across seconds (`audio_token_spread`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from avseg.analysis.common import (
    evaluate,
    fmt,
    load_analysis_inputs,
    markdown_table,
    single_metric,
    write_bytes_atomic,
    write_json,
)
from avseg.errors import ConfigError
from avseg.inference import evaluation_loader

__all__ = ["audio_token_spread", "reliance_rows", "reliance_verdict", "format_reliance_table", "run_reliance"]

log = logging.getLogger(__name__)


def audio_token_spread(
    net: Any, dataset: Any, *, batch_size: int = 4, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """How much the audio tokens F_a (without their sine position code, which is the same in every
    clip) differ between the real seconds of ``dataset``, relative to their size:
    ``spread = sqrt(sum_c var_c / mean ||x||^2)`` over all real seconds, plus the same for the raw
    VGGish embeddings. A spread of a few per cent or less means the network downstream hardly sees
    the audio, whatever it learns."""
    from avseg.models.layers.position import sine_position_1d

    encoder = net.audio_encoder
    tokens_all, embeddings_all = [], []
    net = net.eval().to(device)
    with torch.inference_mode():
        for batch in evaluation_loader(dataset, batch_size=batch_size):
            audio, frame_valid = batch["audio"].to(device), batch["frame_valid"].to(device)
            tokens = encoder(audio, frame_valid)  # [B, T, C], or [B, T, M, C] with band tokens
            position = sine_position_1d(tokens.shape[1], tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)
            if tokens.dim() == 4:  # band tokens: remove the time code and the learnt band embedding
                tokens = tokens - position[:, None] - encoder.band_embed.to(tokens.dtype)
            else:
                tokens = tokens - position
            valid = frame_valid.bool()
            tokens_all.append(tokens[valid].reshape(-1, tokens.shape[-1]).double().cpu())
            embedding = encoder.embed(audio, frame_valid)[valid]
            embeddings_all.append(embedding.reshape(-1, embedding.shape[-1]).double().cpu())

    def spread(x: torch.Tensor) -> float:
        return float((x.var(dim=0, unbiased=False).sum() / x.pow(2).sum(dim=1).mean().clamp_min(1e-30)).sqrt())

    return {"token_spread": spread(torch.cat(tokens_all)), "embedding_spread": spread(torch.cat(embeddings_all))}


def reliance_rows(results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows (perturb, M_J, M_F, relative drops against ``none``) from eval results per perturbation."""
    clean_j = single_metric(results["none"], "miou")
    clean_f = single_metric(results["none"], "fscore")
    rows = []
    for perturb, result in results.items():
        miou, fscore = single_metric(result, "miou"), single_metric(result, "fscore")
        rows.append(
            {
                "perturb": perturb,
                "miou": miou,
                "fscore": fscore,
                "miou_drop": (clean_j - miou) / clean_j if clean_j > 0 else float("nan"),
                "fscore_drop": (clean_f - fscore) / clean_f if clean_f > 0 else float("nan"),
            }
        )
    return rows


def reliance_verdict(rows: Sequence[Mapping[str, Any]], required_drop: float) -> tuple[bool, str]:
    """Does M_J lose at least ``required_drop`` (a fraction) under mute AND swap? (ok, reason)."""
    by_name = {row["perturb"]: row for row in rows}
    missing = [p for p in ("mute", "swap") if p not in by_name]
    if missing:
        raise ValueError(f"reliance_verdict: no rows for {missing}")
    failures = []
    for perturb in ("mute", "swap"):
        drop = by_name[perturb]["miou_drop"]
        if not math.isfinite(drop):
            failures.append(f"{perturb}: relative drop undefined (clean M_J is 0)")
        elif drop < required_drop:
            failures.append(f"{perturb}: M_J drops by {drop:.1%} < {required_drop:.0%}")
    if failures:
        return False, "; ".join(failures)
    return True, f"M_J drops by at least {required_drop:.0%} under mute and swap"


def format_reliance_table(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("perturb", "M_J (mIoU)", "M_F (F-score)", "M_J drop", "M_F drop")
    body = [
        (
            row["perturb"],
            fmt(row["miou"]),
            fmt(row["fscore"]),
            "-"
            if row["perturb"] == "none"
            else (f"{row['miou_drop']:.1%}" if math.isfinite(row["miou_drop"]) else "n/a"),
            "-"
            if row["perturb"] == "none"
            else (f"{row['fscore_drop']:.1%}" if math.isfinite(row["fscore_drop"]) else "n/a"),
        )
        for row in rows
    ]
    return markdown_table(header, body)


def run_reliance(
    ckpt_path: str, overrides: Sequence[str], *, output_dir: Path, require_drop: float | None = None
) -> dict[str, Any]:
    """Evaluates with perturb none / mute / swap; writes ``reliance.md`` / ``reliance.json`` and each
    eval's ``<perturb>/metrics.json`` under ``output_dir``; returns the rows and the verdict."""
    if any(o.split("=", 1)[0].lstrip("+~") in ("perturb", "perturb_snr_db") for o in overrides):
        raise ConfigError("reliance runs perturb=none, mute and swap itself: drop perturb=... from the command line")
    output_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    with open(output_dir / "eval_log.txt", "w") as log_file:
        for perturb in ("none", "mute", "swap"):
            results[perturb] = evaluate(ckpt_path, overrides, output_dir / perturb, perturb=perturb, log=log_file)
    rows = reliance_rows(results)
    first = results["none"]
    inputs = load_analysis_inputs(ckpt_path, overrides, need_sidecar=False)
    spread = audio_token_spread(inputs.module.net, inputs.dataset, batch_size=inputs.batch_size, device=inputs.device)
    verdict = reliance_verdict(rows, require_drop) if require_drop is not None else None
    title = (
        f"Audio reliance of {ckpt_path}\n{first['data_subset']} {first['split']}, {first['num_clips']} clips, "
        f"F-score batch {first['frames_per_batch']} frames, swap/mute seed {results['mute']['perturb_seed']}"
    )
    table = format_reliance_table(rows)
    text = f"{title}\n\n{table}\n"
    text += (
        f"\naudio tokens F_a (position code removed) vary across seconds by {spread['token_spread']:.2%} "
        "of their RMS norm "
        f"(audio network embeddings: {spread['embedding_spread']:.2%}); "
        "near 0 the network cannot tell one sound from another\n"
    )
    if verdict is not None:
        text += f"\nrequire-drop {require_drop:g}: {'PASS' if verdict[0] else 'FAIL'} ({verdict[1]})\n"
    payload = {
        "ckpt_path": str(ckpt_path),
        "rows": rows,
        "data_subset": first["data_subset"],
        "split": first["split"],
        "num_clips": first["num_clips"],
        "data_config": first["data_config"],
        "require_drop": require_drop,
        "passed": None if verdict is None else verdict[0],
        **spread,
    }
    write_bytes_atomic(output_dir / "reliance.md", text.encode())
    write_json(output_dir / "reliance.json", payload)
    log.info(text + f"\noutputs: {output_dir}")
    return payload
