"""Information measures of codes against labels (numpy only), checked against hand-computed values
in tests/test_analysis.py: contingency table, entropy, mutual information, normalised mutual
information, purity and its chance level."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

__all__ = [
    "contingency_table",
    "entropy",
    "mutual_information",
    "normalized_mutual_information",
    "purity",
    "chance_nmi",
    "source_label",
    "fit_code_classes",
    "predict_source_sets",
    "set_counts",
    "source_set_scores",
    "kmeans_codes",
]


def contingency_table(codes: Sequence[Hashable], labels: Sequence[Hashable]) -> np.ndarray:
    """Counts [number of distinct codes, number of distinct labels] of the pairs (code_i, label_i);
    rows / columns in order of first appearance."""
    if len(codes) != len(labels):
        raise ValueError(f"codes ({len(codes)}) and labels ({len(labels)}) differ in length")
    code_ids: dict[Hashable, int] = {}
    label_ids: dict[Hashable, int] = {}
    rows = np.fromiter((code_ids.setdefault(c, len(code_ids)) for c in codes), dtype=np.int64, count=len(codes))
    cols = np.fromiter((label_ids.setdefault(v, len(label_ids)) for v in labels), dtype=np.int64, count=len(labels))
    table = np.zeros((len(code_ids), len(label_ids)), dtype=np.int64)
    np.add.at(table, (rows, cols), 1)
    return table


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy (nats) of the distribution given by non-negative ``counts``."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        raise ValueError("entropy of an empty distribution")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def mutual_information(table: np.ndarray) -> float:
    """I(U; V) in nats from a contingency table [|U|, |V|] of counts."""
    table = np.asarray(table, dtype=np.float64)
    total = table.sum()
    if total <= 0:
        raise ValueError("mutual information of an empty table")
    joint = table / total
    pu = joint.sum(axis=1, keepdims=True)
    pv = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    return float(max((joint[nz] * np.log(joint[nz] / (pu @ pv)[nz])).sum(), 0.0))


def normalized_mutual_information(codes: Sequence[Hashable], labels: Sequence[Hashable]) -> float:
    """NMI(U; V) = I(U; V) / ((H(U) + H(V)) / 2) (arithmetic normalisation), in [0, 1].

    Conventions: two single-value partitions are identical (1.0); if exactly one side has a single
    value there is no shared information (0.0). No samples raises ValueError.
    """
    if len(codes) == 0:
        raise ValueError("normalized_mutual_information: no samples")
    table = contingency_table(codes, labels)
    h_codes = entropy(table.sum(axis=1))
    h_labels = entropy(table.sum(axis=0))
    if h_codes == 0.0 and h_labels == 0.0:
        return 1.0
    denominator = (h_codes + h_labels) / 2.0
    return float(min(mutual_information(table) / denominator, 1.0))


def purity(codes: Sequence[Hashable], label_sets: Sequence[Iterable[Hashable]]) -> float:
    """Share of samples whose label set holds their code's majority class.

    Each code j is given the class c_j found most often among the label sets of its samples;
    purity = (1/n) * sum_j #{i : code_i = j and c_j in label_set_i}. With one label per sample
    (sets of one element) this is the usual cluster purity; with several sounding sources a code
    counts as right when its class is among them.
    """
    if len(codes) != len(label_sets):
        raise ValueError(f"codes ({len(codes)}) and label sets ({len(label_sets)}) differ in length")
    if len(codes) == 0:
        raise ValueError("purity: no samples")
    per_code: dict[Hashable, dict[Hashable, int]] = {}
    for code, labels in zip(codes, label_sets):
        counts = per_code.setdefault(code, {})
        for label in set(labels):
            counts[label] = counts.get(label, 0) + 1
    hits = sum(max(counts.values(), default=0) for counts in per_code.values())
    return hits / len(codes)


def chance_nmi(
    codes: Sequence[Hashable], labels: Sequence[Hashable], *, permutations: int = 50, seed: int = 0
) -> float:
    """Mean NMI after randomly permuting ``labels`` (``permutations`` seeded draws): what NMI
    reaches by chance with these code and label marginals (NMI is biased upward when there are
    many codes and few samples)."""
    if permutations < 1:
        raise ValueError("chance_nmi: permutations must be >= 1")
    rng = np.random.default_rng(seed)
    labels = list(labels)
    values = []
    for _ in range(permutations):
        order = rng.permutation(len(labels))
        values.append(normalized_mutual_information(codes, [labels[i] for i in order]))
    return float(np.mean(values))


def source_label(classes: Iterable[str]) -> str:
    """Canonical label of a set of sounding classes: sorted names joined by ``+``."""
    names = sorted(set(classes))
    return "+".join(names) if names else "(silence)"


# ---------------------------------------------------------------- source sets (issue 13, target 2)
NONE_CLASS = None  # what a codeword maps to when no class sounds in at least half of its seconds


def fit_code_classes(
    codes: np.ndarray, label_sets: Sequence[Iterable[str]], *, min_share: float = 0.5
) -> dict[int, str | None]:
    """Map each codeword to the class it co-occurs with most.

    ``codes [n, K]`` (the K sub-space codes of n seconds, one shared codebook), ``label_sets`` the
    n sets of sounding classes. A codeword's seconds are the seconds where at least one sub-space
    chose it (counted once per second); its class is the class sounding in most of them (ties: the
    first name in sorted order), or ``None`` ("none") when that class sounds in fewer than
    ``min_share`` of them.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(label_sets):
        raise ValueError(
            f"fit_code_classes: codes must be [n, K] with n = {len(label_sets)} label sets, got {codes.shape}"
        )
    seconds: dict[int, int] = {}
    together: dict[int, dict[str, int]] = {}
    for row, labels in zip(codes, label_sets):
        for code in set(int(c) for c in row):
            seconds[code] = seconds.get(code, 0) + 1
            counts = together.setdefault(code, {})
            for label in set(labels):
                counts[label] = counts.get(label, 0) + 1
    mapping: dict[int, str | None] = {}
    for code, n in seconds.items():
        counts = together[code]
        if not counts:
            mapping[code] = NONE_CLASS
            continue
        best = min(counts, key=lambda name: (-counts[name], name))
        mapping[code] = best if counts[best] >= min_share * n else NONE_CLASS
    return mapping


