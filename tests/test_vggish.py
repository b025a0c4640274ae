"""VGGish (torchvggish-format weights, strict loading), the audio encoder and the embeddings command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from avseg.data.audio import fit_examples, load_wav, log_mel_examples
from avseg.data.embeddings import embedding_path, write_embeddings
from avseg.data.embeddings import main as embeddings_main
from avseg.errors import CheckpointError, ConfigError
from avseg.models.audio import AudioEncoder, VGGish

# The exact key set of torchvggish's VGG state dict (vggish-10086976.pth).
TORCHVGGISH_SHAPES = {
    "features.0.weight": (64, 1, 3, 3),
    "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3),
    "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3),
    "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3),
    "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3),
    "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3),
    "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288),
    "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096),
    "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096),
    "embeddings.4.bias": (128,),
}


@pytest.fixture(scope="module")
def saved_vggish(tmp_path_factory) -> Iterator[tuple[VGGish, Path]]:
    """A randomly initialised VGGish and its state dict saved as torchvggish would."""
    torch.manual_seed(0)
    model = VGGish().eval()
    path = tmp_path_factory.mktemp("vggish") / "vggish-random.pth"
    torch.save(model.state_dict(), path)
    yield model, path
    path.unlink()  # 290 MB: do not leave it in pytest's kept temp folders


def _tiny_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes that save as one element each (expanded scalars)."""
    return {key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}


def _examples(count: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 96, 64, generator=generator) * 2.0 - 3.0  # log-mel-like range


def _torchvggish_forward(model: nn.Module, examples: torch.Tensor) -> torch.Tensor:
    """torchvggish VGG.forward, step by step: features, NCHW -> NHWC, flatten, embeddings."""
    x = model.features(examples)
    x = torch.transpose(x, 1, 3)
    x = torch.transpose(x, 1, 2)
    x = x.contiguous().view(x.size(0), -1)
    return model.embeddings(x)


def test_state_dict_has_exactly_the_torchvggish_keys(saved_vggish):
    model, _ = saved_vggish
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == TORCHVGGISH_SHAPES


def test_forward_follows_torchvggish_flatten_order(saved_vggish):
    model, _ = saved_vggish
    examples = _examples()
    with torch.no_grad():
        ours = model(examples)
        reference = _torchvggish_forward(model, examples)
    assert tuple(ours.shape) == (2, 128)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    # a channels-first flatten would give different embeddings: the order matters
    with torch.no_grad():
        wrong = model.embeddings(model.features(examples).flatten(1))
    assert not torch.allclose(ours, wrong)


@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_pypi_torchvggish_network(saved_vggish, channels_last):
    """The PyPI package's own VGG accepts our saved weights strictly and gives the same embeddings:
    bit for bit in torchvggish's NCHW memory format, to float32 rounding in NHWC (the default)."""
    from torchvggish.torchvggish import VGG, make_layers

    _, path = saved_vggish
    model = VGGish.from_state_dict_file(path, channels_last=channels_last).eval()
    assert model.features[3].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    theirs = VGG(make_layers(), postprocess=False).eval()
    theirs.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
    examples = _examples(seed=1)
    with torch.no_grad():
        ours, reference = model(examples), theirs(examples)
    if channels_last:
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_load_state_dict_file_strict_round_trip(saved_vggish):
    model, path = saved_vggish
    loaded = VGGish.from_state_dict_file(path).eval()
    examples = _examples(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(examples), model(examples), rtol=0, atol=0)


