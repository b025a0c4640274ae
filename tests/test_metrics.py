"""Official AVSBench metrics: hand-computed golden values, a literal re-statement of the protocol
(docs/AVSBENCH.md section 5, computed the slow way on whole tensors), and 2-process DDP equivalence."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from avseg.metrics import BinaryAVSMetric, SemanticAVSMetric
from avseg.models.criterion import SetCriterion


def _logit(prob: float) -> float:
    return math.log(prob / (1 - prob))


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor([[_logit(p) for p in row] for row in probs])


def _f(precision: float, recall: float) -> float:
    return 1.3 * precision * recall / (0.3 * precision + recall) if precision + recall else 0.0


# ---------------------------------------------------------------- literal protocol (slow, float32)
def _protocol_binary(logits: torch.Tensor, target: torch.Tensor, frames_per_batch: int) -> dict[str, float]:
    """docs/AVSBENCH.md section 5, binary, written out batch by batch as the official test loop runs."""
    thresholds = torch.linspace(0, 1 - 1e-10, 255)
    batch_miou, batch_f, all_curves = [], [], []
    for start in range(0, logits.shape[0], frames_per_batch):
        pred_logit = logits[start : start + frames_per_batch].float()
        gt = target[start : start + frames_per_batch].float()
        prob = torch.sigmoid(pred_logit)
        pred = (prob > 0.5).float()
        ious = []
        for p, g in zip(pred, gt):
            if g.sum() == 0:
                ious.append(((1 - p) * (1 - g)).sum() / (g.numel() + 1e-7))
            else:
                ious.append((p * g).sum() / (torch.max(p, g).sum() + 1e-7))
        batch_miou.append(float(torch.stack(ious).mean()))
        curves = []
        for p, g in zip(prob, gt):
            if torch.mean(g) == 0.0:
                continue
            curve = torch.zeros(255)
            for k in range(255):
                hit = (p >= thresholds[k]).float()
                tp = (hit * g).sum()
                precision, recall = tp / (hit.sum() + 1e-20), tp / (g.sum() + 1e-20)
                curve[k] = 1.3 * precision * recall / (0.3 * precision + recall)
            curve[curve != curve] = 0
            curves.append(curve)
        all_curves += curves
        batch_f.append(float(torch.stack(curves).mean(0).max()) if curves else 0.0)
    return {
        "miou": sum(batch_miou) / len(batch_miou),
        "fscore": sum(batch_f) / len(batch_f),
        "fscore_global": float(torch.stack(all_curves).mean(0).max()) if all_curves else 0.0,
    }


def _protocol_semantic(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    classes = scores.shape[1]
    pred = torch.softmax(scores.float(), dim=1).argmax(1)
    sum_iou = torch.zeros(classes, dtype=torch.float64)
    sum_f = torch.zeros(classes, dtype=torch.float64)
    count = torch.zeros(classes, dtype=torch.float64)
    for p, g in zip(pred, target):
        for c in range(classes):
            inter = float(((p == c) & (g == c)).sum())
            predicted = float((p == c).sum())
            actual = float((g == c).sum())
            union = predicted + actual - inter
            sum_iou[c] += inter / (union + 2.220446049250313e-16)
            precision = inter / predicted if predicted else float("nan")
            recall = inter / actual if actual else float("nan")
            f = (1.3 * precision * recall / (0.3 * precision + recall)) if precision + recall else float("nan")
            sum_f[c] += 0.0 if math.isnan(f) else f
            count[c] += union > 0
    miou = torch.nan_to_num(sum_iou / count, nan=0.0).mean()
    fscore = torch.nan_to_num(sum_f / count, nan=0.0).mean()
    return {"miou": float(miou), "fscore": float(fscore)}


def _random_binary(seed: int, frames: int, size: int = 8, empty_every: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = (torch.rand(frames, size, size, generator=generator) > 0.6).long()
    target[::empty_every] = 0
    logits = torch.randn(frames, size, size, generator=generator) * 2 + (target * 2 - 1) * 1.0
    return logits, target


def _random_semantic(seed: int, frames: int, classes: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A few classes per frame so many classes are absent (exercises cnt == 0).
    target = torch.randint(0, 4, (frames, size, size), generator=generator) * (classes // 5)
    scores = torch.randn(frames, classes, size, size, generator=generator)
    scores.scatter_add_(1, target[:, None], torch.full((frames, 1, size, size), 1.5))
    return scores, target


def _values(result: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in result.items()}


# ---------------------------------------------------------------- binary golden values
def test_binary_iou_golden_with_empty_ground_truth_quirk() -> None:
    metric = BinaryAVSMetric(frames_per_batch=2)
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    logits = torch.tensor(
        [
            [[3.0, 3.0], [-3.0, -3.0]],  # inter 1, union 2 -> 0.5
            [[3.0, -3.0], [-3.0, -3.0]],  # empty GT: 3 pixels where both are 0 -> 3/4
            [[-3.0, -3.0], [-3.0, -3.0]],  # empty GT, empty prediction -> 1
        ]
    )
    metric.update(logits, target)
    result = _values(metric.compute())
    # Batches {0,1} and {2} (partial): mean of batch means, not the mean over frames.
    batch_one = (1 / (2 + 1e-7) + 3 / (4 + 1e-7)) / 2
    batch_two = 4 / (4 + 1e-7)
    assert result["miou"] == pytest.approx((batch_one + batch_two) / 2, abs=1e-7)
    assert result["miou"] != pytest.approx((1 / 2 + 3 / 4 + 1) / 3, abs=1e-3)


def test_binary_strict_threshold() -> None:
    metric = BinaryAVSMetric()
    target = torch.tensor([[[1, 1]]])
    # sigmoid(0) == 0.5 is not foreground (strict >).
    metric.update(torch.tensor([[[0.0, 5.0]]]), target)
    assert float(metric.compute()["miou"]) == pytest.approx(0.5, abs=1e-6)


# Two frames whose F curves peak at different thresholds (the values in the comments are by hand).
_FRAME_A_PROBS = [[0.9, 0.6], [0.2, 0.1]]
_FRAME_A_GT = [[1, 0], [0, 0]]
_FRAME_B_PROBS = [[0.3, 0.8], [0.95, 0.05]]
_FRAME_B_GT = [[1, 1], [0, 0]]


def test_binary_fscore_golden_and_global_variant() -> None:
    # Frame A: F = 1 for thresholds in (0.6, 0.9] (only the GT pixel is predicted).
    # Frame B: thresholds in (0.05, 0.3] predict 3 pixels with both GT pixels -> P 2/3, R 1.
    best_b = _f(2 / 3, 1)
    assert best_b == pytest.approx(0.7222222, abs=1e-6)
    # Mean curve: on (0.6, 0.8] A gives 1 and B gives F(1/2, 1/2) = 0.5 -> 0.75, the maximum
    # (other intervals: (0.2, 0.3] -> (F(1/2,1) + F(2/3,1)) / 2 = 0.6437, (0.8, 0.9] -> 0.5).
    assert (_f(0.5, 1) + _f(2 / 3, 1)) / 2 < 0.75
    logits = torch.stack([_logits(_FRAME_A_PROBS), _logits(_FRAME_B_PROBS)])
    target = torch.tensor([_FRAME_A_GT, _FRAME_B_GT])

    together = BinaryAVSMetric(frames_per_batch=2)
    together.update(logits, target)
    result = _values(together.compute())
    assert result["fscore"] == pytest.approx(0.75, abs=1e-6)
    assert result["fscore_global"] == pytest.approx(0.75, abs=1e-6)

    apart = BinaryAVSMetric(frames_per_batch=1)
    apart.update(logits, target)
    result = _values(apart.compute())
    assert result["fscore"] == pytest.approx((1.0 + best_b) / 2, abs=1e-6)
    assert result["fscore_global"] == pytest.approx(0.75, abs=1e-6)


def test_binary_all_empty_batch_scores_zero_f() -> None:
    metric = BinaryAVSMetric(frames_per_batch=2)
    logits = torch.stack(
        [_logits(_FRAME_A_PROBS), _logits(_FRAME_B_PROBS), torch.full((2, 2), -4.0), torch.full((2, 2), 4.0)]
    )
    target = torch.tensor([_FRAME_A_GT, _FRAME_B_GT, [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    metric.update(logits, target)
    result = _values(metric.compute())
    assert result["fscore"] == pytest.approx((0.75 + 0.0) / 2, abs=1e-6)
    assert result["fscore_global"] == pytest.approx(0.75, abs=1e-6)
    # Second batch IoU: empty GT with an empty prediction (1) and a full prediction (0).
    # First batch at 0.5: A predicts 2 pixels, 1 right (1/2); B predicts 2, 1 right, GT 2 (1/3).
    first = (1 / (2 + 1e-7) + 1 / (3 + 1e-7)) / 2
    assert result["miou"] == pytest.approx((first + 0.5) / 2, abs=1e-6)

    only_empty = BinaryAVSMetric()
    only_empty.update(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2, dtype=torch.long))
    assert _values(only_empty.compute())["fscore"] == 0.0
    assert _values(only_empty.compute())["fscore_global"] == 0.0


def test_binary_duplicates_dropped_and_order_by_index() -> None:
    logits, target = _random_binary(0, 30)
    reference = BinaryAVSMetric(frames_per_batch=20)
    reference.update(logits, target)
    expected = _values(reference.compute())

    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(30, generator=generator)
    with_duplicates = torch.cat([order, order[:7]])  # a padded tail repeats some frames
    shuffled = BinaryAVSMetric(frames_per_batch=20)
    for chunk in with_duplicates.split(6):
        shuffled.update(logits[chunk], target[chunk], frame_index=chunk)
    assert _values(shuffled.compute()) == pytest.approx(expected, abs=1e-12)

    # Without indices the arrival order is kept: here it changes the batches, hence the result.
    arrival = BinaryAVSMetric(frames_per_batch=20)
    arrival.update(logits[order], target[order])
    assert _values(arrival.compute())["miou"] != pytest.approx(expected["miou"], abs=1e-9)


@pytest.mark.parametrize("frames,frames_per_batch", [(45, 20), (20, 20), (7, 3), (12, 1)])
def test_binary_matches_literal_protocol(frames: int, frames_per_batch: int) -> None:
    logits, target = _random_binary(frames, frames)
    logits[0, 0, 0] = 30.0  # sigmoid rounds to 1.0 in float32: counted at the last threshold (1.0)
    metric = BinaryAVSMetric(frames_per_batch=frames_per_batch)
    for chunk in torch.arange(frames).split(8):
        metric.update(logits[chunk], target[chunk], frame_index=chunk)
    assert _values(metric.compute()) == pytest.approx(_protocol_binary(logits, target, frames_per_batch), abs=1e-6)


def test_binary_input_checks() -> None:
    metric = BinaryAVSMetric()
    with pytest.raises(ValueError, match="0 or 1"):
        metric.update(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 255))
    with pytest.raises(ValueError, match="match"):
        metric.update(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), frame_index=torch.zeros(1))
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no frames"):
        BinaryAVSMetric().compute()
    with pytest.raises(ValueError, match="frames_per_batch"):
        BinaryAVSMetric(frames_per_batch=0)
    mixed = BinaryAVSMetric()
    mixed.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), frame_index=torch.tensor([0]))
    mixed.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="frame_index"):
        mixed.compute()


# ---------------------------------------------------------------- semantic golden values
def _one_hot_scores(pred: list[list[int]], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), classes).permute(2, 0, 1).float() * 5


def test_semantic_golden_absent_class_and_prediction_only_class() -> None:
    # Frame 1: gt [[0,1],[1,1]], pred [[0,1],[2,2]]. Frame 2: all background, predicted so.
    #   class 0: frame 1 I=1 U=1 (IoU 1, F 1), frame 2 I=4 U=4 (1, 1) -> cnt 2, mean IoU 1, F 1
    #   class 1: frame 1 I=1 P=1 G=3 U=3 -> IoU 1/3, F(1, 1/3); frame 2 U=0 -> cnt 1
    #   class 2: only predicted (frame 1, P=2, G=0) -> IoU 0, F 0 (NaN), cnt 1
    #   class 3: never seen -> 0
    scores = torch.stack([_one_hot_scores([[0, 1], [2, 2]], 4), _one_hot_scores([[0, 0], [0, 0]], 4)])
    target = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 0]]])
    metric = SemanticAVSMetric(num_classes=4)
    metric.update(scores, target)
    result = _values(metric.compute())
    assert result["miou"] == pytest.approx((1 + 1 / 3 + 0 + 0) / 4, abs=1e-6)
    assert result["fscore"] == pytest.approx((1 + _f(1, 1 / 3) + 0 + 0) / 4, abs=1e-6)
    assert _f(1, 1 / 3) == pytest.approx(0.6842105, abs=1e-6)

    three = SemanticAVSMetric(num_classes=3)
    three.update(scores[:, :3], target)
    assert _values(three.compute())["miou"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-6)


def test_semantic_matches_literal_protocol_with_duplicates_and_order() -> None:
    scores, target = _random_semantic(0, 13, 71)
    expected = _protocol_semantic(scores, target)
    metric = SemanticAVSMetric()
    order = torch.randperm(13, generator=torch.Generator().manual_seed(2))
    for chunk in torch.cat([order, order[:3]]).split(5):
        metric.update(scores[chunk], target[chunk], frame_index=chunk * 1)
    assert _values(metric.compute()) == pytest.approx(expected, abs=1e-6)


def test_semantic_input_checks() -> None:
    metric = SemanticAVSMetric(num_classes=3)
    with pytest.raises(ValueError, match="target values"):
        metric.update(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        metric.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        SemanticAVSMetric(num_classes=1)
    with pytest.warns(UserWarning, match="before the ``update``"), pytest.raises(ValueError, match="no frames"):
        SemanticAVSMetric().compute()


# ---------------------------------------------------------------- DDP equivalence
_CLIPS, _T_BINARY, _T_SEMANTIC, _CLIPS_PER_STEP = 7, 5, 3, 2


def _eval_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits, target = _random_binary(11, _CLIPS * _T_BINARY)
    scores, classes = _random_semantic(12, _CLIPS * _T_SEMANTIC, 71)
    return logits, target, scores, classes


def _evaluate(clip_order: list[int]) -> tuple[BinaryAVSMetric, SemanticAVSMetric]:
    """Feed clips in the given order, a few clips per step, as an evaluation loop does."""
    logits, target, scores, classes = _eval_set()
    binary, semantic = BinaryAVSMetric(frames_per_batch=20), SemanticAVSMetric(num_classes=71)
    for start in range(0, len(clip_order), _CLIPS_PER_STEP):
        clips = torch.tensor(clip_order[start : start + _CLIPS_PER_STEP])
        frames = (clips[:, None] * _T_BINARY + torch.arange(_T_BINARY)).flatten()
        binary.update(logits[frames], target[frames], frame_index=frames)
        frames = (clips[:, None] * _T_SEMANTIC + torch.arange(_T_SEMANTIC)).flatten()
        semantic.update(scores[frames], classes[frames], frame_index=frames)
    return binary, semantic


def _criterion_case(rank: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Rank 0 holds 1 object, rank 1 holds 3: under DDP both normalise by the mean, 2."""
    generator = torch.Generator().manual_seed(20 + rank)
    frames = 1 if rank == 0 else 3
    outputs = {
        "pred_logits": torch.randn(1, frames, 2, 1, generator=generator),
        "pred_masks": torch.randn(1, frames, 2, 4, 4, generator=generator),
    }
    masks = torch.zeros(1, frames, 8, 8, dtype=torch.long)
    masks[..., 2:6, 2:6] = 1
    return outputs, masks, torch.ones(1, frames, dtype=torch.bool)


