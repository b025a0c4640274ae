"""avseg.eval / avseg.predict: footage reading, clip cutting, mask writers, and both commands on a
tiny trained checkpoint (made once per module by a very short `python -m avseg.train`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avseg.data.audio import log_mel_examples
from avseg.errors import DataError
from avseg.io import mask_relpaths, overlay_labels, write_binary_mask_png, write_colour_mask_png
from avseg.predict import (
    clip_audio,
    cut_clips,
    official_frame_indices,
    open_frames_folder,
    open_input,
    open_video,
    prepare_clip,
)

REPO = Path(__file__).resolve().parents[1]
FPS = 8


def _frames(num_frames: int, height: int = 24, width: int = 32) -> torch.Tensor:
    """uint8 [n, 3, H, W]; frame i has grey level 8 * i (readable back after lossy coding)."""
    levels = (torch.arange(num_frames) * 8).clamp(max=255).to(torch.uint8)
    return levels[:, None, None, None].expand(num_frames, 3, height, width).contiguous()


def _tone(seconds: float, sample_rate: int = 16000, frequency: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * torch.sin(2 * math.pi * frequency * t)).float()


def encode_video(
    path: Path, *, seconds: float, with_audio: bool = True, fps: int = FPS, height: int = 24, width: int = 32
) -> Path:
    """An H.264 mp4 (plus an AAC track) written with torchcodec's multi-stream Encoder."""
    from torchcodec.encoders import Encoder

    encoder = Encoder()
    video = encoder.add_video(height=height, width=width, frame_rate=fps, device="cpu")
    audio = encoder.add_audio(sample_rate=16000, num_channels=1) if with_audio else None
    with encoder.open_file(str(path)):
        video.add_frames(_frames(int(round(seconds * fps)), height, width))
        if audio is not None:
            audio.add_samples(_tone(seconds)[None])
    return path


# ---------------------------------------------------------------------------------------------
# frame selection, clips, audio


def test_official_frame_indices():
    # 25 fps: int(s*25 + 15/16*25) = s*25 + 23
    assert official_frame_indices(5, 25.0, 125) == [23, 48, 73, 98, 123]
    # 29.97 fps: the official script uses round(fps) = 30 -> s*30 + 28
    assert official_frame_indices(3, 29.97, 90) == [28, 58, 88]
    # 8 fps: s*8 + 7 (the frame shown at s + 15/16 s); clamped to the last frame
    assert official_frame_indices(3, 8.0, 20) == [7, 15, 19]
    with pytest.raises(ValueError):
        official_frame_indices(0, 25.0, 10)


def test_cut_clips():
    assert cut_clips(12, 5) == [(0, 5), (5, 5), (10, 2)]
    assert cut_clips(10, 10) == [(0, 10)]
    assert cut_clips(3, 10) == [(0, 3)]


def test_clip_audio_fits_and_pads():
    waveform = _tone(7.2).numpy()
    full = clip_audio(waveform, start_second=0, num_real=5, clip_length=5, fit_mode="repeat_last")
    assert torch.equal(full, log_mel_examples(waveform[: 5 * 16000], 16000))
    last = clip_audio(waveform, start_second=5, num_real=2, clip_length=5, fit_mode="repeat_last")
    assert last.shape == (5, 1, 96, 64)
    assert torch.equal(last[:2], log_mel_examples(waveform[5 * 16000 : 7 * 16000], 16000))
    assert torch.count_nonzero(last[2:]) == 0  # padded frames: zero audio, as AVSS pads
    with pytest.raises(DataError, match="no audio for the clip"):
        clip_audio(waveform[:8000], start_second=3, num_real=1, clip_length=5, fit_mode="repeat_last")


def test_prepare_clip_pads_like_avss():
    clip = prepare_clip(_frames(3), torch.zeros(5, 1, 96, 64), clip_length=5, image_size=16)
    assert clip["frames"].shape == (5, 3, 16, 16)
    assert clip["frame_valid"].tolist() == [True, True, True, False, False]
    assert torch.count_nonzero(clip["frames"][3:]) == 0
    assert clip["frames"][:3].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# reading video / frames folders


