"""``python -m avseg.predict ckpt_path=PATH input=VIDEO_OR_CLIP_DIR [out=DIR]``: masks for new footage.

Input (docs/EVALUATION.md):

- a video file, decoded with torchcodec (``VideoDecoder`` / ``AudioDecoder``; FFmpeg underneath).
  One frame per second, taken where the official AVSBench preprocessing takes it: that script
  (``preprocess_scripts/preprocess_s4.py``) cuts every second into 16 sub-samples, frame
  ``int(s * F + i / 16 * F)`` for i = 0..15 with F = round(fps), and keeps sub-sample 15. So the
  frame of second s is frame index ``s * F + floor(15 F / 16)`` (clamped to the last frame), the frame
  shown at time ``s + 15/16`` s for an integer frame rate (e.g. index 23 of each second at 25 fps).
  We read the frame by that index, as the official script does. The audio track is resampled
  to 16 kHz by FFmpeg (torchcodec) and its channels averaged (VGGish's ``waveform_to_examples``
  averages channels), aligned so that sample 0 is the first video frame's time.
  ``num_seconds = floor(duration)``; a video shorter than one second, or without an audio track,
  raises `DataError` naming the file.
- a folder of frames (image files sorted by name, digits compared as numbers; frame k is second k)
  plus a WAV (``audio=PATH`` or the folder's only ``.wav``).

Footage is cut into consecutive clips of the experiment's length T (5, or 10 for AVSS models); the
last one is padded as the AVSS loader pads: frames zero after normalisation, ``frame_valid`` false,
audio zero. Each clip's audio is the log-mel of its own seconds of waveform (one 0.96 s example per
second, fitted to T like the training loader: ``repeat_last`` for binary models, ``zero_pad`` for
AVSS), so a 5 s video gives exactly what the AVSBench preprocessing gives. Frames are resized with
the evaluation transform (``ClipTransform(mode="eval")``: plain resize to image_size, ImageNet
normalisation).

Outputs (each file written atomically, `avseg.io`) in ``out`` (default: the Hydra run directory):
``masks/<frame>.png`` (binary 0/255, or AVSS VOC colours) at the input frames' resolution
(binary: logits upsampled bilinearly; AVSS: argmax at model resolution, labels upsampled by
nearest neighbour), ``predictions.json`` (per frame: second, time, mask file, foreground fraction or
class fractions) and ``overlay.mp4`` (masks blended on the frames, 1 fps, with the audio track),
written with ``torchcodec.encoders.Encoder`` (video + audio streams; torchcodec 0.17 has it, so
the ffmpeg command line is not used).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from avseg.cli import run_main
from avseg.data.audio import VGGISH_SAMPLE_RATE, fit_examples, load_wav, log_mel_examples
from avseg.data.layout import model_layout
from avseg.errors import ConfigError, DataError
from avseg.inference import (
    load_model,
    model_audio_input,
    predict_scores,
    resolve_device,
    scores_to_labels,
    training_run_config,
)
from avseg.io import atomic_output, overlay_labels, write_json_atomic, write_label_png

__all__ = [
    "IMAGE_SUFFIXES",
    "Footage",
    "official_frame_indices",
    "open_video",
    "open_frames_folder",
    "open_input",
    "cut_clips",
    "clip_audio",
    "prepare_clip",
    "OverlayVideoWriter",
    "predict",
    "run",
    "main",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SUBSAMPLES_PER_SECOND = 16  # the official preprocessing's sample_num
KEPT_SUBSAMPLE = 15  # ... of which it keeps sub-sample k % 16 == 15


# ---------------------------------------------------------------------------------------------
# reading footage


@dataclass
class Footage:
    """One frame per second plus the 16 kHz mono waveform of a video or a frames folder.

    ``read(seconds)`` -> (uint8 [n, 3, H, W], times in s); ``names[s]`` names second s's outputs.
    """

    source: Path
    num_seconds: int
    height: int
    width: int
    waveform: np.ndarray  # float32 [n] at 16 kHz; sample 0 = time 0 of the footage
    names: list[str]
    read: Callable[[Sequence[int]], tuple[torch.Tensor, list[float]]] = field(repr=False)
    audio_source: Path | None = None


def official_frame_indices(num_seconds: int, fps: float, num_frames: int) -> list[int]:
    """Frame index per second, as the official AVSBench preprocessing picks it (module docstring):
    ``s * F + floor(15 * F / 16)`` with F = round(fps), clamped to ``num_frames - 1``."""
    if num_seconds < 1 or num_frames < 1:
        raise ValueError(
            f"official_frame_indices: need >= 1 second and >= 1 frame, got {num_seconds} s, {num_frames} frames"
        )
    interval = int(round(fps))
    if interval < 1:
        raise ValueError(f"official_frame_indices: frame rate {fps} rounds to 0")
    offset = int(KEPT_SUBSAMPLE / SUBSAMPLES_PER_SECOND * interval)
    return [min(s * interval + offset, num_frames - 1) for s in range(num_seconds)]


def _resample_to_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == VGGISH_SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import torchaudio.functional as audio_functional

    signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return audio_functional.resample(signal, int(sample_rate), VGGISH_SAMPLE_RATE).numpy().astype(np.float32)


def open_video(path: str | os.PathLike) -> Footage:
    """Decode a video's per-second frames lazily and its whole audio track (module docstring)."""
    from torchcodec.decoders import AudioDecoder, VideoDecoder, get_container_metadata

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "video file not found")
    try:
        container = get_container_metadata(str(path))
        decoder = VideoDecoder(str(path), seek_mode="exact")
    except (RuntimeError, ValueError) as error:
        raise DataError(
            path, f"cannot decode video ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
        ) from error
    if container.best_audio_stream_index is None:
        raise DataError(path, "the video has no audio track (avseg needs the sound to segment what is sounding)")
    metadata = decoder.metadata
    duration = metadata.duration_seconds
    if duration is None or metadata.num_frames is None or metadata.average_fps is None:
        raise DataError(path, "the video stream declares no duration / frame count / frame rate")
    num_seconds = int(math.floor(float(duration) + 1e-6))
    if num_seconds < 1:
        raise DataError(
            path, f"the video is {float(duration):.3f} s long; at least one second is needed (one frame per second)"
        )
    indices = official_frame_indices(num_seconds, float(metadata.average_fps), int(metadata.num_frames))
    begin = float(metadata.begin_stream_seconds or 0.0)
    try:
        samples = AudioDecoder(str(path), sample_rate=VGGISH_SAMPLE_RATE).get_all_samples()
    except (RuntimeError, ValueError) as error:
        raise DataError(
            path, f"cannot decode the audio track ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
        ) from error
    mono = samples.data.to(torch.float32).mean(dim=0).numpy()
    # align: sample 0 of the waveform = time of the first video frame
    shift = int(round((float(samples.pts_seconds) - begin) * VGGISH_SAMPLE_RATE))
    if shift > 0:
        mono = np.concatenate([np.zeros(shift, dtype=np.float32), mono])
    elif shift < 0:
        mono = mono[-shift:]
    if mono.size == 0 or not np.isfinite(mono).all():
        raise DataError(path, "the audio track decodes to no (finite) samples")

    def read(seconds: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
        try:
            batch = decoder.get_frames_at([indices[s] for s in seconds])
        except (RuntimeError, IndexError) as error:
            raise DataError(path, f"cannot decode frames of seconds {list(seconds)} ({error})") from error
        return batch.data, [float(t) - begin for t in batch.pts_seconds.tolist()]

    return Footage(
        source=path,
        num_seconds=num_seconds,
        height=int(metadata.height),
        width=int(metadata.width),
        waveform=np.ascontiguousarray(mono, dtype=np.float32),
        names=[f"frame_{s:05d}" for s in range(num_seconds)],
        read=read,
        audio_source=path,
    )


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def open_frames_folder(folder: str | os.PathLike, audio: str | os.PathLike | None = None) -> Footage:
    """A folder of frames (one image per second, sorted by name) plus a WAV."""
    from avseg.data.avsbench import read_rgb_image

    folder = Path(folder)
    images = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not images:
        raise DataError(folder, f"the frames folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    if audio is None:
        wavs = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".wav")
        if len(wavs) != 1:
            found = "no .wav file" if not wavs else f"{len(wavs)} .wav files ({', '.join(p.name for p in wavs)})"
            raise DataError(folder, f"the frames folder has {found}; give the clip's audio with audio=PATH")
        audio = wavs[0]
    audio = Path(audio)
    wav, sample_rate = load_wav(audio)
    first = read_rgb_image(images[0])
    height, width = first.shape[:2]

    def read(seconds: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
        arrays = []
        for s in seconds:
            array = first if s == 0 else read_rgb_image(images[s])
            if array.shape[:2] != (height, width):
                raise DataError(
                    images[s], f"frame is {array.shape[1]}x{array.shape[0]}, the first frame is {width}x{height}"
                )
            arrays.append(array)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), [float(s) for s in seconds]

    return Footage(
        source=folder,
        num_seconds=len(images),
        height=int(height),
        width=int(width),
        waveform=_resample_to_16k(wav, sample_rate),
        names=[p.stem for p in images],
        read=read,
        audio_source=audio,
    )


def open_input(path: str | os.PathLike, audio: str | os.PathLike | None = None) -> Footage:
    """A frames folder (a directory) or a video file."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_dir():
        return open_frames_folder(path, audio)
    if not path.exists():
        raise DataError(path, "input not found (expected a video file or a folder of frames)")
    if audio is not None:
        raise ConfigError(f"audio={audio}: only for a frames folder; a video's own audio track is used")
    return open_video(path)


# ---------------------------------------------------------------------------------------------
# clips


def cut_clips(num_seconds: int, clip_length: int) -> list[tuple[int, int]]:
    """(first second, real frames) of consecutive clips of ``clip_length`` seconds; the last one
    may be shorter (padded later)."""
    if num_seconds < 1 or clip_length < 1:
        raise ValueError(f"cut_clips: need num_seconds >= 1 and clip_length >= 1, got {num_seconds}, {clip_length}")
    return [(start, min(clip_length, num_seconds - start)) for start in range(0, num_seconds, clip_length)]


def clip_audio(
    waveform: np.ndarray,
    *,
    start_second: int,
    num_real: int,
    clip_length: int,
    fit_mode: str,
    source: Path | None = None,
) -> torch.Tensor:
    """Log-mel [clip_length, 1, 96, 64] of seconds ``start_second .. start_second + num_real`` of a
    16 kHz waveform, fitted to ``clip_length`` with ``fit_mode``; padded frames (t >= num_real) zero."""
    begin = start_second * VGGISH_SAMPLE_RATE
    segment = waveform[begin : begin + num_real * VGGISH_SAMPLE_RATE]
    examples = log_mel_examples(segment, VGGISH_SAMPLE_RATE)
    if examples.shape[0] == 0 and fit_mode == "repeat_last":
        raise DataError(
            source or "audio",
            f"the audio ends at {waveform.shape[0] / VGGISH_SAMPLE_RATE:.2f} s: no audio for the clip starting at "
            f"second {start_second}",
        )
    audio = fit_examples(examples, clip_length, fit_mode)  # type: ignore[arg-type]
    if num_real < clip_length:
        audio = audio.clone()
        audio[num_real:] = 0  # as the AVSS loader (and the official model) zero padded frames' audio
    return audio


def prepare_clip(
    frames_uint8: torch.Tensor, audio: torch.Tensor, *, clip_length: int, image_size: int
) -> dict[str, torch.Tensor]:
    """Model input of one clip: frames uint8 [r, 3, H, W] (r <= clip_length real frames) ->
    ``frames`` float [T, 3, S, S] (eval transform; padded frames zero after normalisation),
    ``frame_valid`` bool [T], ``audio`` [T, ...] as given."""
    from avseg.data.transforms import ClipTransform

    num_real = frames_uint8.shape[0]
    if not 1 <= num_real <= clip_length:
        raise ValueError(f"prepare_clip: {num_real} frames for a clip of {clip_length}")
    if audio.shape[0] != clip_length:
        raise ValueError(f"prepare_clip: audio has {audio.shape[0]} frames, the clip {clip_length}")
    transform = ClipTransform(image_size=image_size, mode="eval")
    dummy_masks = torch.zeros(num_real, *frames_uint8.shape[-2:], dtype=torch.long)
    frames, _ = transform(frames_uint8, dummy_masks)
    out = torch.zeros(clip_length, 3, image_size, image_size, dtype=torch.float32)
    out[:num_real] = frames
    frame_valid = torch.zeros(clip_length, dtype=torch.bool)
    frame_valid[:num_real] = True
    return {"frames": out, "frame_valid": frame_valid, "audio": audio}


# ---------------------------------------------------------------------------------------------
# outputs


class OverlayVideoWriter:
    """Streams overlay frames (1 fps) and the matching audio into an mp4 with torchcodec's
    multi-stream ``Encoder``; a context manager (the file is complete when the block ends; `predict`
    writes it through `avseg.io.atomic_output`). H.264 in yuv420p needs even sides: odd frames get
    their last row / column repeated."""

    def __init__(self, path: Path, *, height: int, width: int, with_audio: bool) -> None:
        from torchcodec.encoders import Encoder

        self.height, self.width = height + height % 2, width + width % 2
        self.encoder = Encoder()
        self.video = self.encoder.add_video(height=self.height, width=self.width, frame_rate=1, device="cpu")
        self.audio = self.encoder.add_audio(sample_rate=VGGISH_SAMPLE_RATE, num_channels=1) if with_audio else None
        self.encoder.open_file(str(path))

    def add(self, frames: torch.Tensor, waveform: np.ndarray | None) -> None:
        """frames uint8 [n, 3, H, W]; waveform float [n * 16000] (the same seconds) or None."""
        pad_h, pad_w = self.height - frames.shape[-2], self.width - frames.shape[-1]
        if pad_h or pad_w:
            frames = F.pad(frames.float(), (0, pad_w, 0, pad_h), mode="replicate").to(torch.uint8)
        self.video.add_frames(frames.contiguous())
        if self.audio is not None and waveform is not None and waveform.size:
            samples = torch.from_numpy(np.clip(waveform, -1.0, 1.0).astype(np.float32))[None]
            self.audio.add_samples(samples.contiguous())

    def __enter__(self) -> OverlayVideoWriter:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            self.encoder.close()
        except RuntimeError:
            if kind is None:
                raise
            # already failing: the half-written file is removed by atomic_output


def _class_fractions(labels: np.ndarray) -> dict[str, float]:
    from avseg.data.palette import AVSS_CLASSES

    values, counts = np.unique(labels, return_counts=True)
    total = float(labels.size)
    return {
        AVSS_CLASSES[int(v)] if int(v) < len(AVSS_CLASSES) else str(int(v)): round(float(c) / total, 6)
        for v, c in zip(values, counts)
    }


# ---------------------------------------------------------------------------------------------
# prediction


def predict(
    module: Any,
    footage: Footage,
    out_dir: Path,
    *,
    clip_length: int,
    image_size: int,
    device: torch.device,
    batch_size: int = 1,
    overlay: bool = True,
    overlay_alpha: float = 0.5,
    vggish: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Runs the model over ``footage`` clip by clip; writes masks, predictions.json, overlay.mp4."""
    from avseg.data.collate import collate_clips

    semantic = bool(module.semantic)
    fit_mode = model_layout(semantic).fit_mode
    embeddings = model_audio_input(module) == "embeddings"
    if embeddings and vggish is None:
        raise ConfigError(
            "this checkpoint's audio encoder takes precomputed VGGish embeddings (audio_encoder.input=embeddings): "
            "give vggish_weights=PATH (a torchvggish state dict) so predict can compute them from the audio"
        )
    masks_dir = out_dir / "masks"
    entries: list[dict[str, Any]] = []
    clips = cut_clips(footage.num_seconds, clip_length)
    net = module.net.eval()
    with contextlib.ExitStack() as stack:
        writer = None
        if overlay:  # written to a temp file, renamed over overlay.mp4 when complete
            video_path = stack.enter_context(atomic_output(out_dir / "overlay.mp4"))
            writer = stack.enter_context(
                OverlayVideoWriter(video_path, height=footage.height, width=footage.width, with_audio=True)
            )
        for first in range(0, len(clips), batch_size):
            group = clips[first : first + batch_size]
            items, raw = [], []
            for start, num_real in group:
                seconds = list(range(start, start + num_real))
                frames_uint8, times = footage.read(seconds)
                audio = clip_audio(
                    footage.waveform,
                    start_second=start,
                    num_real=num_real,
                    clip_length=clip_length,
                    fit_mode=fit_mode,
                    source=footage.audio_source,
                )
                if embeddings:
                    with torch.inference_mode():
                        audio = vggish(audio.to(device)).float().cpu()
                    audio[num_real:] = 0
                items.append(prepare_clip(frames_uint8, audio, clip_length=clip_length, image_size=image_size))
                raw.append((seconds, frames_uint8, times))
            batch = collate_clips(items)
            size = (footage.height, footage.width)
            with torch.inference_mode():
                # AVSS: argmax at model resolution, labels upsampled by nearest neighbour;
                # binary: logits upsampled bilinearly to the footage's size
                scores = predict_scores(
                    net,
                    batch["frames"].to(device),
                    batch["audio"].to(device),
                    batch["frame_valid"].to(device),
                    semantic=semantic,
                    size=image_size if semantic else size,
                )
                labels = scores_to_labels(scores, semantic=semantic)
                if semantic:
                    labels = F.interpolate(labels.float(), size=size, mode="nearest").long()
            labels = labels.cpu()
            for row, (seconds, frames_uint8, times) in enumerate(raw):
                overlays = []
                for t, second in enumerate(seconds):
                    label_map = labels[row, t].numpy()
                    name = f"{footage.names[second]}.png"
                    write_label_png(masks_dir / name, label_map, semantic=semantic)
                    entry: dict[str, Any] = {"second": second, "time_s": round(times[t], 6), "mask": f"masks/{name}"}
                    if semantic:
                        entry["classes"] = _class_fractions(label_map)
                    else:
                        entry["foreground_fraction"] = round(float(label_map.mean()), 6)
                    entries.append(entry)
                    if writer is not None:
                        overlays.append(
                            overlay_labels(frames_uint8[t], label_map, semantic=semantic, alpha=overlay_alpha)
                        )
                if writer is not None:
                    begin = seconds[0] * VGGISH_SAMPLE_RATE
                    segment = footage.waveform[begin : begin + len(seconds) * VGGISH_SAMPLE_RATE]
                    segment = np.pad(segment, (0, len(seconds) * VGGISH_SAMPLE_RATE - segment.shape[0]))
                    writer.add(torch.stack(overlays), segment)
    summary = {
        "input": str(footage.source),
        "audio": str(footage.audio_source) if footage.audio_source is not None else None,
        "num_seconds": footage.num_seconds,
        "clip_length": clip_length,
        "num_clips": len(clips),
        "image_size": image_size,
        "semantic": semantic,
        "frames": entries,
        "overlay": "overlay.mp4" if overlay else None,
    }
    write_json_atomic(out_dir / "predictions.json", summary, sort_keys=False)
    return summary


def _training_image_size(ckpt_path: Path) -> int | None:
    config = training_run_config(ckpt_path)
    if config is None:
        return None
    value = OmegaConf.select(OmegaConf.load(config), "data.image_size", default=None)
    return int(value) if value is not None else None


def run(cfg: DictConfig, *, output_dir: Path) -> dict[str, Any]:
    """Predicts for ``cfg.input``; writes into ``cfg.out`` or, when null, ``output_dir``."""
    started = time.perf_counter()
    for key in ("ckpt_path", "input"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"{key} is required: python -m avseg.predict ckpt_path=PATH input=VIDEO_OR_FRAMES_DIR")
    ckpt_path = Path(os.path.expanduser(str(cfg.ckpt_path)))
    input_path = Path(os.path.expanduser(str(cfg.input)))
    out_dir = Path(os.path.expanduser(str(cfg.out))) if cfg.get("out") else Path(output_dir)
    if input_path.is_dir() and out_dir.resolve().is_relative_to(input_path.resolve()):
        raise ConfigError(
            f"out={out_dir}: lies inside the input frames folder {input_path}; predict never writes into the input"
        )
    device = resolve_device(str(cfg.device))
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: an int >= 1")
    module = load_model(ckpt_path, device)
    clip_length = (
        int(cfg.clip_length) if cfg.get("clip_length") is not None else model_layout(module.semantic).num_frames
    )
    if clip_length < 1:
        raise ConfigError(f"clip_length={clip_length}: an int >= 1 (null = 10 for AVSS models, 5 otherwise)")
    image_size = cfg.get("image_size")
    if image_size is None:
        image_size = _training_image_size(ckpt_path)
        if image_size is None:
            raise ConfigError(
                f"image_size=null and no training run config next to {ckpt_path} (<run dir>/.hydra/config.yaml): "
                "give the image size the model was trained at, e.g. image_size=224"
            )
    image_size = int(image_size)
    vggish = None
    if cfg.get("vggish_weights"):
        from avseg.models.audio import VGGish

        vggish = VGGish.from_state_dict_file(Path(os.path.expanduser(str(cfg.vggish_weights)))).to(device).eval()
    footage = open_input(input_path, cfg.get("audio"))
    summary = predict(
        module,
        footage,
        out_dir,
        clip_length=clip_length,
        image_size=image_size,
        device=device,
        batch_size=batch_size,
        overlay=bool(cfg.overlay),
        overlay_alpha=float(cfg.overlay_alpha),
        vggish=vggish,
    )
    log.info(
        f"{footage.num_seconds} frames ({summary['num_clips']} clips of {clip_length}) from {footage.source}\n"
        f"masks        : {out_dir / 'masks'}\n"
        f"predictions  : {out_dir / 'predictions.json'}\n"
        + (f"overlay      : {out_dir / 'overlay.mp4'}\n" if cfg.overlay else "")
        + f"time         : {time.perf_counter() - started:.1f} s"
    )
    return summary


@hydra.main(config_path="../../conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    # a bad input or config: one clear `error:` line, not a deep stack trace (avseg.cli)
    return run_main(run, cfg, output_dir=Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