def predict_source_sets(codes: np.ndarray, mapping: dict[int, str | None]) -> list[frozenset[str]]:
    """The union of the classes of each second's K codes (codewords unseen in the fit, or mapped
    to none, add nothing). ``codes [n, K]`` -> n sets."""
    return [
        frozenset(c for c in (mapping.get(int(code), NONE_CLASS) for code in row) if c is not None)
        for row in np.asarray(codes)
    ]


def set_counts(predicted: Sequence[frozenset[str]], true: Sequence[Iterable[str]]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) summed over samples."""
    if len(predicted) != len(true):
        raise ValueError(f"set_counts: {len(predicted)} predicted sets against {len(true)} true sets")
    tp = fp = fn = 0
    for pred, truth in zip(predicted, true):
        truth = set(truth)
        tp += len(pred & truth)
        fp += len(pred - truth)
        fn += len(truth - pred)
    return tp, fp, fn


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def source_set_scores(
    codes: np.ndarray, label_sets: Sequence[Iterable[str]], groups: Sequence[Hashable], *, min_share: float = 0.5
) -> dict[str, float]:
    """Source-set precision / recall / F1 and multi-source recall of per-second sub-space codes.

    ``codes [n, K]`` per second, ``label_sets`` its sounding classes, ``groups`` the clip of each
    second. The clips (in order of first appearance) are split into two halves (even / odd
    positions); the codeword -> class map (:func:`fit_code_classes`) is fitted on one half and
    scored on the other, both ways, and the counts pooled: every second is scored once, by a map
    that never saw its clip. F1 is micro-averaged (true / false positives and false negatives
    summed over seconds); ``multi_recall`` is the recall on seconds where two or more classes
    sound. Returns precision, recall, f1, multi_recall, seconds, multi_seconds.
    """
    codes = np.asarray(codes)
    label_sets = [frozenset(s) for s in label_sets]
    if codes.ndim != 2 or not codes.shape[0] == len(label_sets) == len(groups):
        raise ValueError("source_set_scores: codes [n, K], label_sets and groups must have the same n")
    order: dict[Hashable, int] = {}
    for g in groups:
        order.setdefault(g, len(order))
    if len(order) < 2:
        raise ValueError("source_set_scores: needs at least two clips (one to fit, one to score)")
    half = np.array([order[g] % 2 for g in groups])
    predicted: list[frozenset[str] | None] = [None] * len(label_sets)
    for fit_half in (0, 1):
        fit = np.flatnonzero(half == fit_half)
        score = np.flatnonzero(half != fit_half)
        mapping = fit_code_classes(codes[fit], [label_sets[i] for i in fit], min_share=min_share)
        for i, pred in zip(score, predict_source_sets(codes[score], mapping)):
            predicted[int(i)] = pred
    tp, fp, fn = set_counts(predicted, label_sets)  # type: ignore[arg-type]
    multi = [i for i, s in enumerate(label_sets) if len(s) >= 2]
    mtp, _, mfn = set_counts([predicted[i] for i in multi], [label_sets[i] for i in multi])  # type: ignore[misc]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "multi_recall": _ratio(mtp, mtp + mfn),
        "seconds": len(label_sets),
        "multi_seconds": len(multi),
    }


def kmeans_codes(features: np.ndarray, num_codes: int, *, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Nearest-centre indices of ``features [n, D]`` after seeded k-means (k-means++ start, Lloyd
    steps; an emptied centre is re-drawn from the farthest point). What a codebook of
    ``num_codes`` would give features that were never quantised (the ``none`` variant)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans_codes: features must be [n, D] with n > 0, got {x.shape}")
    k = min(int(num_codes), x.shape[0])
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(x.shape[0])]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        centres.append(x[rng.choice(x.shape[0], p=d2 / total)] if total > 0 else x[rng.integers(x.shape[0])])
    c = np.stack(centres)
    for _ in range(iterations):
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        assign = d2.argmin(1)
        for j in range(k):
            members = x[assign == j]
            c[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