def test_open_video_picks_official_frames_and_audio(tmp_path):
    video = encode_video(tmp_path / "clip.mp4", seconds=3.0)
    footage = open_video(video)
    assert footage.num_seconds == 3 and (footage.height, footage.width) == (24, 32)
    frames, times = footage.read([0, 1, 2])
    assert frames.shape == (3, 3, 24, 32) and frames.dtype == torch.uint8
    # frame indices 7, 15, 23 at 8 fps: shown at 0.875 s, 1.875 s, 2.875 s; grey level 8 * index
    assert times == pytest.approx([7 / FPS, 15 / FPS, 23 / FPS], abs=1e-3)
    assert [round(float(frames[i].float().mean()) / 8) for i in range(3)] == [7, 15, 23]
    assert abs(footage.waveform.shape[0] - 3 * 16000) < 2048
    assert 0.2 < float(np.sqrt(np.mean(footage.waveform[4000:40000] ** 2))) < 0.5  # the 0.5-amplitude tone


def test_video_errors(tmp_path):
    silent = encode_video(tmp_path / "silent.mp4", seconds=2.0, with_audio=False)
    with pytest.raises(DataError, match="no audio track") as error:
        open_video(silent)
    assert str(silent) in str(error.value)
    short = encode_video(tmp_path / "short.mp4", seconds=0.5)
    with pytest.raises(DataError, match="at least one second") as error:
        open_video(short)
    assert str(short) in str(error.value)
    with pytest.raises(DataError, match="not found"):
        open_input(tmp_path / "missing.mp4")


