"""``python -m avseg.analysis decomposition``: the quantised sub-space codes against the true
sounding classes of SynthAVS (``synth_sources.json``): per second (local codes) and per clip
(global codes), normalised mutual information, its chance level, purity, codes used, and how often
the K sub-spaces pick the same codeword."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avseg.analysis.common import (
    SIDECAR_NAME,
    fmt,
    load_analysis_inputs,
    markdown_table,
    write_bytes_atomic,
    write_json,
)
from avseg.analysis.measures import (
    chance_nmi,
    kmeans_codes,
    normalized_mutual_information,
    purity,
    source_label,
    source_set_scores,
)
from avseg.errors import ConfigError, DataError
from avseg.inference import evaluation_loader, load_model

__all__ = [
    "ClipCodes",
    "audio_features",
    "collect_clip_codes",
    "decomposition_tables",
    "subspace_agreement",
    "format_decomposition_tables",
    "run_decomposition",
    "oracle_codes",
    "source_set_rows",
    "format_source_set_rows",
]

log = logging.getLogger(__name__)


def _sounding_per_second(sidecar: Mapping[str, Any], video_id: str, num_real: int, where: Path) -> list[frozenset[str]]:
    entry = sidecar["clips"].get(video_id)
    if entry is None:
        raise DataError(where, f"clip {video_id!r} is not in the sidecar")
    sounding = entry.get("sounding")
    if not isinstance(sounding, list) or len(sounding) < num_real:
        raise DataError(where, f"clip {video_id!r}: 'sounding' must list at least {num_real} seconds")
    try:
        return [frozenset(str(source["class"]) for source in second) for second in sounding[:num_real]]
    except (TypeError, KeyError) as error:
        raise DataError(where, f"clip {video_id!r}: malformed 'sounding' entry ({error})") from error


@dataclass
class ClipCodes:
    """The code assignments of one clip and its true sources (real frames only)."""

    video_id: str
    global_indices: np.ndarray  # [K]
    local_indices: np.ndarray  # [T_real, K]
    sounding: list[frozenset[str]] = field(default_factory=list)  # per real second

    @property
    def clip_sources(self) -> frozenset[str]:
        return frozenset().union(*self.sounding) if self.sounding else frozenset()


def audio_features(
    net: Any, audio: torch.Tensor, frame_valid: torch.Tensor | None = None, *, attention: bool = False
) -> dict[str, torch.Tensor]:
    """The audio path of a QDFormer alone (as in its forward): ``entangled`` audio tokens F_a
    [B, T, C], the decomposition dict (``local_codes`` [B, T, K, C], indices, ...) and, with
    ``attention`` (not ``pq_split``), ``attention`` [B, K, T] from `AudioDecomposition.attention_maps`."""
    with torch.inference_mode():
        tokens = net.audio_encoder(audio, frame_valid)
        quant = net.decomposition(tokens, frame_valid)
        out = {"entangled": tokens, **quant}
        if attention:
            out["attention"] = net.decomposition.attention_maps(tokens, frame_valid)
    return out


def collect_clip_codes(
    net: Any,
    dataset: Any,
    sidecar: Mapping[str, Any],
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    kmeans_size: int | None = None,
) -> list[ClipCodes]:
    """Runs the audio path of ``net`` over ``dataset`` and pairs each clip's code indices with its
    sounding classes from ``sidecar`` (padded frames dropped).

    ``model/decomposition=none`` has no quantiser: with ``kmeans_size`` its unquantised sub-space
    features (per second and per clip) are put through a k-means codebook of that size fitted on
    all of them (:func:`avseg.analysis.measures.kmeans_codes`, seed 0; no labels used), and those
    indices are analysed; without it, it raises ConfigError."""
    variant = getattr(net.decomposition, "variant", None)
    if variant == "none" and kmeans_size is None:
        raise ConfigError("model/decomposition=none has no quantiser: code analysis is not applicable")
    where = Path(getattr(dataset, "root", ".")) / SIDECAR_NAME
    loader = evaluation_loader(dataset, batch_size=batch_size)
    net = net.eval().to(device)
    clips: list[ClipCodes] = []
    features: list[tuple[np.ndarray, np.ndarray]] = []  # (global [K, C], local [T_real, K, C]) for "none"
    for batch in loader:
        frame_valid = batch["frame_valid"].to(device)
        quant = audio_features(net, batch["audio"].to(device), frame_valid)
        global_indices = quant["global_indices"].cpu().numpy()
        local_indices = quant["local_indices"].cpu().numpy()
        valid = batch["frame_valid"].numpy().astype(bool)
        for row, video_id in enumerate(batch["video_id"]):
            num_real = int(valid[row].sum())
            if not valid[row, :num_real].all():
                raise DataError(where, f"clip {video_id!r}: a padded frame comes before a real one")
            if variant == "none":
                features.append(
                    (
                        quant["global_codes"][row].float().cpu().numpy(),
                        quant["local_codes"][row, :num_real].float().cpu().numpy(),
                    )
                )
            clips.append(
                ClipCodes(
                    video_id=str(video_id),
                    global_indices=global_indices[row],
                    local_indices=local_indices[row, :num_real],
                    sounding=_sounding_per_second(sidecar, str(video_id), num_real, where),
                )
            )
    if variant == "none":
        assert kmeans_size is not None
        k = features[0][0].shape[0]
        width = features[0][0].shape[-1]
        local = kmeans_codes(np.concatenate([f[1].reshape(-1, width) for f in features]), kmeans_size)
        glob = kmeans_codes(np.concatenate([f[0] for f in features]), kmeans_size)
        start = 0
        for i, (clip, (_, loc)) in enumerate(zip(clips, features)):
            n = loc.shape[0] * k
            clip.local_indices = local[start : start + n].reshape(loc.shape[0], k)
            clip.global_indices = glob[i * k : (i + 1) * k]
            start += n
    if any((c.global_indices < 0).any() or (c.local_indices < 0).any() for c in clips):
        raise ConfigError("the model returned code index -1 (no quantiser): code analysis is not applicable")
    return clips


def _code_rows(
    codes_per_sub: Sequence[Sequence[int]], label_sets: Sequence[frozenset[str]], *, permutations: int, seed: int
) -> list[dict[str, Any]]:
    """Rows per sub-space, pooled and joint for one level (per-second or per-clip samples)."""
    k = len(codes_per_sub)
    labels = [source_label(s) for s in label_sets]
    single = [i for i, s in enumerate(label_sets) if len(s) == 1]

    def nmi(codes: Sequence[Hashable], names: Sequence[str]) -> float:
        # one label value (or none): nothing for a code to explain, so no NMI (not the 1.0 convention)
        return normalized_mutual_information(codes, names) if len(set(names)) >= 2 else float("nan")

    def row(
        name: str, codes: Sequence[Hashable], sets: Sequence[frozenset[str]], single_idx: Sequence[int]
    ) -> dict[str, Any]:
        names = [source_label(s) for s in sets]
        single_codes = [codes[i] for i in single_idx]
        single_labels = [names[i] for i in single_idx]
        varied = len(set(names)) >= 2
        return {
            "subspace": name,
            "samples": len(codes),
            "codes_used": len(set(codes)),
            "nmi": nmi(codes, names),
            "nmi_chance": chance_nmi(codes, names, permutations=permutations, seed=seed) if varied else float("nan"),
            "nmi_single": nmi(single_codes, single_labels),
            "single_samples": len(single_idx),
            "purity": purity(codes, sets),
        }

    rows = [row(str(i + 1), list(codes_per_sub[i]), label_sets, single) for i in range(k)]
    if k > 1:
        pooled_codes = [c for codes in codes_per_sub for c in codes]
        pooled_sets = list(label_sets) * k
        n = len(label_sets)
        pooled_single = [j * n + i for j in range(k) for i in single]
        rows.append(row("pooled", pooled_codes, pooled_sets, pooled_single))
        joint = [tuple(int(codes[i]) for codes in codes_per_sub) for i in range(len(labels))]
        rows.append(row("joint", joint, label_sets, single))
    return rows


def decomposition_tables(
    clips: Sequence[ClipCodes], *, permutations: int = 50, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """``{"second": rows, "clip": rows}``: per real second, the local codes [T, K] against the
    classes sounding in that second; per clip, the global codes [K] against the classes sounding at
    any time in the clip. Each row: sub-space (1..K, ``pooled`` over sub-spaces, ``joint`` K-tuple),
    samples, codes used, NMI, its chance level, NMI on single-source samples, purity. NMI is
    reported as nan where the labels take fewer than two values (nothing to explain)."""
    if not clips:
        raise ValueError("decomposition_tables: no clips")
    k = int(clips[0].global_indices.shape[0])
    second_sets = [s for clip in clips for s in clip.sounding]
    second_codes = [[int(c) for clip in clips for c in clip.local_indices[:, i]] for i in range(k)]
    clip_sets = [clip.clip_sources for clip in clips]
    clip_codes = [[int(clip.global_indices[i]) for clip in clips] for i in range(k)]
    return {
        "second": _code_rows(second_codes, second_sets, permutations=permutations, seed=seed),
        "clip": _code_rows(clip_codes, clip_sets, permutations=permutations, seed=seed),
    }


def subspace_agreement(indices: np.ndarray) -> float:
    """Share of sub-space pairs (i < j) that picked the same codeword, averaged over samples.

    ``indices [samples, K]`` (one shared codebook, so equal indices are the same code). 0 when every
    sample's K codes differ, 1 when all K sub-spaces always agree: then the "decomposition" gives K
    copies of one code and the sub-spaces cannot stand for different sources. nan for K < 2.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"subspace_agreement: expected [samples, K], got shape {indices.shape}")
    k = indices.shape[1]
    if k < 2 or indices.shape[0] == 0:
        return float("nan")
    rows, cols = np.triu_indices(k, 1)
    return float((indices[:, rows] == indices[:, cols]).mean())


