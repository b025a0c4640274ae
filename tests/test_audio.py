"""WAV reading, the VGGish log-mel front end and example fitting (docs/AVSBENCH.md section 4)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as audio_functional

from avseg.data.audio import fit_examples, load_wav, log_mel_examples
from avseg.errors import DataError

# ----------------------------------------------------------------------------------------------
# Independent numpy reference of the VGGish front end, written from the definition in
# torchvggish's mel_features.py / vggish_input.py (float64 throughout, explicit loops).


def _ref_frame(data: np.ndarray, window: int, hop: int) -> np.ndarray:
    count = 1 + (data.shape[0] - window) // hop
    return np.stack([data[i * hop : i * hop + window] for i in range(count)])


def _ref_mel_matrix(num_bins: int, sample_rate: float, bands: int, low: float, high: float) -> np.ndarray:
    def to_mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)

    bin_mel = to_mel(np.linspace(0.0, sample_rate / 2.0, num_bins))
    edges = np.linspace(to_mel(low), to_mel(high), bands + 2)
    matrix = np.zeros((num_bins, bands))
    for band in range(bands):
        lo, mid, hi = edges[band], edges[band + 1], edges[band + 2]
        for k in range(num_bins):
            up = (bin_mel[k] - lo) / (mid - lo)
            down = (hi - bin_mel[k]) / (hi - mid)
            matrix[k, band] = max(0.0, min(up, down))
    matrix[0, :] = 0.0  # HTK ignores the DC bin
    return matrix


def reference_examples(wav16k: np.ndarray) -> np.ndarray:
    """[n_examples, 96, 64] log-mel examples of a 16 kHz mono waveform."""
    sample_rate = 16000
    window = int(round(sample_rate * 0.025))
    hop = int(round(sample_rate * 0.010))
    fft_length = 2 ** int(np.ceil(np.log2(window)))
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi / window * np.arange(window))
    frames = _ref_frame(wav16k.astype(np.float64), window, hop) * hann
    magnitude = np.abs(np.fft.rfft(frames, fft_length))
    mel = magnitude @ _ref_mel_matrix(fft_length // 2 + 1, sample_rate, 64, 125.0, 7500.0)
    log_mel = np.log(mel + 0.01)
    count = log_mel.shape[0] // 96
    return np.stack([log_mel[i * 96 : (i + 1) * 96] for i in range(count)]) if count else np.zeros((0, 96, 64))


def _test_signal(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    chirp = 0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    noise = 0.1 * rng.standard_normal(t.shape)
    signal = chirp + noise
    signal[: sample_rate // 4] = 0.0  # a silent stretch exercises log(0 + 0.01)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def _write_pcm16(path: Path, samples: np.ndarray, sample_rate: int = 16000) -> Path:
    sf.write(path, samples, sample_rate, subtype="PCM_16")
    return path


# ----------------------------------------------------------------------------------------------
# log_mel_examples


def test_log_mel_matches_numpy_reference():
    wav = _test_signal(3.3)
    ours = log_mel_examples(wav, 16000)
    expected = reference_examples(wav)
    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == (3, 1, 96, 64)  # 328 frames -> 3 complete examples
    diff = np.abs(ours[:, 0].numpy().astype(np.float64) - expected).max()
    assert diff < 1e-3, diff


def test_log_mel_matches_pypi_torchvggish():
    """The PyPI `torchvggish` package's own front end on the same 16 kHz WAV."""
    from torchvggish import vggish_input

    wav = _test_signal(2.5, seed=1)
    theirs = vggish_input.waveform_to_examples(wav.astype(np.float64), 16000, return_tensor=True)
    ours = log_mel_examples(wav, 16000)
    assert tuple(ours.shape) == tuple(theirs.shape) == (2, 1, 96, 64)
    diff = (ours.double() - theirs.detach().double()).abs().max().item()
    assert diff < 1e-3, diff


def test_log_mel_example_count_and_short_audio():
    # n samples -> 1 + (n - 400) // 160 frames -> frames // 96 examples
    assert log_mel_examples(np.zeros(15_600, np.float32), 16000).shape[0] == 1  # exactly 96 frames
    assert log_mel_examples(np.zeros(15_599, np.float32), 16000).shape[0] == 0
    assert tuple(log_mel_examples(np.zeros(100, np.float32), 16000).shape) == (0, 1, 96, 64)
    silent = log_mel_examples(np.zeros(16_000 * 5, np.float32), 16000)
    assert tuple(silent.shape) == (5, 1, 96, 64)
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(0.01))))