def _write_frames_folder(folder: Path, count: int, *, wav_seconds: float = 3.0) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(np.full((20, 28, 3), 10 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    sf.write(folder / "audio.wav", _tone(wav_seconds, 22050).numpy(), 22050)
    return folder


def test_frames_folder_natural_order_and_resampled_audio(tmp_path):
    folder = _write_frames_folder(tmp_path / "clip", 11, wav_seconds=11.0)
    footage = open_frames_folder(folder)
    assert footage.num_seconds == 11 and footage.names[:3] == ["0", "1", "2"] and footage.names[-1] == "10"
    frames, times = footage.read([2, 10])
    assert frames[:, 0, 0, 0].tolist() == [20, 100] and times == [2.0, 10.0]
    assert abs(footage.waveform.shape[0] - 11 * 16000) <= 1


def test_frames_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files") as error:
        open_frames_folder(empty)
    assert str(empty) in str(error.value)
    no_wav = tmp_path / "nowav"
    no_wav.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(no_wav / "0.png")
    with pytest.raises(DataError, match="audio=PATH"):
        open_frames_folder(no_wav)


# ---------------------------------------------------------------------------------------------
# writers


def test_mask_writers_and_overlay(tmp_path):
    mask = np.zeros((6, 8), dtype=np.int64)
    mask[2:4, 3:6] = 1
    write_binary_mask_png(tmp_path / "a" / "b.png", mask)
    with Image.open(tmp_path / "a" / "b.png") as image:
        assert image.mode == "L" and np.array_equal(np.asarray(image), mask * 255)
    labels = np.array([[0, 1], [2, 70]])
    write_colour_mask_png(tmp_path / "c.png", labels)
    with Image.open(tmp_path / "c.png") as image:
        rgb = np.asarray(image.convert("RGB"))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [128, 0, 0] and rgb[1, 0].tolist() == [0, 128, 0]
    assert rgb[1, 1].tolist() == [32, 128, 128]  # woman
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temp files left behind
    frame = torch.full((3, 6, 8), 100, dtype=torch.uint8)
    blended = overlay_labels(frame, mask, semantic=False, alpha=0.5)
    assert blended[:, 0, 0].tolist() == [100, 100, 100] and blended[:, 2, 3].tolist() == [177, 50, 50]
    labels = torch.tensor([[0, 1], [70, 1]])  # AVSS: VOC colours (1 = [128, 0, 0], 70 woman = [32, 128, 128])
    semantic = overlay_labels(torch.full((3, 2, 2), 100, dtype=torch.uint8), labels, semantic=True, alpha=0.5)
    assert semantic[:, 0, 0].tolist() == [100, 100, 100] and semantic[:, 0, 1].tolist() == [114, 50, 50]
    assert semantic[:, 1, 0].tolist() == [66, 114, 114]


def test_atomic_writers_leave_old_or_new_file(tmp_path):
    from avseg.io import atomic_output, write_json_atomic, write_npy_atomic, write_text_atomic

    target = tmp_path / "d" / "video.mp4"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".mp4" and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="encoder failed"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("encoder failed")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["video.mp4"]
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    write_text_atomic(tmp_path / "t.md", "x")
    write_npy_atomic(tmp_path / "e.npy", np.arange(3.0))
    assert (tmp_path / "t.md").read_text() == "x" and np.load(tmp_path / "e.npy").tolist() == [0.0, 1.0, 2.0]
    assert not list(tmp_path.glob("**/.*tmp*"))


def test_mask_relpaths_official_naming(tmp_path):
    from avseg.data.avsbench import AVSSDataset, MS3Dataset, S4Dataset
    from avseg.data.synth import ensure_synth_tree

    clips = {"train": 1, "val": 1, "test": 2}
    s4 = S4Dataset(ensure_synth_tree(tmp_path, "s4", image_size=32, clips_per_split=clips), "test", image_size=32)
    record = s4.records[0]
    category = record.frame_paths[0].parent.parent.name
    assert mask_relpaths(s4, 0)[4] == (4, Path(category, record.video_id, f"{record.video_id}_5.png"))
    ms3 = MS3Dataset(ensure_synth_tree(tmp_path, "ms3", image_size=32, clips_per_split=clips), "test", image_size=32)
    name = ms3.records[1].video_id
    assert mask_relpaths(ms3, 1) == [(t, Path(name, f"{name}_{t + 1}.png")) for t in range(5)]
    avss = AVSSDataset(ensure_synth_tree(tmp_path, "avss", image_size=32, clips_per_split=clips), "test", image_size=32)
    uid = avss.records[0].video_id
    paths = mask_relpaths(avss, 0)
    assert paths[0] == (0, Path(uid, "0.png")) and len(paths) == len(avss.records[0].frame_paths)


# ---------------------------------------------------------------------------------------------
# on a tiny trained checkpoint (a very short `python -m avseg.train` run, once per module)

TRAIN_OVERRIDES = [
    "experiment=synth_ms3",
    "logger=csv",
    "data.synth.image_size=32",
    "data.synth.clips_per_split={train: 4, val: 2, test: 4}",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.mask_overlays=null",
]


def _env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AVSEG_CACHE": str(root / "cache"),
        "AVSEG_OUTPUTS": str(root / "outputs"),
        "WANDB_MODE": "disabled",
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    result = subprocess.run(
        [sys.executable, "-m", "avseg.train", *TRAIN_OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    return {"root": root, "run": run_dir, "ckpt": ckpt, "metrics": json.loads((run_dir / "metrics.json").read_text())}


@pytest.fixture
def avseg_env(trained, monkeypatch):
    for key, value in _env(trained["root"]).items():
        if key.startswith(("AVSEG_", "WANDB_")):
            monkeypatch.setenv(key, value)
    return trained


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name=config_name):
        return compose(config_name, overrides=overrides)


def _evaluate(trained, output_dir: Path, *extra: str) -> dict:
    from avseg.evaluation import evaluate_checkpoint

    cfg = _compose("eval", [f"ckpt_path={trained['ckpt']}", *extra])
    return evaluate_checkpoint(cfg, output_dir=output_dir, overrides=list(extra))


@pytest.mark.slow
def test_eval_clean_reproduces_training_test_metrics_and_writes_masks(avseg_env, tmp_path):
    result = _evaluate(avseg_env, tmp_path, "save_masks=true")
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(result))
    assert stored["perturb"] == "none" and stored["perturb_snr_db"] is None
    assert stored["ckpt_path"] == str(avseg_env["ckpt"]) and stored["frames_per_batch"] == 10
    assert stored["data_config"] == str(avseg_env["run"] / ".hydra" / "config.yaml")
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert stored[key] == pytest.approx(avseg_env["metrics"][key], abs=1e-6)
    pngs = sorted((tmp_path / "pred_masks").rglob("*.png"))
    assert len(pngs) == 4 * 5
    assert all(p.name == f"{p.parent.name}_{p.stem.rsplit('_', 1)[1]}.png" for p in pngs)
    with Image.open(pngs[0]) as image:
        assert image.mode == "L" and image.size == (32, 32) and set(np.unique(np.asarray(image))) <= {0, 255}


@pytest.mark.slow
@pytest.mark.parametrize("perturb", ["mute", "swap", "noise"])
def test_eval_perturbations(avseg_env, tmp_path, perturb):
    result = _evaluate(avseg_env, tmp_path, f"perturb={perturb}", "perturb_snr_db=0")
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["perturb"] == perturb
    assert stored["perturb_snr_db"] == (0.0 if perturb == "noise" else None)
    for key in ("test/miou", "test/fscore", "test/fscore_global"):
        assert 0.0 <= stored[key] <= 1.0 and stored[key] == result[key]


@pytest.mark.slow
def test_perturbed_audio_reaches_the_model(avseg_env):
    """Each perturbed audio differs from the clean audio and changes the network's output."""
    import hydra
    from omegaconf import OmegaConf

    from avseg.data.avsbench import MS3Dataset
    from avseg.data.collate import collate_clips
    from avseg.data.perturb import PerturbedDataset, WhiteNoise
    from avseg.inference import load_model

    config = _compose("eval", [f"ckpt_path={avseg_env['ckpt']}"])
    config.data = OmegaConf.load(avseg_env["run"] / ".hydra" / "config.yaml").data  # the training run's data
    clean = hydra.utils.instantiate(config.data).build("ms3", "test", train=False)
    assert isinstance(clean, MS3Dataset)
    module = load_model(avseg_env["ckpt"], torch.device("cpu"))
    clean_batch = collate_clips([clean[0], clean[1]])
    with torch.inference_mode():
        clean_masks = module.net(clean_batch["frames"], clean_batch["audio"], clean_batch["frame_valid"])["pred_masks"]
    perturbed_sets = {
        "mute": PerturbedDataset(clean, mode="mute"),
        "swap": PerturbedDataset(clean, mode="swap", seed=0),
        "noise": MS3Dataset(clean.root, "test", image_size=32, audio_transform=WhiteNoise(snr_db=0.0)),
    }
    for name, perturbed in perturbed_sets.items():
        batch = collate_clips([perturbed[0], perturbed[1]])
        assert not torch.equal(clean_batch["audio"], batch["audio"]), name
        assert torch.equal(clean_batch["frames"], batch["frames"]), name
        with torch.inference_mode():
            masks = module.net(batch["frames"], batch["audio"], batch["frame_valid"])["pred_masks"]
        assert not torch.allclose(clean_masks, masks), name


@pytest.mark.slow
def test_eval_noise_with_embeddings_audio_is_a_config_error(avseg_env, tmp_path):
    from avseg.errors import ConfigError

    with pytest.raises(ConfigError, match="needs data.audio_source=wav"):
        _evaluate(
            avseg_env, tmp_path, "perturb=noise", "data.audio_source=embeddings", f"data.embeddings_dir={tmp_path}"
        )
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_eval_command_line(avseg_env, tmp_path):
    out = tmp_path / "evalrun"
    result = subprocess.run(
        [sys.executable, "-m", "avseg.eval", f"ckpt_path={avseg_env['ckpt']}", "perturb=swap", f"hydra.run.dir={out}"],
        cwd=REPO,
        env=_env(avseg_env["root"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "M_J (mIoU)" in result.stdout and "perturb=swap" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["perturb"] == "swap"


def _predict(trained, output_dir: Path, *extra: str) -> dict:
    from avseg.predict import run

    return run(_compose("predict", [f"ckpt_path={trained['ckpt']}", *extra]), output_dir=output_dir)


@pytest.mark.slow
def test_predict_from_video(avseg_env, tmp_path):
    from torchcodec.decoders import AudioDecoder, VideoDecoder

    video = encode_video(tmp_path / "long.mp4", seconds=7.0, height=30, width=40)
    out = tmp_path / "out"
    summary = _predict(avseg_env, out, f"input={video}")
    assert summary["num_clips"] == 2 and summary["clip_length"] == 5 and summary["image_size"] == 32
    assert [f["second"] for f in summary["frames"]] == list(range(7))
    assert json.loads((out / "predictions.json").read_text())["frames"] == summary["frames"]
    masks = sorted((out / "masks").glob("*.png"))
    assert [m.name for m in masks] == [f"frame_{s:05d}.png" for s in range(7)]
    with Image.open(masks[0]) as image:
        assert image.mode == "L" and image.size == (40, 30)
    decoder = VideoDecoder(str(out / "overlay.mp4"))
    assert decoder.metadata.num_frames == 7 and (decoder.metadata.height, decoder.metadata.width) == (30, 40)
    assert AudioDecoder(str(out / "overlay.mp4")).get_all_samples().data.shape[1] > 6 * 16000
    assert not list(out.glob(".*tmp*"))


@pytest.mark.slow
def test_predict_from_frames_folder_and_wav(avseg_env, tmp_path):
    folder = _write_frames_folder(tmp_path / "frames", 3, wav_seconds=3.0)
    out = tmp_path / "out"
    summary = _predict(avseg_env, out, f"input={folder}", f"out={out}", "overlay=false", "image_size=32")
    assert summary["num_clips"] == 1 and summary["overlay"] is None
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == ["0.png", "1.png", "2.png"]
    assert all(0.0 <= f["foreground_fraction"] <= 1.0 for f in summary["frames"])
    assert not (out / "overlay.mp4").exists()
    from avseg.errors import ConfigError

    with pytest.raises(ConfigError, match="inside the input frames folder"):
        _predict(avseg_env, out, f"input={folder}", f"out={folder / 'preds'}")


@pytest.mark.slow
def test_predict_errors(avseg_env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        _predict(avseg_env, tmp_path / "o1", f"input={empty}")
    short = encode_video(tmp_path / "short.mp4", seconds=0.5)
    with pytest.raises(DataError, match="at least one second"):
        _predict(avseg_env, tmp_path / "o2", f"input={short}")
    silent = encode_video(tmp_path / "silent.mp4", seconds=2.0, with_audio=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "avseg.predict",
            f"ckpt_path={avseg_env['ckpt']}",
            f"input={silent}",
            f"hydra.run.dir={tmp_path / 'o3'}",
        ],
        cwd=REPO,
        env=_env(avseg_env["root"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert f"error: {silent}: the video has no audio track" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# the AVSS (semantic) paths, on an untrained tiny model built in-process (no checkpoint needed)


@pytest.fixture(scope="module")
def semantic_module():
    import hydra
    from helpers_train import TINY_MODEL, compose_train

    cfg = compose_train(["experiment=synth_avss", *TINY_MODEL])
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.model).eval()
    assert module.semantic
    return module


def test_evaluate_dataset_semantic_writes_voc_masks(semantic_module, tmp_path):
    from avseg.data.avsbench import AVSSDataset
    from avseg.data.synth import ensure_synth_tree
    from avseg.inference import evaluate_dataset

    root = ensure_synth_tree(
        tmp_path / "cache", "avss", image_size=32, clips_per_split={"train": 1, "val": 1, "test": 2}
    )
    dataset = AVSSDataset(root, "test", image_size=32)
    metrics = evaluate_dataset(
        semantic_module,
        dataset,
        batch_size=2,
        frames_per_batch=20,
        device=torch.device("cpu"),
        masks_dir=tmp_path / "pred_masks",
    )
    assert set(metrics) == {"miou", "fscore"} and all(0.0 <= v <= 1.0 for v in metrics.values())
    for record in dataset.records:
        written = sorted((tmp_path / "pred_masks" / record.video_id).glob("*.png"))
        assert [p.name for p in written] == sorted(f"{t}.png" for t in range(len(record.frame_paths)))
    with Image.open(written[0]) as image:
        assert image.mode == "RGB" and image.size == (32, 32)
        from avseg.data.palette import decode_colour_mask

        _, unknown = decode_colour_mask(np.asarray(image), 71)
        assert not unknown.any()


def test_predict_semantic_video_pads_last_clip(semantic_module, tmp_path):
    from torchcodec.decoders import VideoDecoder

    from avseg.predict import predict

    video = encode_video(tmp_path / "clip.mp4", seconds=12.0, height=20, width=26)
    summary = predict(
        semantic_module, open_video(video), tmp_path / "out", clip_length=10, image_size=32, device=torch.device("cpu")
    )
    assert summary["num_clips"] == 2 and summary["semantic"] and len(summary["frames"]) == 12
    assert all(abs(sum(f["classes"].values()) - 1.0) < 1e-3 for f in summary["frames"])
    with Image.open(tmp_path / "out" / "masks" / "frame_00011.png") as image:
        assert image.mode == "RGB" and image.size == (26, 20)
    decoder = VideoDecoder(str(tmp_path / "out" / "overlay.mp4"))
    assert decoder.metadata.num_frames == 12 and (decoder.metadata.height, decoder.metadata.width) == (20, 26)


def test_padded_avss_frames_hear_nothing_and_are_background(semantic_module, tmp_path, monkeypatch):
    """A clip shorter than 10 s (AVSBench-semantic pads it): its padded frames get no audio (their
    outputs do not depend on the clip's audio) and every inference path (the Lightning test step,
    evaluate_dataset behind avseg.eval / avseg.analysis, avseg.predict) predicts them background,
    through the one predictor (avseg.inference)."""
    import avseg.inference as inference
    from avseg.data.avsbench import AVSSDataset
    from avseg.data.collate import collate_clips
    from avseg.data.synth import ensure_synth_tree
    from avseg.predict import predict

    root = ensure_synth_tree(
        tmp_path / "cache", "avss", image_size=32, clips_per_split={"train": 1, "val": 1, "test": 4}
    )
    dataset = AVSSDataset(root, "test", image_size=32)
    lengths = [int(dataset[i]["frame_valid"].sum()) for i in range(len(dataset))]
    short, full = lengths.index(min(lengths)), lengths.index(10)
    assert lengths[short] < 10  # the synthetic tree has a padded clip
    batch = collate_clips([dataset[short], dataset[full]])
    padded = ~batch["frame_valid"]

    # no audio reaches a padded frame: other audio in the real seconds changes only the real frames
    other = batch["audio"].clone()
    other[0] = batch["audio"][1]
    other[~batch["frame_valid"]] = 0
    with torch.inference_mode():
        first = semantic_module.net(batch["frames"], batch["audio"], batch["frame_valid"])
        second = semantic_module.net(batch["frames"], other, batch["frame_valid"])
    for key in ("pred_masks", "pred_logits"):
        assert torch.equal(first[key][padded], second[key][padded]), key
    assert not torch.allclose(
        first["pred_masks"][0][batch["frame_valid"][0]], second["pred_masks"][0][batch["frame_valid"][0]]
    )

    seen = []
    original = inference.padded_as_background

    def spy(scores, frame_valid, *, semantic):
        out = original(scores, frame_valid, semantic=semantic)
        seen.append((out, frame_valid))
        return out

    monkeypatch.setattr(inference, "padded_as_background", spy)

    def check_padded_background(path):
        with_padding = [(scores, ~frame_valid.bool()) for scores, frame_valid in seen if not frame_valid.all()]
        assert with_padding, path
        for scores, pad in with_padding:
            assert (scores[pad].argmax(dim=1) == 0).all(), path
            assert (scores[pad][:, 0] == 1).all() and (scores[pad][:, 1:] == 0).all(), path
        seen.clear()

    with torch.inference_mode():  # the Lightning test step
        labels = semantic_module.test_step(batch, 0)["pred_labels"]
    assert (labels[padded] == 0).all()
    check_padded_background("test step")
    inference.evaluate_dataset(semantic_module, dataset, batch_size=2, frames_per_batch=20, device=torch.device("cpu"))
    check_padded_background("evaluate_dataset (avseg.eval, avseg.analysis)")
    video = encode_video(tmp_path / "clip.mp4", seconds=12.0, height=20, width=26)
    predict(
        semantic_module,
        open_video(video),
        tmp_path / "out",
        clip_length=10,
        image_size=32,
        device=torch.device("cpu"),
        overlay=False,
    )
    check_padded_background("avseg.predict (the last clip: 2 real seconds, 8 padded)")


def test_padded_as_background_binary_and_passthrough():
    from avseg.inference import padded_as_background, scores_to_labels

    logits = torch.randn(2, 3, 4, 4) + 5.0
    valid = torch.tensor([[True, True, False], [True, True, True]])
    out = padded_as_background(logits, valid, semantic=False)
    assert torch.equal(out[valid], logits[valid]) and (torch.sigmoid(out[~valid]) == 0).all()
    assert (scores_to_labels(out, semantic=False)[~valid] == 0).all()
    assert padded_as_background(logits, torch.ones(2, 3, dtype=torch.bool), semantic=False) is logits