ORACLES = ("mixture", "decomposition")


def oracle_codes(
    label_sets: Sequence[frozenset[str]],
    k: int,
    *,
    kind: str,
    noise: float = 0.0,
    codebook_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Reference codes [n, K] built from the true sounding sets, to give the source-set scores a scale.

    - ``mixture``: one codeword per set of sounding classes, copied into all K sub-spaces (a
      perfect mixture code: what a decomposition that does not decompose can reach at best);
    - ``decomposition``: sub-space i holds the codeword of the i-th sounding class (sorted by
      name), the remaining sub-spaces a silence codeword (a perfect decomposition, up to K classes).

    ``noise``: share of the n * K codes replaced by codewords drawn uniformly from
    ``codebook_size`` (seeded)."""
    if kind not in ORACLES:
        raise ValueError(f"oracle_codes: kind {kind!r} not in {ORACLES}")
    classes = sorted({c for s in label_sets for c in s})
    class_code = {name: i + 1 for i, name in enumerate(classes)}  # 0 = silence
    set_code: dict[frozenset[str], int] = {}
    codes = np.zeros((len(label_sets), k), dtype=np.int64)
    for row, sounding in enumerate(label_sets):
        if kind == "mixture":
            codes[row] = set_code.setdefault(frozenset(sounding), len(set_code))
        else:
            names = sorted(sounding)[:k]
            codes[row, : len(names)] = [class_code[n] for n in names]
    if noise > 0:
        rng = np.random.default_rng(seed)
        replace = rng.random(codes.shape) < noise
        codes[replace] = rng.integers(0, max(codebook_size, int(codes.max()) + 1), size=int(replace.sum()))
    return codes


def source_set_rows(clips: Sequence[ClipCodes], *, name: str, codebook_size: int = 64) -> list[dict[str, Any]]:
    """Per second, the source-set scores (:func:`avseg.analysis.measures.source_set_scores`) and
    the sub-space agreement of the clips' local codes (row ``name``), then of the oracle codes
    (:func:`oracle_codes`) for scale."""
    if not clips:
        raise ValueError("source_set_rows: no clips")
    k = int(clips[0].local_indices.shape[1])
    sets = [s for clip in clips for s in clip.sounding]
    groups = [clip.video_id for clip in clips for _ in clip.sounding]
    candidates = [(name, np.concatenate([c.local_indices for c in clips]))]
    if k > 1:
        candidates += [
            ("oracle: mixture code", oracle_codes(sets, k, kind="mixture")),
            ("oracle: decomposition", oracle_codes(sets, k, kind="decomposition")),
            (
                "oracle: decomposition, 10 % random codes",
                oracle_codes(sets, k, kind="decomposition", noise=0.1, codebook_size=codebook_size),
            ),
        ]
    rows = []
    for label, codes in candidates:
        rows.append({"codes": label, "agreement": subspace_agreement(codes), **source_set_scores(codes, sets, groups)})
    return rows


def _table(header: Sequence[str], rows: Sequence[Mapping[str, Any]], cells: Sequence[str | tuple[str, str]]) -> str:
    """A markdown table of ``rows``, one column per cell: a key (its value: `fmt` for a float or
    None, else as is) or (key, count key) for ``"<value> (<count>)"``."""

    def cell(row: Mapping[str, Any], spec: str | tuple[str, str]) -> str:
        key, count = (spec, None) if isinstance(spec, str) else spec
        value = row[key]
        text = fmt(value) if value is None or isinstance(value, float) else str(value)
        return text if count is None else f"{text} ({row[count]})"

    return markdown_table(header, [tuple(cell(row, spec) for spec in cells) for row in rows])


def format_source_set_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ("codes", "agreement", "source-set F1", "precision", "recall", "multi-source recall (seconds)")
    cells = ("codes", "agreement", "f1", "precision", "recall", ("multi_recall", "multi_seconds"))
    return (
        f"Per second ({rows[0]['seconds']} seconds): codeword -> class fitted on one half of the clips, scored on the "
        f"other (both ways); predicted set = union of the K codes' classes\n\n{_table(header, rows, cells)}"
    )


def format_decomposition_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    header = ("sub-space", "samples", "codes used", "NMI", "NMI chance", "NMI 1-source (n)", "purity")
    cells = ("subspace", "samples", "codes_used", "nmi", "nmi_chance", ("nmi_single", "single_samples"), "purity")
    titles = {
        "second": "Per second: local codes (quant['local_indices']) vs the classes sounding in that second",
        "clip": "Per clip: global codes (quant['global_indices']) vs the classes sounding in the clip",
    }
    return "\n\n".join(f"{titles[level]}\n\n{_table(header, rows, cells)}" for level, rows in tables.items())


def run_decomposition(
    ckpt_path: str, overrides: Sequence[str], *, output_dir: Path, clips: str = "multi", permutations: int = 50
) -> dict[str, Any]:
    """The code / source tables of a checkpoint on its SynthAVS data; writes ``decomposition.md``
    and ``decomposition.json`` in ``output_dir``. For ``none`` (no quantiser) its sub-space
    features go through a k-means codebook of the configured ``codebook_size`` (labelled so)."""
    if clips not in ("multi", "all"):
        raise ConfigError(f"clips={clips!r}: allowed values are multi | all")
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = load_model(ckpt_path, torch.device("cpu"))
    variant = str(getattr(probe.net.decomposition, "variant", "unknown"))
    decomposition_cfg = dict(probe.hparams.get("decomposition") or {})
    del probe
    codebook_size = int(decomposition_cfg.get("codebook_size") or 64)
    codes_from = (
        f"k-means codebook of {codebook_size} on the unquantised features"
        if variant == "none"
        else "the model's codebook"
    )
    header = f"Decomposition analysis of {ckpt_path} (model/decomposition={variant}; codes: {codes_from})"
    payload: dict[str, Any] = {
        "ckpt_path": str(ckpt_path),
        "variant": variant,
        "applicable": True,
        "codes_from": codes_from,
    }
    inputs = load_analysis_inputs(ckpt_path, overrides)
    assert inputs.sidecar is not None
    assignments = collect_clip_codes(
        inputs.module.net,
        inputs.dataset,
        inputs.sidecar,
        batch_size=inputs.batch_size,
        device=inputs.device,
        kmeans_size=codebook_size if variant == "none" else None,
    )
    if clips == "multi":
        assignments = [c for c in assignments if len(c.clip_sources) > 1]
        if not assignments:
            raise DataError(
                inputs.dataset.root,
                f"no multi-source clip in the {inputs.split} split (an S4-style tree?); use clips=all",
            )
    tables = decomposition_tables(assignments, permutations=permutations)
    k = int(assignments[0].global_indices.shape[0])
    agreement = {
        "second": subspace_agreement(np.concatenate([c.local_indices for c in assignments])),
        "clip": subspace_agreement(np.stack([c.global_indices for c in assignments])),
    }
    source_sets = source_set_rows(assignments, name=f"model ({variant})", codebook_size=codebook_size)
    classes = sorted({c for clip in assignments for c in clip.clip_sources})
    text = (
        f"{header}\n{inputs.datamodule.subset} {inputs.split}, {len(assignments)} "
        f"{'multi-source ' if clips == 'multi' else ''}clips, "
        f"K = {k}, codebook size N = {decomposition_cfg.get('codebook_size', 'n/a')}, "
        f"local calibration {'on' if decomposition_cfg.get('local_calibration', True) else 'off'}, "
        f"{len(classes)} sounding classes; NMI chance = mean NMI over {permutations} label permutations\n\n"
        f"{format_decomposition_tables(tables)}\n\n"
        f"sub-space agreement (share of sub-space pairs on the same codeword; 1 = the K codes are copies): "
        f"per second {fmt(agreement['second'])}, per clip {fmt(agreement['clip'])}\n\n"
        f"{format_source_set_rows(source_sets)}\n"
    )
    payload.update(
        {
            "num_clips": len(assignments),
            "clips": clips,
            "num_subspaces": k,
            "codebook_size": decomposition_cfg.get("codebook_size"),
            "classes": classes,
            "tables": tables,
            "subspace_agreement": agreement,
            "source_sets": source_sets,
            "data_subset": inputs.datamodule.subset,
            "split": inputs.split,
            "data_config": inputs.data_source,
        }
    )
    write_bytes_atomic(output_dir / "decomposition.md", text.encode())
    write_json(output_dir / "decomposition.json", payload)
    log.info(text + f"\noutputs: {output_dir}")
    return payload
