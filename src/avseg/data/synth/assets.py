"""SynthAVS real assets: finding the Debian packages (gcompris-qt-data, fluid-soundfont-gm,
fluidsynth, librsvg2-bin), their versions and licences, rasterising drawings, decoding recordings
and rendering notes of General MIDI instruments with a soundfont.

Nothing is copied into the repository: everything is read from the installed packages (root `/`)
or from a folder holding extracted packages (`assets_dir`, see docs/SYNTHAVS.md), when a tree is
generated.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avseg.data.synth.options import SAMPLE_RATE
from avseg.data.synth.rcc import RccArchive
from avseg.errors import ConfigError, DataError

APT_LINE = "apt-get install -y gcompris-qt-data fluidsynth fluid-soundfont-gm librsvg2-bin"
RCC_DIR = "usr/share/gcompris-qt/rcc"
DEFAULT_SOUNDFONT = "usr/share/sounds/sf2/FluidR3_GM.sf2"
#: Which package ships what (the file or program whose absence names the package).
PACKAGE_OF: dict[str, str] = {
    f"{RCC_DIR}/instruments.rcc": "gcompris-qt-data",
    f"{RCC_DIR}/explore_farm_animals.rcc": "gcompris-qt-data",
    f"{RCC_DIR}/details.rcc": "gcompris-qt-data",  # the background pictures
    DEFAULT_SOUNDFONT: "fluid-soundfont-gm",
    "fluidsynth": "fluidsynth",
    "rsvg-convert": "librsvg2-bin",
}
_NOTE_SECONDS = 1.2  # each bank note is held this long (melody notes are cut shorter)
_SLOT_SECONDS = 1.6  # one note per slot in the bank's MIDI file; the rest is the release tail
_MIDI_TICKS_PER_SECOND = 960  # 480 ticks per quarter note at 120 bpm


def missing_error(package: str, what: str) -> ConfigError:
    return ConfigError(
        f"SynthAVS assets=real needs the Debian package {package} ({what} not found); install it with "
        f"`sudo {APT_LINE}`, or set assets_dir= to a folder of extracted packages (docs/SYNTHAVS.md)"
    )


def require_all(root: Path, *, soundfont: str | None, melodies: bool = True, pictures: bool = True) -> None:
    """One ConfigError naming every missing package (files under `root`, programs on PATH)."""
    missing: dict[str, str] = {}
    for relative, package in PACKAGE_OF.items():
        if "/" in relative:
            if relative == DEFAULT_SOUNDFONT and (soundfont is not None or not melodies):
                continue
            if relative.endswith("/details.rcc") and not pictures:
                continue
            if not (root / relative).is_file():
                missing.setdefault(package, str(root / relative))
        elif (relative != "fluidsynth" or melodies) and shutil.which(relative) is None:
            missing.setdefault(package, f"the program {relative!r} on PATH")
    if missing:
        listed = "; ".join(f"{package} ({what} not found)" for package, what in missing.items())
        raise ConfigError(
            f"SynthAVS assets=real needs the Debian package(s) {listed}; install them with "
            f"`sudo {APT_LINE}`, or set assets_dir= to a folder of extracted packages (docs/SYNTHAVS.md)"
        )


def asset_root(assets_dir: str | os.PathLike | None) -> Path:
    """`/` (the installed packages) or the folder of extracted packages."""
    if assets_dir is None:
        return Path("/")
    root = Path(assets_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"assets_dir: {str(root)!r} is not a folder (expected extracted packages, docs/SYNTHAVS.md)")
    return root


def require_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise missing_error(PACKAGE_OF.get(relative, "gcompris-qt-data"), str(path))
    return path


def require_program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise missing_error(PACKAGE_OF[name], f"the program {name!r} on PATH")
    return found


def resolve_soundfont(root: Path, soundfont: str | None) -> Path:
    if soundfont is None:
        return require_file(root, DEFAULT_SOUNDFONT)
    path = Path(soundfont).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"soundfont: {str(path)!r} is not a file (a SoundFont 2 .sf2, e.g. {'/' + DEFAULT_SOUNDFONT})"
        )
    return path


@lru_cache(maxsize=8)
def rcc(path: Path) -> RccArchive:
    return RccArchive(path)


# ---------------------------------------------------------------------------------------------
# Versions and licences


_PROGRAM_OF = {"fluidsynth": "fluidsynth", "librsvg2-bin": "rsvg-convert"}


def _dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def package_version(package: str, root: Path) -> str:
    """The installed version (dpkg-query) or, for extracted packages, the first line of the
    package's Debian changelog. Programs (fluidsynth, rsvg-convert) are the ones on PATH: their
    package's installed version, else the program's own `--version` line."""
    if package in _PROGRAM_OF:
        version = _dpkg_version(package)
        if version is not None:
            return version
        program = require_program(_PROGRAM_OF[package])
        result = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
        lines = (result.stdout or result.stderr).strip().splitlines()
        if result.returncode != 0 or not lines:
            raise missing_error(package, f"a version from `{program} --version`")
        return f"{lines[0].strip()} (not a Debian package)"
    if root == Path("/"):
        version = _dpkg_version(package)
        if version is not None:
            return version
    changelog = root / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        first = gzip.decompress(changelog.read_bytes()).decode("utf-8", "replace").splitlines()[0]
    except (OSError, IndexError, EOFError) as err:
        raise missing_error(package, f"its version (dpkg-query, {changelog})") from err
    if "(" not in first or ")" not in first:
        raise DataError(changelog, f"first line {first!r} holds no version in parentheses")
    return first[first.index("(") + 1 : first.index(")")]


@dataclass(frozen=True)
class Licence:
    """The DEP-5 stanza of a package's copyright file that covers one file."""

    package: str
    file: str
    licence: str
    copyright: str

    def describe(self) -> dict[str, str]:
        return {"package": self.package, "file": self.file, "licence": self.licence, "copyright": self.copyright}