def test_log_mel_tone_lands_in_the_right_band():
    sample_rate = 16000
    t = np.arange(sample_rate * 2) / sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    band = int(log_mel_examples(tone, sample_rate).mean(dim=(0, 1, 2)).argmax())
    edges_mel = np.linspace(1127 * np.log1p(125 / 700), 1127 * np.log1p(7500 / 700), 66)
    centres_hz = 700 * (np.exp(edges_mel[1:-1] / 1127) - 1)
    assert band == int(np.abs(centres_hz - 1000.0).argmin())


def test_log_mel_resamples_with_torchaudio():
    sample_rate = 44100
    t = np.arange(int(sample_rate * 2.2)) / sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    ours = log_mel_examples(tone, sample_rate)
    resampled = audio_functional.resample(torch.from_numpy(tone).double(), sample_rate, 16000).numpy()
    expected = reference_examples(resampled)
    assert tuple(ours.shape) == (2, 1, 96, 64)
    assert np.abs(ours[:, 0].numpy() - expected).max() < 1e-3
    # the resampled tone is the same sound as one generated at 16 kHz (edges aside)
    native = log_mel_examples(
        (0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(int(16000 * 2.2)) / 16000)).astype(np.float32), 16000
    )
    interior = slice(2, 94)
    assert (ours[:, 0, interior] - native[:, 0, interior]).abs().max() < 0.05


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="mono"):
        log_mel_examples(np.zeros((16000, 2), np.float32), 16000)
    with pytest.raises(ValueError, match="non-finite"):
        log_mel_examples(np.full(16000, np.nan, np.float32), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        log_mel_examples(np.zeros(16000, np.float32), 0)


def test_wav_to_log_mel_equals_int16_reference(tmp_path):
    """torchvggish's `wavfile_to_examples` reads int16 / 32768: so does load_wav."""
    wav = _test_signal(2.0, seed=2)
    path = _write_pcm16(tmp_path / "clip.wav", wav)
    samples, sample_rate = load_wav(path)
    as_int16, _ = sf.read(path, dtype="int16")
    np.testing.assert_array_equal(samples, (as_int16 / 32768.0).astype(np.float32))
    diff = np.abs(log_mel_examples(samples, sample_rate)[:, 0].numpy() - reference_examples(as_int16 / 32768.0))
    assert diff.max() < 1e-3


# ----------------------------------------------------------------------------------------------
# load_wav


def test_load_wav_mono_and_stereo(tmp_path):
    rng = np.random.default_rng(3)
    mono = rng.uniform(-0.9, 0.9, 8000).astype(np.float32)
    samples, rate = load_wav(_write_pcm16(tmp_path / "mono.wav", mono, 22050))
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == (8000,)
    assert np.abs(samples - mono).max() <= 1.0 / 32768 + 1e-7

    stereo = rng.uniform(-0.9, 0.9, (8000, 2)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, 16000, subtype="FLOAT")
    samples, rate = load_wav(tmp_path / "stereo.wav")
    assert rate == 16000 and samples.shape == (8000,)
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-7)