def test_missing_key_raises_naming_file_and_key(tmp_path):
    state = _tiny_state_dict(TORCHVGGISH_SHAPES)
    del state["embeddings.4.bias"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        VGGish.from_state_dict_file(path)
    assert str(path) in str(info.value)
    assert "embeddings.4.bias" in info.value.problem
    assert "missing keys ['embeddings.4.bias']" in info.value.problem


def test_wrong_keys_and_shapes_raise(tmp_path):
    conv_only = {
        "features.0.weight": torch.zeros(64, 1, 3, 3),
        "features.0.bias": torch.zeros(32),  # wrong shape
        "classifier.weight": torch.zeros(3),  # unexpected
    }
    path = tmp_path / "wrong.pth"
    torch.save(conv_only, path)
    with pytest.raises(CheckpointError) as info:
        VGGish.from_state_dict_file(path)
    problem = info.value.problem
    assert "classifier.weight" in problem and "features.13.weight" in problem
    assert "features.0.bias (32,) != (64,)" in problem


def test_missing_and_corrupt_weight_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        VGGish.from_state_dict_file(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        VGGish.from_state_dict_file(corrupt)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="state dict"):
        VGGish.from_state_dict_file(not_a_dict)


def test_pca_postprocessing_is_optional_and_matches_definition(saved_vggish, tmp_path):
    model, _ = saved_vggish
    generator = torch.Generator().manual_seed(3)
    pca = {
        "pca_eigen_vectors": torch.randn(128, 128, generator=generator) * 0.1,
        "pca_means": torch.randn(128, generator=generator) * 0.1,
    }
    pca_path = tmp_path / "pca.pth"
    torch.save(pca, pca_path)
    examples = _examples(seed=4)
    with torch.no_grad():
        raw = model(examples)
        assert not model.postprocess  # off by default
        model.load_pca_params(pca_path)
        model.postprocess = True
        try:
            post = model(examples)
        finally:
            model.postprocess = False
    # torchvggish Postprocessor: pca_matrix @ (x^T - means), clip [-2, 2], quantise to 0..255
    projected = (pca["pca_eigen_vectors"] @ (raw.T - pca["pca_means"][:, None])).T
    expected = torch.round((projected.clamp(-2.0, 2.0) + 2.0) * (255.0 / 4.0))
    torch.testing.assert_close(post, expected, rtol=0, atol=0)
    assert post.min() >= 0 and post.max() <= 255
    assert "pca_means" not in model.state_dict()  # PCA parameters stay outside the state dict

    with pytest.raises(ConfigError, match="pca_params"):
        VGGish.from_state_dict_file(pca_path, postprocess=True)


def test_vggish_rejects_wrong_input_shape(saved_vggish):
    model, _ = saved_vggish
    with pytest.raises(ValueError, match=r"\[N, 1, 96, 64\]"):
        model(torch.zeros(2, 96, 64))


# ----------------------------------------------------------------------------------------------
# AudioEncoder


def test_audio_encoder_from_embeddings_shapes_and_padding():
    torch.manual_seed(0)
    encoder = AudioEncoder(dim=32, input="embeddings", dropout=0.0).eval()
    assert encoder.vggish is None
    audio = torch.randn(2, 10, 128)
    frame_valid = torch.ones(2, 10, dtype=torch.bool)
    frame_valid[1, 5:] = False
    tokens = encoder(audio, frame_valid)
    assert tuple(tokens.shape) == (2, 10, 32)
    assert tokens[1, 5:].abs().sum() == 0  # padded frames are zeroed
    assert (tokens[0].abs().sum(dim=-1) > 0).all() and (tokens[1, :5].abs().sum(dim=-1) > 0).all()
    # padded frames do not leak into valid ones: changing their audio changes nothing
    changed = audio.clone()
    changed[1, 5:] = 100.0
    torch.testing.assert_close(encoder(changed, frame_valid), tokens)
    # without frame_valid every frame is kept
    assert tuple(encoder(audio).shape) == (2, 10, 32)
    tokens.sum().backward()
    assert encoder.proj.weight.grad is not None


def test_audio_encoder_adds_the_time_position_code():
    encoder = AudioEncoder(dim=16, input="embeddings", dropout=0.0).eval()
    same_audio = torch.randn(1, 1, 128).expand(1, 5, 128)
    with torch.no_grad():
        tokens = encoder(same_audio)
        content = encoder.norm(encoder.proj(same_audio))
    from avseg.models.layers.position import sine_position_1d

    torch.testing.assert_close(tokens - content, sine_position_1d(5, 16)[None].expand(1, 5, 16))


def test_audio_encoder_log_mel_with_frozen_random_vggish():
    torch.manual_seed(0)
    encoder = AudioEncoder(dim=24, input="log_mel", random_init=True, dropout=0.0)
    encoder.train()
    assert encoder.vggish is not None and not encoder.vggish.training
    assert all(not p.requires_grad for p in encoder.vggish.parameters())
    audio = _examples(count=6).reshape(2, 3, 1, 96, 64)
    frame_valid = torch.tensor([[True, True, True], [True, False, False]])
    tokens = encoder(audio, frame_valid)
    assert tuple(tokens.shape) == (2, 3, 24)
    assert tokens[1, 1:].abs().sum() == 0
    # the per-frame embeddings are VGGish applied to each (b, t) example in order
    with torch.no_grad():
        per_frame = encoder.vggish(audio.reshape(6, 1, 96, 64)).reshape(2, 3, 128)
    torch.testing.assert_close(encoder.embed(audio), per_frame)
    # with frame_valid, VGGish sees only the 4 valid examples; padded ones embed to zeros
    seen: list[int] = []
    hook = encoder.vggish.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        masked = encoder.embed(audio, frame_valid)
    finally:
        hook.remove()
    assert seen == [4]
    torch.testing.assert_close(masked[frame_valid], per_frame[frame_valid])
    assert masked[~frame_valid].abs().sum() == 0
    tokens.sum().backward()
    assert encoder.proj.weight.grad is not None


def test_audio_encoder_trainable_vggish_gets_gradients(saved_vggish):
    _, path = saved_vggish
    encoder = AudioEncoder(dim=8, input="log_mel", vggish_weights=str(path), freeze_vggish=False)
    encoder(_examples(count=2).reshape(1, 2, 1, 96, 64)).sum().backward()
    assert encoder.vggish.features[0].weight.grad is not None


def test_audio_encoder_weights_are_required(tmp_path):
    with pytest.raises(ConfigError, match="vggish_weights"):
        AudioEncoder(dim=8, input="log_mel")
    with pytest.raises(CheckpointError, match="not found"):
        AudioEncoder(dim=8, input="log_mel", vggish_weights=str(tmp_path / "absent.pth"))
    with pytest.raises(ConfigError, match="both"):
        AudioEncoder(dim=8, input="log_mel", vggish_weights="x.pth", random_init=True)
    with pytest.raises(ConfigError, match="input"):
        AudioEncoder(dim=8, input="waveform")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="even"):
        AudioEncoder(dim=7, input="embeddings")


