"""Information measures of codes against labels (numpy only), checked against hand-computed values
in tests/test_analysis.py: contingency table, entropy, mutual information, normalised mutual
information, purity and its chance level."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

__all__ = ["contingency_table", "entropy", "mutual_information", "normalized_mutual_information", "purity", "chance_nmi", "source_label"]


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


def chance_nmi(codes: Sequence[Hashable], labels: Sequence[Hashable], *, permutations: int = 50, seed: int = 0) -> float:
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