def _handmade_wav(samples_int16: np.ndarray, extra_chunk: bytes, sample_rate: int = 16000) -> bytes:
    """A mono PCM16 WAV with an extra chunk (word-aligned) between 'fmt ' and 'data'."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    data = samples_int16.astype("<i2").tobytes()
    padded_extra = extra_chunk + (b"\0" if len(extra_chunk) % 2 else b"")
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"LIST"
        + struct.pack("<I", len(extra_chunk))
        + padded_extra
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_load_wav_skips_large_odd_sized_chunks(tmp_path):
    samples = np.arange(-500, 500, dtype=np.int16) * 30
    path = tmp_path / "big_list.wav"
    path.write_bytes(_handmade_wav(samples, b"x" * 70_001))  # > 64 KiB and odd: needs the pad byte
    loaded, rate = load_wav(path)
    assert rate == 16000
    np.testing.assert_array_equal(loaded, samples / np.float32(32768))


def _assert_data_error(path: Path, fragment: str) -> None:
    with pytest.raises(DataError) as info:
        load_wav(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert fragment in info.value.problem, info.value.problem


def test_load_wav_missing_file(tmp_path):
    _assert_data_error(tmp_path / "absent.wav", "not found")


def test_load_wav_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _assert_data_error(path, "empty")


def test_load_wav_bad_header(tmp_path):
    good = _write_pcm16(tmp_path / "good.wav", _test_signal(0.5)).read_bytes()
    not_riff = tmp_path / "not_riff.wav"
    not_riff.write_bytes(b"JUNK" + good[4:])
    _assert_data_error(not_riff, "bad header")

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(4).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _assert_data_error(garbage, "bad header")

    # a valid RIFF skeleton whose fmt chunk says "format 0x1234": libsndfile cannot decode it
    bad_format = bytearray(good)
    assert bad_format[12:16] == b"fmt "
    struct.pack_into("<H", bad_format, 20, 0x1234)
    path = tmp_path / "bad_format.wav"
    path.write_bytes(bytes(bad_format))
    _assert_data_error(path, "unreadable")


def test_load_wav_truncated(tmp_path):
    good = _write_pcm16(tmp_path / "good.wav", _test_signal(0.5)).read_bytes()
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good[:-1001])  # soundfile alone would read this without complaint
    assert sf.read(truncated)[0].shape[0] > 0
    _assert_data_error(truncated, "truncated")

    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(good[:44])
    _assert_data_error(header_only, "truncated")


def test_load_wav_no_samples(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    _assert_data_error(path, "no audio samples")


def test_load_wav_non_finite_float(tmp_path):
    samples = np.zeros(1000, np.float32)
    samples[10] = np.inf
    path = tmp_path / "inf.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    _assert_data_error(path, "non-finite")


# ----------------------------------------------------------------------------------------------
# fit_examples


def _numbered_examples(count: int) -> torch.Tensor:
    return torch.arange(1, count + 1, dtype=torch.float32)[:, None, None, None].expand(count, 1, 96, 64).clone()


def test_fit_examples_repeat_last():
    fitted = fit_examples(_numbered_examples(3), 5, "repeat_last")
    assert tuple(fitted.shape) == (5, 1, 96, 64)
    assert fitted[:, 0, 0, 0].tolist() == [1, 2, 3, 3, 3]


def test_fit_examples_zero_pad():
    fitted = fit_examples(_numbered_examples(5), 10, "zero_pad")
    assert tuple(fitted.shape) == (10, 1, 96, 64)
    assert fitted[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    assert fitted[5:].abs().sum() == 0
    assert fit_examples(_numbered_examples(0), 10, "zero_pad").abs().sum() == 0


def test_fit_examples_truncates_extra():
    for mode in ("repeat_last", "zero_pad"):
        assert fit_examples(_numbered_examples(7), 5, mode)[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 5]


def test_fit_examples_errors():
    with pytest.raises(ValueError, match="no example to repeat"):
        fit_examples(_numbered_examples(0), 5, "repeat_last")
    with pytest.raises(ValueError, match="mode"):
        fit_examples(_numbered_examples(2), 5, "reflect")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[n, 1, 96, 64\]"):
        fit_examples(torch.zeros(2, 96, 64), 5, "zero_pad")


def test_sample_rate_without_small_ratio_to_16k_is_refused_before_resampling(tmp_path):
    """A corrupted header's odd rate (44101 Hz) would make the sinc resampler build a huge kernel."""
    import soundfile

    from avseg.data.audio import load_wav, log_mel_examples
    from avseg.errors import DataError

    path = tmp_path / "odd_rate.wav"
    soundfile.write(path, np.zeros(44101, dtype=np.float32), 44101, subtype="PCM_16")
    with pytest.raises(DataError, match="odd_rate.wav.*44101 Hz"):
        load_wav(path)
    with pytest.raises(ValueError, match="44101 Hz"):
        log_mel_examples(np.zeros(44101, dtype=np.float32), 44101)


@pytest.mark.parametrize("bands", [True, 8, 16])
def test_log_mel_cnn_band_tokens_give_finer_frequency_bands(bands):
    """band_tokens true / 8 / 16: that many tokens per second (true = 4), padded seconds zero."""
    from avseg.models.audio import AudioEncoder

    torch.manual_seed(0)
    encoder = AudioEncoder(
        dim=16, input="log_mel", network="log_mel_cnn", random_init=True, freeze_vggish=False, band_tokens=bands
    ).eval()
    valid = torch.tensor([[True, True, False]])
    out = encoder(torch.randn(1, 3, 1, 96, 64), valid)
    expected = 4 if bands is True else bands
    assert out.shape == (1, 3, expected, 16) and encoder.num_bands == expected
    assert torch.all(out[0, 2] == 0) and torch.isfinite(out).all()
    assert (out[0, 0] - out[0, 0, :1]).abs().max() > 1e-3  # the bands differ


@pytest.mark.parametrize("bands", [3, 32, "yes"])
def test_log_mel_cnn_band_tokens_errors(bands):
    from avseg.errors import ConfigError
    from avseg.models.audio import AudioEncoder

    with pytest.raises(ConfigError, match="band_tokens"):
        AudioEncoder(
            dim=16, input="log_mel", network="log_mel_cnn", random_init=True, freeze_vggish=False, band_tokens=bands
        )