def _ddp_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        result = {}
        for shuffle in (False, True):  # in order / interleaved by a shuffled sampler
            sampler = DistributedSampler(range(_CLIPS), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=5)
            binary, semantic = _evaluate(list(sampler))
            result[f"shuffle={shuffle}"] = {
                **{f"binary/{k}": float(v) for k, v in binary.compute().items()},
                **{f"semantic/{k}": float(v) for k, v in semantic.compute().items()},
                "local_clips": list(sampler),
            }
        # The criterion's object count is averaged over ranks (one all_reduce per forward).
        criterion = SetCriterion(num_classes=1, semantic=False)
        result["criterion"] = {k: float(v) for k, v in criterion(*_criterion_case(rank)).items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path) -> None:
    binary, semantic = _evaluate(list(range(_CLIPS)))
    expected = {f"binary/{k}": float(v) for k, v in binary.compute().items()}
    expected.update({f"semantic/{k}": float(v) for k, v in semantic.compute().items()})
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for mode in ("shuffle=False", "shuffle=True"):
        clips = results[0][mode].pop("local_clips") + results[1][mode].pop("local_clips")
        # 7 clips over 2 ranks: the sampler pads to 8 by repeating one clip.
        assert len(clips) == 8 and len(set(clips)) == _CLIPS
        for result in results:
            assert result[mode] == pytest.approx(expected, abs=1e-6), mode
    criterion = SetCriterion(num_classes=1, semantic=False)
    for rank, local_objects in ((0, 1), (1, 3)):
        single = {k: float(v) for k, v in criterion(*_criterion_case(rank)).items()}
        scaled = {k: v * local_objects / 2 for k, v in single.items()}
        assert results[rank]["criterion"] == pytest.approx(scaled, rel=1e-5)