def test_audio_encoder_rejects_wrong_shapes():
    encoder = AudioEncoder(dim=8, input="embeddings")
    with pytest.raises(ValueError, match=r"\[B, T, 128\]"):
        encoder(torch.zeros(2, 5, 64))
    with pytest.raises(ValueError, match="frame_valid"):
        encoder(torch.zeros(2, 5, 128), torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# python -m avseg.data.embeddings


def _tone(seconds: float, hz: float, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _tiny_trees(base: Path) -> tuple[Path, Path]:
    s4 = base / "s4"
    wav = s4 / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.wav"
    wav.parent.mkdir(parents=True)
    sf.write(wav, _tone(3.1, 440.0), 16000, subtype="PCM_16")  # 3 examples -> repeat to 5
    avss = base / "avss"
    for label, uid, seconds in (("v1s", "uid1", 5.0), ("v2", "uid2", 10.0)):
        wav = avss / label / uid / "audio.wav"
        wav.parent.mkdir(parents=True)
        sf.write(wav, _tone(seconds, 880.0), 16000, subtype="PCM_16")
    return s4, avss


def test_write_embeddings_layout_and_fitting(saved_vggish, tmp_path):
    model, _ = saved_vggish
    s4, avss = _tiny_trees(tmp_path / "data")
    out = tmp_path / "embeddings"

    results = list(write_embeddings(s4, "s4", out / "s4", vggish=model))
    target = out / "s4" / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.npy"
    assert results == [(target, True)]
    embedding = np.load(target)
    assert embedding.shape == (5, 128) and embedding.dtype == np.float32
    wav, rate = load_wav(s4 / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.wav")
    with torch.no_grad():
        expected = model(fit_examples(log_mel_examples(wav, rate), 5, "repeat_last")).numpy()
    np.testing.assert_allclose(embedding, expected, rtol=0, atol=1e-6)
    # repeat_last: rows 3 and 4 are row 2's example again. Equal up to float rounding, not bit for
    # bit: a batched convolution may sum a row in another order depending on its position in the
    # batch (seen on an AMD EPYC with channels-last VGGish: differences of 1e-8)
    np.testing.assert_allclose(embedding[3:], np.broadcast_to(embedding[2], (2, 128)), rtol=0, atol=1e-6)

    results = list(write_embeddings(avss, "avss", out / "avss", vggish=model))
    assert [path.relative_to(out / "avss").as_posix() for path, _ in results] == [
        "v1s/uid1/audio.npy",
        "v2/uid2/audio.npy",
    ]
    short = np.load(out / "avss" / "v1s" / "uid1" / "audio.npy")
    assert short.shape == (10, 128)
    with torch.no_grad():
        zero_example = model(torch.zeros(1, 1, 96, 64)).numpy()[0]
    np.testing.assert_allclose(short[5:], np.broadcast_to(zero_example, (5, 128)), atol=1e-6)  # zero_pad
    assert embedding_path(avss / "v2" / "uid2" / "audio.wav", root=avss, embeddings_dir=out / "avss") == (
        out / "avss" / "v2" / "uid2" / "audio.npy"
    )

    # existing files are kept unless overwrite; no temp files are left behind
    assert [written for _, written in write_embeddings(avss, "avss", out / "avss", vggish=model)] == [False, False]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in (avss / "v2" / "uid2").iterdir()) == ["audio.wav"]  # data tree untouched


def test_embeddings_refuses_output_inside_the_data_tree(saved_vggish, tmp_path):
    model, _ = saved_vggish
    s4, _ = _tiny_trees(tmp_path)
    with pytest.raises(ConfigError, match="inside the data tree"):
        list(write_embeddings(s4, "s4", s4 / "embeddings", vggish=model))


def test_embeddings_command_arguments(tmp_path):
    s4, _ = _tiny_trees(tmp_path)
    with pytest.raises(ConfigError, match="vggish_weights"):
        embeddings_main([f"root={s4}", "subset=s4", f"out={tmp_path / 'out'}"])
    with pytest.raises(CheckpointError, match="not found"):
        embeddings_main(
            [f"root={s4}", "subset=s4", f"out={tmp_path / 'out'}", f"vggish_weights={tmp_path / 'absent.pth'}"]
        )
    with pytest.raises(ConfigError, match="unknown argument"):
        embeddings_main([f"root={s4}", "subset=s4", f"out={tmp_path / 'out'}", "bogus=1"])
    with pytest.raises(ConfigError, match="subset"):
        embeddings_main([f"root={s4}", "subset=s5", f"out={tmp_path / 'out'}", "random_init=true"])


def test_embeddings_command_runs_as_a_module(saved_vggish, tmp_path):
    _, weights = saved_vggish
    s4, _ = _tiny_trees(tmp_path / "data")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "avseg.data.embeddings",
        f"root={s4}",
        "subset=s4",
        f"out={out}",
        f"vggish_weights={weights}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert "1 written, 0 kept" in done.stdout
    assert np.load(out / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.npy").shape == (5, 128)


def test_embeddings_command_random_init_is_seeded(saved_vggish, tmp_path, capsys):
    model, _ = saved_vggish  # built right after torch.manual_seed(0), like random_init with seed=0
    s4, _ = _tiny_trees(tmp_path / "data")
    out = tmp_path / "out"
    assert embeddings_main([f"root={s4}", "subset=s4", f"out={out}", "random_init=true", "seed=0"]) == 0
    assert "1 written, 0 kept" in capsys.readouterr().out
    written = np.load(out / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.npy")
    wav, rate = load_wav(s4 / "s4_data" / "audio_wav" / "train" / "dog" / "clip_a.wav")
    with torch.no_grad():
        expected = model(fit_examples(log_mel_examples(wav, rate), 5, "repeat_last")).numpy()
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the small trainable log-mel CNN (network="log_mel_cnn", the CPU / SynthAVS option)


def _cnn_encoder(dim: int = 16, seed: int = 0) -> AudioEncoder:
    torch.manual_seed(seed)
    return AudioEncoder(
        dim=dim, input="log_mel", network="log_mel_cnn", random_init=True, freeze_vggish=False, dropout=0.0
    )


def test_log_mel_cnn_encoder_shapes_padding_and_gradients():
    encoder = _cnn_encoder()
    assert encoder.vggish is None and encoder.log_mel_cnn is not None
    assert sum(p.numel() for p in encoder.parameters()) < 300_000  # vs 72 M for VGGish
    audio = _examples(count=6).reshape(2, 3, 1, 96, 64)
    frame_valid = torch.tensor([[True, True, True], [True, False, False]])
    tokens = encoder(audio, frame_valid)
    assert tuple(tokens.shape) == (2, 3, 16)
    assert tokens[1, 1:].abs().sum() == 0
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    # trained from scratch: every CNN parameter gets a gradient
    assert all(p.grad is not None and p.requires_grad for p in encoder.log_mel_cnn.parameters())
    assert encoder.log_mel_cnn.features[0].weight.grad.abs().sum() > 0


def test_log_mel_cnn_runs_on_valid_frames_only_and_distinguishes_inputs():
    encoder = _cnn_encoder().eval()
    audio = _examples(count=6).reshape(2, 3, 1, 96, 64)
    frame_valid = torch.tensor([[True, True, True], [True, False, False]])
    seen: list[int] = []
    hook = encoder.log_mel_cnn.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            masked = encoder.embed(audio, frame_valid)
            full = encoder.embed(audio)
    finally:
        hook.remove()
    assert seen == [4, 6]
    torch.testing.assert_close(masked[frame_valid], full[frame_valid])
    assert masked[~frame_valid].abs().sum() == 0
    # silence (the log-mel of a zero waveform) and a tone give different embeddings
    silence = torch.full((1, 1, 1, 96, 64), float(np.log(0.01)))
    tone = silence.clone()
    tone[..., 20:24] = 2.0  # energy in a few mel bands
    with torch.no_grad():
        assert (encoder.embed(silence) - encoder.embed(tone)).abs().max() > 1e-3


def test_log_mel_cnn_trains_to_separate_two_sound_classes():
    # a few Adam steps on two "pitches" must make the tokens linearly separable (mean gap grows)
    encoder = _cnn_encoder(dim=8)
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(8, 1, 96, 64, generator=generator) * 0.3 - 4.0
    high = low.clone()
    low[..., 5:9] += 4.0
    high[..., 50:54] += 4.0
    audio = torch.cat([low, high]).reshape(16, 1, 1, 96, 64)
    target = torch.cat([torch.zeros(8), torch.ones(8)])
    head = nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-2)
    encoder.train()
    for _ in range(15):
        logits = head(encoder(audio)[:, 0]).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    with torch.no_grad():
        accuracy = ((head(encoder(audio)[:, 0]).squeeze(-1) > 0).float() == target).float().mean()
    assert accuracy == 1.0


def test_log_mel_cnn_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="network"):
        AudioEncoder(dim=8, input="log_mel", network="resnet", random_init=True)  # type: ignore[arg-type]
    for bad in (
        {"vggish_weights": str(tmp_path / "vggish.pth"), "random_init": False, "freeze_vggish": False},
        {"random_init": False, "freeze_vggish": False},
        {"random_init": True, "freeze_vggish": True},
    ):
        with pytest.raises(ConfigError, match="log_mel_cnn is trained from scratch"):
            AudioEncoder(dim=8, input="log_mel", network="log_mel_cnn", **bad)
    encoder = _cnn_encoder()
    with pytest.raises(ValueError, match=r"\[N, 1, 96, 64\]"):
        encoder.log_mel_cnn(torch.zeros(2, 1, 96, 32))


def test_log_mel_cnn_yaml_instantiates_and_round_trips_through_a_state_dict(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model" / "audio_encoder" / "log_mel_cnn.yaml"
    torch.manual_seed(0)
    encoder = instantiate(OmegaConf.load(conf), dim=16).eval()
    assert encoder.network == "log_mel_cnn" and not encoder.freeze_vggish
    torch.manual_seed(1)
    other = instantiate(OmegaConf.load(conf), dim=16).eval()
    other.load_state_dict(encoder.state_dict(), strict=True)
    audio = _examples(count=2).reshape(1, 2, 1, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(audio), encoder(audio))


def test_log_mel_cnn_band_tokens_one_per_frequency_band():
    """band_tokens: [B, T, 4, dim], zero at padded frames, each band token depends on its own band of
    the log-mel, plus the time code of its second and a learnt band embedding."""
    torch.manual_seed(0)
    encoder = AudioEncoder(
        dim=16,
        input="log_mel",
        network="log_mel_cnn",
        random_init=True,
        freeze_vggish=False,
        dropout=0.0,
        band_tokens=True,
    ).eval()
    audio = _examples(count=6).reshape(2, 3, 1, 96, 64)
    frame_valid = torch.tensor([[True, True, True], [True, False, False]])
    tokens = encoder(audio, frame_valid)
    assert tuple(tokens.shape) == (2, 3, 4, 16)
    assert tokens[1, 1:].abs().sum() == 0
    assert tuple(encoder.embed(audio).shape) == (2, 3, 4, 128)
    # the CNN's receptive field is local in frequency: changing the top 16 mel bins (the last of the
    # four 16-bin bands) leaves the lowest band's token alone
    changed = audio.clone()
    changed[..., 48:] += 4.0
    with torch.no_grad():
        before, after = encoder.embed(audio), encoder.embed(changed)
    torch.testing.assert_close(before[:, :, 0], after[:, :, 0])
    assert not torch.allclose(before[:, :, 3], after[:, :, 3])
    tokens.sum().backward()
    assert encoder.band_embed.grad is not None


def test_band_tokens_need_the_log_mel_cnn():
    with pytest.raises(ConfigError, match="band_tokens"):
        AudioEncoder(dim=16, input="embeddings", band_tokens=True)
    with pytest.raises(ConfigError, match="band_tokens"):
        AudioEncoder(dim=16, input="log_mel", network="vggish", random_init=True, band_tokens=True)


def test_log_mel_cnn_width_is_configurable_and_only_for_the_cnn():
    wide = AudioEncoder(
        dim=16,
        input="log_mel",
        network="log_mel_cnn",
        random_init=True,
        freeze_vggish=False,
        cnn_channels=[8, 16, 32, 256],
    ).eval()
    convs = [m for m in wide.log_mel_cnn.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 256]
    assert tuple(wide(_examples(count=2).reshape(1, 2, 1, 96, 64)).shape) == (1, 2, 16)
    default = AudioEncoder(dim=16, input="log_mel", network="log_mel_cnn", random_init=True, freeze_vggish=False)
    assert [m.out_channels for m in default.log_mel_cnn.features if isinstance(m, torch.nn.Conv2d)] == [16, 32, 64, 128]
    with pytest.raises(ConfigError, match="cnn_channels"):
        AudioEncoder(dim=16, input="embeddings", cnn_channels=[8, 16, 32, 64])
    with pytest.raises(ConfigError, match="channels"):
        AudioEncoder(
            dim=16, input="log_mel", network="log_mel_cnn", random_init=True, freeze_vggish=False, cnn_channels=[8, 16]
        )
