"""Evaluation audio perturbations (avseg.data.perturb): mute, swap, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avseg.data.audio import LOG_OFFSET, log_mel_examples
from avseg.data.perturb import (
    PerturbedDataset,
    WhiteNoise,
    check_perturbation,
    derangement,
    mute_audio,
    silent_log_mel,
)
from avseg.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# mute


def test_silent_log_mel_is_log_of_offset():
    silence = silent_log_mel(5)
    assert silence.shape == (5, 1, 96, 64)
    assert torch.allclose(silence, torch.full_like(silence, math.log(LOG_OFFSET)))


def test_mute_log_mel_matches_zero_waveform_and_zeroes_padding():
    audio = torch.randn(2, 10, 1, 96, 64)
    frame_valid = torch.zeros(2, 10, dtype=torch.bool)
    frame_valid[0, :5] = True
    frame_valid[1] = True
    muted = mute_audio(audio, frame_valid, fit_mode="zero_pad")
    expected = log_mel_examples(np.zeros(16000, dtype=np.float32), 16000)[0]
    assert torch.equal(muted[1, 3], expected)
    assert torch.equal(muted[0, 4], expected)
    assert torch.count_nonzero(muted[0, 5:]) == 0
    assert audio.abs().sum() > 0  # input untouched


def test_mute_single_clip_without_flags_and_embeddings():
    clip = torch.randn(5, 1, 96, 64)
    assert torch.equal(mute_audio(clip), silent_log_mel(5))
    embeddings = torch.randn(3, 5, 128)
    muted = mute_audio(embeddings)
    assert muted.shape == embeddings.shape and torch.count_nonzero(muted) == 0
    with pytest.raises(ValueError, match="mute_audio"):
        mute_audio(torch.randn(5))


# ---------------------------------------------------------------------------------------------
# swap


def test_derangement_is_seeded_and_stays_in_groups():
    groups = [(5, 5)] * 6 + [(10, 5)] * 2 + [(10, 10)] * 3
    first = derangement(groups, seed=3)
    assert first == derangement(groups, seed=3)
    assert sorted(first) == list(range(len(groups)))
    assert all(partner != i for i, partner in enumerate(first))
    assert all(groups[partner] == groups[i] for i, partner in enumerate(first))
    others = {tuple(derangement(groups, seed=s)) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_derangement_single_member_group_raises_naming_clip():
    with pytest.raises(ValueError, match="'lonely'"):
        derangement([(5, 5), (5, 5), (10, 10)], seed=0, names=["a", "b", "lonely"])


class _ListDataset(torch.utils.data.Dataset):
    """Items built by hand: audio values encode the clip index."""

    def __init__(self, patterns: list[int], num_frames: int = 10) -> None:
        self.items = []
        for index, num_real in enumerate(patterns):
            frame_valid = torch.zeros(num_frames, dtype=torch.bool)
            frame_valid[:num_real] = True
            audio = torch.full((num_frames, 128), float(index + 1)) * frame_valid[:, None]
            self.items.append(
                {"frames": torch.zeros(num_frames, 3, 4, 4), "frame_valid": frame_valid, "audio": audio, "index": index}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_swap_dataset_gives_each_clip_another_clips_audio_of_same_length():
    dataset = _ListDataset([5, 10, 5, 10, 5])
    swapped = PerturbedDataset(dataset, mode="swap", seed=1)
    for index in range(len(dataset)):
        item = swapped[index]
        source = int(item["audio"][0, 0].item()) - 1
        assert source != index
        assert torch.equal(dataset[source]["frame_valid"], item["frame_valid"])
        assert item["index"] == index and item["frames"] is dataset[index]["frames"]
    assert swapped.partner == PerturbedDataset(dataset, mode="swap", seed=1).partner


def test_swap_dataset_single_length_group_is_a_data_error():
    with pytest.raises(DataError, match="only clip of its length group"):
        PerturbedDataset(_ListDataset([5, 10, 5]), mode="swap")


def test_mute_dataset_embeddings_zero():
    muted = PerturbedDataset(_ListDataset([5, 10]), mode="mute")
    assert torch.count_nonzero(muted[1]["audio"]) == 0


# ---------------------------------------------------------------------------------------------
# noise


def test_white_noise_snr_and_reproducibility():
    rng = np.random.default_rng(0)
    wav = (0.3 * np.sin(np.linspace(0, 2000, 48000)) + 0.05 * rng.standard_normal(48000)).astype(np.float32)
    for snr_db in (20.0, 0.0, -5.0):
        noisy = WhiteNoise(snr_db=snr_db, seed=7)(wav, 16000, 3)
        assert noisy.dtype == np.float32 and noisy.shape == wav.shape
        added = noisy.astype(np.float64) - wav
        measured = 10 * math.log10(np.mean(wav.astype(np.float64) ** 2) / np.mean(added**2))
        assert abs(measured - snr_db) < 0.1
    transform = WhiteNoise(snr_db=10.0, seed=7)
    assert np.array_equal(transform(wav, 16000, 3), transform(wav, 16000, 3))
    assert not np.array_equal(transform(wav, 16000, 3), transform(wav, 16000, 4))
    assert not np.array_equal(transform(wav, 16000, 3), WhiteNoise(snr_db=10.0, seed=8)(wav, 16000, 3))


def test_white_noise_keeps_silence_silent():
    silence = np.zeros(1000, dtype=np.float32)
    assert np.array_equal(WhiteNoise(snr_db=0.0)(silence, 16000, 0), silence)


def test_check_perturbation_errors():
    check_perturbation("noise", audio_source="wav", snr_db=5)
    check_perturbation("swap", audio_source="embeddings")
    with pytest.raises(ConfigError, match="audio_source=wav"):
        check_perturbation("noise", audio_source="embeddings", snr_db=5)
    with pytest.raises(ConfigError, match="audio_source=wav"):
        check_perturbation("noise", audio_source="pkl", snr_db=5)
    with pytest.raises(ConfigError, match="perturb='loud'"):
        check_perturbation("loud", audio_source="wav")
    with pytest.raises(ConfigError, match="perturb_snr_db"):
        WhiteNoise(snr_db=float("nan"))


# ---------------------------------------------------------------------------------------------
# through the real loaders (tiny synthetic trees)


@pytest.fixture(scope="module")
def tiny_trees(tmp_path_factory):
    from avseg.data.synth import ensure_synth_tree

    cache = tmp_path_factory.mktemp("synth")
    clips = {"train": 1, "val": 1, "test": 4}
    return {
        "ms3": ensure_synth_tree(cache, "ms3", image_size=32, clips_per_split=clips),
        "avss": ensure_synth_tree(cache, "avss", image_size=32, clips_per_split=clips),
    }


def test_noise_through_dataset_hook_is_reproducible(tiny_trees):
    from avseg.data.avsbench import MS3Dataset

    clean = MS3Dataset(tiny_trees["ms3"], "test", image_size=32)
    noisy = MS3Dataset(tiny_trees["ms3"], "test", image_size=32, audio_transform=WhiteNoise(snr_db=0.0, seed=1))
    again = MS3Dataset(tiny_trees["ms3"], "test", image_size=32, audio_transform=WhiteNoise(snr_db=0.0, seed=1))
    assert not torch.allclose(clean[1]["audio"], noisy[1]["audio"])
    assert torch.equal(noisy[1]["audio"], again[1]["audio"])
    assert torch.equal(clean[1]["frames"], noisy[1]["frames"])


def test_noise_with_embeddings_audio_is_refused_by_the_loader(tiny_trees, tmp_path):
    from avseg.data.avsbench import MS3Dataset

    with pytest.raises(ConfigError, match="audio_source='wav'"):
        MS3Dataset(
            tiny_trees["ms3"],
            "test",
            audio_source="embeddings",
            embeddings_dir=tmp_path,
            audio_transform=WhiteNoise(snr_db=0.0),
        )


def test_swap_and_mute_on_avss_tree(tiny_trees):
    from avseg.data.avsbench import AVSSDataset

    dataset = AVSSDataset(tiny_trees["avss"], "test", image_size=32)
    lengths = [len(r.frame_paths) for r in dataset.records]
    if min(lengths.count(n) for n in set(lengths)) == 1:
        with pytest.raises(DataError, match="perturb=swap"):
            PerturbedDataset(dataset, mode="swap", seed=0)
    else:
        swapped = PerturbedDataset(dataset, mode="swap", seed=0)
        for index, partner in enumerate(swapped.partner):
            assert partner != index and lengths[partner] == lengths[index]
            assert torch.equal(swapped[index]["audio"], dataset[partner]["audio"])
    muted = PerturbedDataset(dataset, mode="mute")[0]
    num_real = lengths[0]
    assert torch.allclose(muted["audio"][:num_real], torch.full_like(muted["audio"][:num_real], math.log(LOG_OFFSET)))
    assert torch.count_nonzero(muted["audio"][num_real:]) == 0


def test_swap_on_ms3_tree_uses_partner_audio(tiny_trees):
    from avseg.data.avsbench import MS3Dataset

    dataset = MS3Dataset(tiny_trees["ms3"], "test", image_size=32)
    swapped = PerturbedDataset(dataset, mode="swap", seed=5)
    assert sorted(swapped.partner) == list(range(len(dataset)))
    for index, partner in enumerate(swapped.partner):
        assert partner != index
        item = swapped[index]
        assert torch.equal(item["audio"], dataset[partner]["audio"])
        assert torch.equal(item["masks"], dataset[index]["masks"]) and item["video_id"] == dataset.video_ids[index]