@lru_cache(maxsize=16)
def _copyright_stanzas(path: Path) -> tuple[tuple[tuple[str, ...], str, str], ...]:
    """(file patterns, licence short name, copyright text) per `Files:` stanza, in file order."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise DataError(path, f"cannot read the package's copyright file: {err}") from err
    stanzas = []
    for block in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key is not None:
                fields[key].append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip()
                fields[key] = [value.strip()]
        if "Files" in fields:
            patterns = tuple(p for part in fields["Files"] for p in part.split())
            licence = fields.get("License", [""])[0]
            holders = " / ".join(x for x in fields.get("Copyright", []) if x and x != ".")
            stanzas.append((patterns, licence, holders))
    return tuple(stanzas)


def licence_of(package: str, file: str, root: Path) -> Licence:
    """The licence of `file` (a path in the package's source tree) from
    `usr/share/doc/<package>/copyright`: the last matching `Files:` stanza wins (DEP-5). A copyright
    file without `Files:` stanzas (free-form) is summarised by its `License` lines."""
    path = root / "usr/share/doc" / package / "copyright"
    if not path.is_file():
        raise missing_error(package, str(path))
    match = None
    for patterns, licence, holders in _copyright_stanzas(path):
        if any(fnmatch.fnmatchcase(file, p) for p in patterns):
            match = (licence, holders)
    if match is None:
        match = (_free_form_licence(path), f"see {path}")
    return Licence(package=package, file=file, licence=match[0], copyright=match[1])


def _free_form_licence(path: Path) -> str:
    """A free-form (pre-DEP-5) copyright file: its `License:` value, or the first statement under
    a bare `License:` line (e.g. fluid-soundfont-gm's quote of its README)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("License:"):
            value = line.split(":", 1)[1].strip()
            if value:
                return value
            statement = []
            for follow in lines[i + 1 :]:
                if follow.strip():
                    statement.append(follow.strip())
                elif statement:
                    break
            if statement:
                return " ".join(statement)
    raise DataError(path, "names no licence (no `License:` field)")


def owning_package(path: Path) -> str | None:
    """The Debian package that installed `path` (dpkg-query -S), or None."""
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-S", str(path.resolve())], capture_output=True, text=True, check=False)
    if result.returncode != 0 or ":" not in result.stdout:
        return None
    return result.stdout.split(":", 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# Pictures and recordings


def rasterise_svg(svg: bytes, size: int, *, source: str) -> np.ndarray:
    """The drawing scaled to fit a `size` x `size` square (aspect kept, centred): uint8 RGBA
    [size, size, 4] from rsvg-convert (librsvg2-bin)."""
    program = require_program("rsvg-convert")
    result = subprocess.run(
        [program, "-a", "-w", str(size), "-h", str(size), "-f", "png"],
        input=svg,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise DataError(source, f"rsvg-convert failed: {result.stderr.decode(errors='replace').strip()}")
    drawing = np.asarray(Image.open(io.BytesIO(result.stdout)).convert("RGBA"))
    canvas = np.zeros((size, size, 4), dtype=np.uint8)
    h, w = drawing.shape[:2]
    y0, x0 = (size - h) // 2, (size - w) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = drawing
    return canvas


def decode_recording(data: bytes, *, source: str) -> np.ndarray:
    """A recording as float64 mono at SAMPLE_RATE, with silences longer than 0.15 s shortened to
    0.15 s (so the sound is present in every second it is played)."""
    import soundfile
    from scipy.signal import resample_poly

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float64", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DataError(source, f"cannot decode the recording: {err}") from err
    mono = samples.mean(axis=1)
    divisor = np.gcd(SAMPLE_RATE, rate)
    mono = resample_poly(mono, SAMPLE_RATE // divisor, rate // divisor)
    hop = SAMPLE_RATE // 100
    frames = mono[: len(mono) // hop * hop].reshape(-1, hop)
    rms = np.sqrt(np.mean(frames**2, axis=1))
    active = rms > 0.03 * max(float(rms.max()), 1e-12)
    keep = np.ones(len(active), dtype=bool)
    max_gap = 15  # frames of 10 ms
    run = 0
    for i, on in enumerate(active):
        run = 0 if on else run + 1
        keep[i] = on or run <= max_gap
    # Leading and trailing silence go entirely.
    on_idx = np.flatnonzero(active)
    keep[: on_idx[0]] = False
    keep[on_idx[-1] + 1 :] = False
    return frames[keep].reshape(-1)


# ---------------------------------------------------------------------------------------------
# Notes of General MIDI instruments (fluidsynth + a soundfont)


def _vlq(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def midi_file(notes: Sequence[tuple[int, int, float, float]], velocity: int = 100) -> bytes:
    """A type-0 Standard MIDI File on channel 1: per note (GM program 0-127, pitch, start s,
    length s), a program change at its start, note on and note off; 120 bpm."""
    events = []
    for program, pitch, start, length in notes:
        on = round(start * _MIDI_TICKS_PER_SECOND)
        off = round((start + length) * _MIDI_TICKS_PER_SECOND)
        events.append((on, 1, bytes([0xC0, program])))
        events.append((on, 2, bytes([0x90, pitch, velocity])))
        events.append((off, 0, bytes([0x80, pitch, 0])))
    events.sort(key=lambda e: (e[0], e[1]))
    body = bytearray(b"\x00\xff\x51\x03\x07\xa1\x20")  # tempo 500000 us per quarter note
    last = 0
    for tick, _, message in events:
        body += _vlq(tick - last) + message
        last = tick
    body += _vlq(_MIDI_TICKS_PER_SECOND) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(body)) + bytes(body)


def render_notes(soundfont: Path, notes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Each (GM program, MIDI pitch) held for 1.2 s and rendered by fluidsynth (reverb and chorus
    off, mono mix): float64 [1.6 s * SAMPLE_RATE] per note. One fluidsynth call for all notes."""
    import soundfile

    program = require_program("fluidsynth")
    slot = round(_SLOT_SECONDS * SAMPLE_RATE)
    ordered = sorted(set(notes))
    score = [(p, n, i * _SLOT_SECONDS, _NOTE_SECONDS) for i, (p, n) in enumerate(ordered)]
    with tempfile.TemporaryDirectory(prefix="avseg-notes-") as tmp:
        midi_path, wav_path = Path(tmp) / "notes.mid", Path(tmp) / "notes.wav"
        midi_path.write_bytes(midi_file(score))
        result = subprocess.run(
            [
                program,
                "-ni",
                "-q",
                "-R",
                "0",
                "-C",
                "0",
                "-g",
                "0.6",
                "-r",
                str(SAMPLE_RATE),
                "-T",
                "wav",
                "-O",
                "s16",
                "-F",
                str(wav_path),
                str(soundfont),
                str(midi_path),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not wav_path.is_file():
            raise DataError(soundfont, f"fluidsynth could not render notes: {result.stderr.strip()[-500:]}")
        audio, rate = soundfile.read(wav_path, dtype="float64", always_2d=True)
    if rate != SAMPLE_RATE:
        raise DataError(soundfont, f"fluidsynth rendered at {rate} Hz, expected {SAMPLE_RATE}")
    mono = audio.mean(axis=1)
    mono = np.concatenate([mono, np.zeros(max(0, slot * len(ordered) - len(mono)))])
    bank = {}
    for i, key in enumerate(ordered):
        note = mono[i * slot : (i + 1) * slot]
        if float(np.sqrt(np.mean(note**2))) < 1e-5:
            raise DataError(soundfont, f"GM program {key[0]} pitch {key[1]} rendered silent")
        bank[key] = note
    return bank


def describe_file(path: Path) -> dict[str, Any]:
    return {"path": str(path), "bytes": path.stat().st_size}
