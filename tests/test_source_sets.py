"""Source-set measures of the decomposition (issue 13, target 2) on constructed codes with known
answers: codeword -> class map, held-out source-set F1, multi-source recall, oracles, k-means."""

from __future__ import annotations

import numpy as np
import pytest

from avseg.analysis.codes import ClipCodes, oracle_codes, source_set_rows
from avseg.analysis.measures import fit_code_classes, kmeans_codes, predict_source_sets, set_counts, source_set_scores

A, B, C = "a", "b", "c"


def test_fit_code_classes_majority_and_the_half_rule():
    codes = np.array([[0, 0], [0, 1], [0, 0], [2, 2], [2, 2], [2, 2]])
    sets = [{A}, {A, B}, {B}, {C}, set(), set()]
    mapping = fit_code_classes(codes, sets)
    # code 0: seconds 0-2, a in 2, b in 2 -> tie broken by name -> a (2 >= 1.5)
    # code 1: second 1 only -> a and b tie -> a; code 2: c in 1 of 3 seconds (< half) -> none
    assert mapping == {0: A, 1: A, 2: None}
    assert predict_source_sets(np.array([[0, 2], [5, 5]]), mapping) == [frozenset({A}), frozenset()]


def test_set_counts():
    assert set_counts([frozenset({A}), frozenset({A, C})], [{A, B}, {C}]) == (2, 1, 1)


def _two_clips(per_clip_codes, per_clip_sets):
    codes = np.concatenate([np.asarray(c) for c in per_clip_codes])
    sets = [s for clip in per_clip_sets for s in clip]
    groups = [i for i, clip in enumerate(per_clip_sets) for _ in clip]
    return codes, sets, groups


def test_perfect_decomposition_scores_one():
    # the silence codeword 0 fills the idle sub-spaces: it co-occurs with every class, with none
    # in at least half of its seconds, so it maps to "none"
    sets = [{A}, {B}, {C}, set(), set(), {A, B}, {A, B, C}]
    codes = [[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0]]
    scores = source_set_scores(*_two_clips([codes, codes], [sets, sets]))
    assert scores["f1"] == scores["multi_recall"] == scores["precision"] == scores["recall"] == 1.0
    assert scores["seconds"] == 14 and scores["multi_seconds"] == 4


def test_perfect_mixture_code_has_a_computed_f1():
    """Seconds {a,b}, {c}, {} with one codeword per set copied K times, in two clips: the {a,b}
    code maps to a (tie, by name), so per clip TP = 2, FN = 1 (b), FP = 0:
    F1 = 2*4 / (2*4 + 0 + 2) = 0.8, multi-source recall 1/2."""
    sets = [{A, B}, {C}, set()]
    codes = [[7] * 4, [8] * 4, [9] * 4]
    scores = source_set_scores(*_two_clips([codes, codes], [sets, sets]))
    assert scores["f1"] == pytest.approx(0.8) and scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(4 / 6) and scores["multi_recall"] == pytest.approx(0.5)


def test_maps_are_fitted_on_the_other_half_only():
    """Each clip uses its own codeword for a: never seen by the map that scores it -> nothing."""
    codes, sets, groups = _two_clips([[[1, 1]], [[2, 2]]], [[{A}], [{A}]])
    scores = source_set_scores(codes, sets, groups)
    assert scores["f1"] == 0.0 and scores["recall"] == 0.0 and np.isnan(scores["precision"])
    assert np.isnan(scores["multi_recall"])  # no second with two sources
    with pytest.raises(ValueError, match="two clips"):
        source_set_scores(codes[:1], sets[:1], groups[:1])


def test_oracles_copy_or_split_the_sources():
    sets = [frozenset({A, B}), frozenset({C}), frozenset()]
    mixture = oracle_codes(sets, 3, kind="mixture")
    assert (mixture == mixture[:, :1]).all() and len(set(mixture[:, 0])) == 3
    decomposition = oracle_codes(sets, 3, kind="decomposition")
    assert decomposition.tolist() == [[1, 2, 0], [3, 0, 0], [0, 0, 0]]
    noisy = oracle_codes(sets * 100, 3, kind="decomposition", noise=0.1, codebook_size=64)
    changed = (noisy != oracle_codes(sets * 100, 3, kind="decomposition")).mean()
    assert 0.05 < changed < 0.12
    with pytest.raises(ValueError, match="kind"):
        oracle_codes(sets, 3, kind="other")


def test_source_set_rows_give_the_model_and_the_oracles():
    sets = [frozenset({A, B}), frozenset({C}), frozenset({A}), frozenset({B})]
    clips = [
        ClipCodes(
            video_id=f"v{i}",
            global_indices=np.array([1, 2]),
            local_indices=np.array([[1, 2], [3, 3], [1, 1], [2, 2]]),
            sounding=list(sets),
        )
        for i in range(4)
    ]
    rows = source_set_rows(clips, name="model (pq)")
    assert [r["codes"] for r in rows] == [
        "model (pq)",
        "oracle: mixture code",
        "oracle: decomposition",
        "oracle: decomposition, 10 % random codes",
    ]
    assert rows[0]["f1"] == 1.0 and rows[0]["agreement"] == 0.75 and rows[2]["f1"] == 1.0
    assert rows[1]["agreement"] == 1.0 and rows[1]["multi_recall"] == pytest.approx(0.5)


def test_kmeans_codes_find_separated_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (20, 3))])
    labels = kmeans_codes(x, 2)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1 and labels[0] != labels[20]
    assert (kmeans_codes(x, 2) == labels).all()  # seeded
