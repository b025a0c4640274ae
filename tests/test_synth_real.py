"""SynthAVS `assets=real`: the Qt resource reader, the real-asset trees (layouts, determinism, masks
as the drawings' alpha after occlusion, audible sources, sidecar sources, versions and licences) and
the errors when a package is missing.

Needs the Debian packages gcompris-qt-data, fluidsynth, fluid-soundfont-gm and librsvg2-bin (.ci/run
installs them, with timgm6mb-soundfont for the timbre-shift test). Where they are missing these tests
are skipped, unless AVSEG_REQUIRE_REAL_ASSETS=1 (set by .ci/run) turns the skip into a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avseg.data import synth
from avseg.data.check import check_tree
from avseg.data.layout import LAYOUTS
from avseg.data.palette import AVSS_CLASSES, label2idx_json
from avseg.data.synth import assets, backgrounds, real
from avseg.data.synth.pictures import _Layout, _render
from avseg.data.synth.rcc import RccArchive
from avseg.errors import ConfigError, DataError

RCC = Path("/usr/share/gcompris-qt/rcc")
TIMGM = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
_NEEDED = [RCC / "instruments.rcc", RCC / "explore_farm_animals.rcc", Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")]
_MISSING = [str(p) for p in _NEEDED if not p.is_file()] + [
    name for name in ("fluidsynth", "rsvg-convert") if shutil.which(name) is None
]
if os.environ.get("AVSEG_REQUIRE_REAL_ASSETS") == "1":
    # CI installs every package, the timbre-shift soundfont included: nothing here may skip there
    _required = _MISSING + ([] if TIMGM.is_file() else [str(TIMGM)])
    if _required:
        raise RuntimeError(f"AVSEG_REQUIRE_REAL_ASSETS=1 but missing: {_required}; run `sudo {assets.APT_LINE}`")
needs_packages = pytest.mark.skipif(bool(_MISSING), reason=f"missing {_MISSING}: `sudo {assets.APT_LINE}`")

SMALL = {"assets": "real", "image_size": 48, "num_classes": 4, "clips_per_split": {"train": 3, "val": 1, "test": 2}}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# The .rcc reader, on a bundle built here byte by byte (version 2 nodes, one zlib entry)


def _tiny_rcc(compressed_payload: bytes | None = None) -> bytes:
    names = b""
    offsets = {}
    for name in ("dir", "a.txt", "b.bin"):
        offsets[name] = len(names)
        encoded = name.encode("utf-16-be")
        names += struct.pack(">HI", len(name), 0) + encoded
    plain = b"hello rcc"
    packed = compressed_payload
    if packed is None:
        packed = struct.pack(">I", 1000) + zlib.compress(b"x" * 1000)
    data = struct.pack(">I", len(plain)) + plain
    second = len(data)
    data += struct.pack(">I", len(packed)) + packed

    def node(name_off: int, flags: int, a: int, b: int, c: int | None = None) -> bytes:
        if flags & 2:
            body = struct.pack(">IHII", name_off, flags, a, b)
        else:
            body = struct.pack(">IHHHI", name_off, flags, a, b, c)
        return body + struct.pack(">Q", 0)

    tree = (
        node(0, 2, 1, 1)  # root: one child, node 1
        + node(offsets["dir"], 2, 2, 2)  # dir: two children from node 2
        + node(offsets["a.txt"], 0, 0, 0, 0)
        + node(offsets["b.bin"], 1, 0, 0, second)
    )
    header_size = 20
    data_off = header_size
    names_off = data_off + len(data)
    tree_off = names_off + len(names)
    return b"qres" + struct.pack(">IIII", 2, tree_off, data_off, names_off) + data + names + tree


def test_rcc_reader_reads_plain_and_zlib_entries(tmp_path):
    path = tmp_path / "tiny.rcc"
    path.write_bytes(_tiny_rcc())
    archive = RccArchive(path)
    assert archive.names() == ["dir/a.txt", "dir/b.bin"]
    assert archive.read("dir/a.txt") == b"hello rcc"
    assert archive.read("dir/b.bin") == b"x" * 1000
    with pytest.raises(DataError, match="no resource"):
        archive.read("dir/c")


def test_rcc_reader_rejects_bad_bundles(tmp_path):
    bad = tmp_path / "bad.rcc"
    bad.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(DataError, match="qres"):
        RccArchive(bad)
    good = _tiny_rcc()
    bad.write_bytes(good[: len(good) - 30])  # the tree table cut short
    with pytest.raises(DataError, match="truncated"):
        RccArchive(bad)
    wrong_size = struct.pack(">I", 999) + zlib.compress(b"x" * 1000)  # header disagrees with the data
    bad.write_bytes(_tiny_rcc(wrong_size))
    with pytest.raises(DataError, match="header says 999"):
        RccArchive(bad).read("dir/b.bin")


@needs_packages
def test_rcc_reader_on_the_gcompris_bundles():
    archive = RccArchive(RCC / "instruments.rcc")
    prefix = "gcompris/src/activities/instruments/resource/"
    assert {prefix + "violin.svg", prefix + "violin.ogg", prefix + "cello.svg"} <= set(archive.names())
    assert archive.read(prefix + "violin.ogg")[:4] == b"OggS"
    svg = archive.read(prefix + "cello.svg")  # stored zlib-compressed in the bundle
    assert b"<svg" in svg[:2000]


# ---------------------------------------------------------------------------------------------
# Missing packages and options


def test_missing_package_names_it_and_the_apt_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        synth.cache_key("ms3", synth.resolve_options("ms3", assets="real", assets_dir=str(tmp_path)))
    message = str(info.value)
    assert "gcompris-qt-data" in message and "apt-get install -y gcompris-qt-data fluidsynth" in message
    with pytest.raises(ConfigError, match="assets_dir"):
        synth.generate(tmp_path / "t", "ms3", assets="real", assets_dir=str(tmp_path / "nowhere"))
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="only used with assets=real"):
        synth.resolve_options("ms3", soundfont="/x.sf2")
    with pytest.raises(ConfigError, match="assets"):
        synth.resolve_options("ms3", assets="photos")
    with pytest.raises(ConfigError, match="num_classes"):
        synth.resolve_options("ms3", assets="real", num_classes=23)
    for key, value in (("backgrounds", "photo"), ("instrument_sounds", "recording")):
        with pytest.raises(ConfigError, match="only used with assets=real"):
            synth.resolve_options("ms3", **{key: value})
        with pytest.raises(ConfigError, match=key):
            synth.resolve_options("ms3", assets="real", **{key: "nonsense"})
    resolved = synth.resolve_options("ms3", assets="real")
    assert (resolved["backgrounds"], resolved["instrument_sounds"]) == ("photo", "melody")
    # The synthetic mode's resolved options (hence cache keys and sidecars) are what they were.
    assert "assets" not in synth.resolve_options("ms3") and "backgrounds" not in synth.resolve_options("ms3")


@needs_packages
def test_missing_soundfont_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="soundfont"):
        synth.generate(tmp_path / "t", "ms3", soundfont=str(tmp_path / "none.sf2"), **SMALL)


@needs_packages
def test_assets_dir_of_extracted_packages_gives_the_same_media(real_trees, tmp_path):
    """`assets_dir=` (packages extracted with dpkg-deb -x, as docs/SYNTHAVS.md tells users without
    root): the same frames, masks and audio as the installed packages; the sidecar says where from."""
    extracted = tmp_path / "extracted"
    for relative in (
        "usr/share/gcompris-qt/rcc/instruments.rcc",
        "usr/share/gcompris-qt/rcc/explore_farm_animals.rcc",
        "usr/share/gcompris-qt/rcc/details.rcc",
        "usr/share/sounds/sf2/FluidR3_GM.sf2",
    ):
        (extracted / relative).parent.mkdir(parents=True, exist_ok=True)
        (extracted / relative).symlink_to(Path("/") / relative)
    for package in ("gcompris-qt-data", "fluid-soundfont-gm"):
        doc = extracted / "usr/share/doc" / package
        doc.mkdir(parents=True)
        for name in ("copyright", "changelog.Debian.gz"):
            (doc / name).symlink_to(Path("/usr/share/doc") / package / name)
    tree = synth.generate(tmp_path / "ms3", "ms3", assets_dir=str(extracted), **SMALL)
    media = lambda files: {k: v for k, v in files.items() if k.endswith((".png", ".wav", ".csv"))}  # noqa: E731
    assert media(_files(tree)) == media(_files(real_trees["ms3"]))
    sidecar = json.loads((tree / synth.SIDECAR_NAME).read_text())
    assert sidecar["classes"][0]["drawing"]["bundle"].startswith(str(extracted))
    assert sidecar["assets"]["packages"]["gcompris-qt-data"] == assets.package_version("gcompris-qt-data", Path("/"))
    assert sidecar["backgrounds"]["pictures"][0]["bundle"].startswith(str(extracted))


# ---------------------------------------------------------------------------------------------
# The classes


@needs_packages
def test_every_real_class_is_an_avss_class_with_a_drawing_a_sound_and_a_licence():
    assert len(real.REAL_CLASSES) == synth.options.MAX_REAL_CLASSES
    catalogue = real.real_catalogue(len(real.REAL_CLASSES), None, None)
    assert len({spec.name for spec in catalogue}) == len(catalogue)
    for spec in catalogue:
        assert AVSS_CLASSES[spec.avss_index] == spec.name
        alpha = spec.sprite[..., 3]
        assert 0.05 < float((alpha >= 128).mean()) < 0.95, spec.name  # a drawing, not a blank or a box
        parts = [spec.sound[k] for k in ("melody", "recording") if k in spec.sound]
        assert len(parts) == 1 and spec.sound["kind"] in ("melody", "recording"), spec.sound
        for part in (spec.drawing, *parts):
            assert part["package"] and part["licence"] and part["copyright"], (spec.name, part)
        if spec.sound["kind"] == "melody":
            low, high = spec.sound["melody"]["pitch_range"]
            assert set(spec.notes) == set(range(low, high + 1)) and spec.recording is None
        else:
            assert len(spec.recording) > 0.5 * synth.SAMPLE_RATE and spec.notes is None


# ---------------------------------------------------------------------------------------------
# Trees


@pytest.fixture(scope="module")
def real_trees(tmp_path_factory) -> dict[str, Path]:
    if _MISSING:
        pytest.skip(f"missing {_MISSING}")
    base = tmp_path_factory.mktemp("real")
    avss = {**SMALL, "clips_per_split": {"train": 3, "val": 3, "test": 3}}
    return {
        "s4": synth.generate(base / "s4", "s4", **SMALL),
        "ms3": synth.generate(base / "ms3", "ms3", **SMALL),
        "avss": synth.generate(base / "avss", "avss", **avss),
    }


@needs_packages
@pytest.mark.parametrize("subset", ["s4", "ms3", "avss"])
def test_real_trees_pass_the_checker_with_avss_names(real_trees, subset):
    root = real_trees[subset]
    assert check_tree(root, subset, image_size=48) == []
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    assert sidecar["options"]["assets"] == "real"
    assert [c["name"] for c in sidecar["classes"]] == ["violin", "dog", "trumpet", "cat"]
    assert set(sidecar["assets"]["packages"]) >= set(real.PACKAGES)
    assert all(sidecar["assets"]["packages"].values())
    if subset == "avss":
        assert json.loads((root / "label2idx.json").read_text()) == label2idx_json()


@needs_packages
def test_without_the_pictures_bundle_photo_backgrounds_name_the_package(tmp_path):
    """An assets_dir lacking details.rcc: photo backgrounds stop with the package's name;
    backgrounds that need no picture (plain) do not need it."""
    extracted = tmp_path / "extracted"
    for relative in (
        "usr/share/gcompris-qt/rcc/instruments.rcc",
        "usr/share/gcompris-qt/rcc/explore_farm_animals.rcc",
        "usr/share/sounds/sf2/FluidR3_GM.sf2",
    ):
        (extracted / relative).parent.mkdir(parents=True, exist_ok=True)
        (extracted / relative).symlink_to(Path("/") / relative)
    (extracted / "usr/share/doc").mkdir()
    for package in ("gcompris-qt-data", "fluid-soundfont-gm"):
        (extracted / "usr/share/doc" / package).symlink_to(Path("/usr/share/doc") / package)
    with pytest.raises(ConfigError, match=r"gcompris-qt-data \(.*details\.rcc not found\)"):
        synth.cache_key("ms3", synth.resolve_options("ms3", assets="real", assets_dir=str(extracted)))
    plain = synth.resolve_options("ms3", assets="real", assets_dir=str(extracted), backgrounds="plain")
    assert synth.cache_key("ms3", plain)


@needs_packages
def test_real_trees_are_deterministic(real_trees, tmp_path):
    real.real_catalogue.cache_clear()  # rasterise, decode and render the notes again
    again = synth.generate(tmp_path / "ms3", "ms3", **SMALL)
    assert _files(again) == _files(real_trees["ms3"])


@needs_packages
def test_photo_backgrounds_are_crops_of_the_package_pictures(real_trees):
    """Every background pixel of a frame is the pixel of the package's picture that the sidecar
    names, cropped to its box, scaled (PIL bilinear) and flipped as it says, decoded here
    independently; the sidecar lists each picture's package, version, licence and clip count."""
    root = real_trees["ms3"]
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    resolved = synth.resolve_options("ms3", **SMALL)
    catalogue = synth.layouts.catalogue_for(resolved)
    archive = RccArchive(RCC / "details.rcc")
    summary = sidecar["backgrounds"]
    assert summary["kind"] == "photo" and summary["clips"] == len(sidecar["clips"])
    assert sum(p["clips"] for p in summary["pictures"]) == summary["clips"]
    version = assets.package_version("gcompris-qt-data", Path("/"))
    for picture in summary["pictures"]:
        assert picture["package"] == "gcompris-qt-data" and picture["version"] == version
        assert picture["licence"] and picture["copyright"] and picture["member"].endswith("_background.webp")
    assert len(summary["pictures"]) == 13  # the photographs (the 8 paintings are backgrounds=painting)
    for split in synth.SPLITS:
        for index in range(SMALL["clips_per_split"][split]):
            plan = synth.plan_clip(options=resolved, catalogue=catalogue, subset="ms3", split=split, index=index)
            record = sidecar["clips"][plan.clip_id]["background"]
            assert record == plan.background and record["kind"] == "photo"
            member = f"gcompris/src/activities/details/resource/image/{record['picture']}_background.webp"
            pixels = Image.open(io.BytesIO(archive.read(member))).convert("RGB")
            expected = np.asarray(pixels.crop(tuple(record["box"])).resize((48, 48), Image.Resampling.BILINEAR))
            if record["flipped"]:
                expected = expected[:, ::-1]
            files = LAYOUTS["ms3"].clip_files({"name": plan.clip_id, "split": split})
            for t in range(plan.num_frames):
                frame = np.asarray(Image.open(root / files.frames[t]))
                shown = plan.instances[t] == 0
                assert shown.mean() > 0.3
                assert np.array_equal(frame[shown], expected[shown]), (plan.clip_id, t)


@needs_packages
def test_background_kinds_change_only_the_background(real_trees, tmp_path):
    """backgrounds=plain / texture / painting: the same masks, audio, objects and sounding
    seconds as the photo tree; the frames differ only where no object is; the trees pass the
    checker. Deterministic per kind."""
    options = {**SMALL, "clips_per_split": {"train": 0, "val": 1, "test": 2}}
    photo = _files(real_trees["ms3"])
    for kind in ("plain", "texture", "painting"):
        tree = synth.generate(tmp_path / kind, "ms3", backgrounds=kind, **options)
        assert check_tree(tree, "ms3", image_size=48) == []
        files = _files(tree)
        assert set(files) <= set(photo) | {".synth_complete"}
        for name, data in files.items():
            if name.endswith(".wav") or "/gt_masks/" in name:
                assert data == photo[name], (kind, name)
        sidecar = json.loads((tree / synth.SIDECAR_NAME).read_text())
        photo_sidecar = json.loads((real_trees["ms3"] / synth.SIDECAR_NAME).read_text())
        for clip_id, entry in sidecar["clips"].items():
            assert entry["background"]["kind"] == kind
            assert entry["sounding"] == photo_sidecar["clips"][clip_id]["sounding"]
            assert entry["objects"] == photo_sidecar["clips"][clip_id]["objects"]
        assert sidecar["backgrounds"]["kind"] == kind and sidecar["backgrounds"]["clips"] == 3
        if kind == "painting":
            assert {p["name"] for p in sidecar["backgrounds"]["pictures"]} == set(backgrounds.PAINTINGS)
        if kind == "plain":
            files = LAYOUTS["ms3"].clip_files({"name": "synth-ms3-val-00000", "split": "val"})
            frame = np.asarray(Image.open(tree / files.frames[0]))
            colour = sidecar["clips"]["synth-ms3-val-00000"]["background"]["colour"]
            assert (frame == np.asarray(colour, dtype=np.uint8)).all(axis=-1).mean() > 0.3
    again = synth.generate(tmp_path / "plain-again", "ms3", backgrounds="plain", **options)
    assert _files(again) == _files(tmp_path / "plain")


@needs_packages
def test_instruments_can_play_cuts_of_their_recordings(tmp_path):
    """instrument_sounds=recording: the instruments play pitch-, gain- and time-shifted cuts of the
    package's own recording (e.g. violin.ogg); `mixed` draws melody or recording per instance.
    Each stays audible in every second it sounds; the pictures and masks do not change."""
    options = {**SMALL, "clips_per_split": {"train": 4, "val": 0, "test": 0}}
    for mode in ("recording", "mixed"):
        resolved = synth.resolve_options("s4", instrument_sounds=mode, **options)
        catalogue = synth.layouts.catalogue_for(resolved)
        assert catalogue[0].sound["kind"] == mode and catalogue[1].sound["kind"] == "recording"
        assert catalogue[0].sound["recording"]["member"].endswith("instruments/resource/violin.ogg")
        assert ("melody" in catalogue[0].sound) == (mode == "mixed")
    resolved = synth.resolve_options("s4", instrument_sounds="recording", **options)
    catalogue = synth.layouts.catalogue_for(resolved)
    melody_catalogue = synth.layouts.catalogue_for(synth.resolve_options("s4", **options))
    for index in range(4):
        plan = synth.plan_clip(options=resolved, catalogue=catalogue, subset="s4", split="train", index=index)
        (source,) = np.flatnonzero(plan.sounding.any(axis=1))
        played = plan.sources[source]
        assert played["kind"] == "recording" and played["member"].endswith(f"/{real.REAL_CLASSES[index].recording}")
        assert abs(played["pitch_semitones"]) <= 2.0 and all(-6.0 <= g <= 0.0 for g in played["gains_db"])
        per_second = np.sqrt(np.mean(plan.stems[source].reshape(plan.num_frames, -1) ** 2, axis=1))
        assert per_second.min() > 0.2 * per_second.max(), (plan.classes[source].name, per_second)
        same = synth.plan_clip(
            options=synth.resolve_options("s4", **options),
            catalogue=melody_catalogue,
            subset="s4",
            split="train",
            index=index,
        )
        assert np.array_equal(plan.instances, same.instances) and np.array_equal(plan.frames, same.frames)
    kinds = set()
    resolved = synth.resolve_options("ms3", instrument_sounds="mixed", **{**options, "num_classes": 2})
    catalogue = synth.layouts.catalogue_for(resolved)
    for index in range(12):
        plan = synth.plan_clip(options=resolved, catalogue=catalogue, subset="ms3", split="train", index=index)
        kinds |= {
            (s["member"].rsplit("/", 1)[-1] if s["kind"] == "recording" else "melody")
            for s, spec in zip(plan.sources, plan.classes)
            if s is not None and spec.name == "violin"
        }
    assert kinds == {"melody", "violin.ogg"}


@needs_packages
def test_sidecar_lists_the_true_sources_of_every_second(real_trees):
    """Per second the sidecar names exactly the objects whose own sound has energy in it, and the
    sounding objects' `sound` says what they played (melody notes covering the clip, or a cut)."""
    root = real_trees["ms3"]
    sidecar = json.loads((root / synth.SIDECAR_NAME).read_text())
    resolved = synth.resolve_options("ms3", **SMALL)
    catalogue = synth.layouts.catalogue_for(resolved)
    checked = 0
    for split in synth.SPLITS:
        for index in range(SMALL["clips_per_split"][split]):
            plan = synth.plan_clip(options=resolved, catalogue=catalogue, subset="ms3", split=split, index=index)
            entry = sidecar["clips"][plan.clip_id]
            sr = synth.SAMPLE_RATE
            for t, listed in enumerate(entry["sounding"]):
                core = plan.stems[:, t * sr + 80 : (t + 1) * sr - 80]  # outside the 10 ms switch ramps
                heard = {j for j in range(len(plan.classes)) if float(np.sqrt(np.mean(core[j] ** 2))) > 1e-3}
                assert {x["instance"] for x in listed} == heard, (plan.clip_id, t)
                assert all(x["class"] == plan.classes[x["instance"]].name for x in listed)
            for obj in entry["objects"]:
                sounds = bool(plan.sounding[obj["instance"]].any())
                assert (obj["sound"] is not None) == sounds
                if sounds and obj["sound"]["kind"] == "melody":
                    notes = obj["sound"]["notes"]
                    assert notes[0][1] == 0.0 and notes[-1][1] + notes[-1][2] >= plan.num_frames
                checked += 1
    assert checked > 0


@needs_packages
def test_plan_clip_refuses_a_catalogue_of_the_other_mode():
    resolved = synth.resolve_options("ms3", **SMALL)
    with pytest.raises(ConfigError, match="catalogue_for"):
        synth.plan_clip(options=resolved, catalogue=synth.class_catalogue(4), subset="ms3", split="train", index=0)
    with pytest.raises(ConfigError, match="catalogue_for"):
        synth.plan_clip(
            options=synth.resolve_options("ms3"),
            catalogue=synth.catalogue_for(resolved),
            subset="ms3",
            split="train",
            index=0,
        )


@needs_packages
def test_every_class_is_audible_in_its_seconds():
    """s4 clips cycle through the classes: each class's sound carries energy in every second of
    its clip, well above the background noise of the mix."""
    resolved = synth.resolve_options("s4", **{**SMALL, "clips_per_split": {"train": 4, "val": 0, "test": 0}})
    catalogue = synth.layouts.catalogue_for(resolved)
    heard = set()
    for index in range(4):
        plan = synth.plan_clip(options=resolved, catalogue=catalogue, subset="s4", split="train", index=index)
        (source,) = np.flatnonzero(plan.sounding.any(axis=1))
        stem = plan.stems[source].reshape(plan.num_frames, -1)
        per_second = np.sqrt(np.mean(stem**2, axis=1))
        assert per_second.min() > 0.2 * per_second.max(), (plan.classes[source].name, per_second)
        mix = plan.audio.astype(np.float64).reshape(plan.num_frames, -1)
        residual = mix - stem * (np.sum(mix * stem, axis=1, keepdims=True) / np.sum(stem * stem, axis=1, keepdims=True))
        assert np.all(np.sum(residual**2, axis=1) < 0.5 * np.sum(mix**2, axis=1))  # the source dominates
        heard.add(plan.classes[source].name)
    assert heard == {spec.name for spec in catalogue}


@needs_packages
def test_masks_are_the_rasterised_alpha_after_occlusion():
    """Drawings placed 1:1 on the pixel grid (128 px box, no tilt): the instance map equals the
    alpha (>= 128) of the SVGs rasterised here by rsvg-convert, nearer objects covering farther
    ones, and the painted pixels are the drawings' own colours."""
    catalogue = real.real_catalogue(4, None, None)
    classes = [catalogue[0], catalogue[1], catalogue[3]]  # violin (back), dog, cat (front)
    size = 256
    radius = 64.0 / real.SPRITE_EXTENT  # the drawing's box spans exactly 128 pixels
    centres = np.array([[[100.0, 100.0]], [[150.0, 130.0]], [[120.0, 170.0]]])
    layout = _Layout(centre=centres, radius=np.full((3, 1), radius), angle=np.zeros((3, 1)))
    background = np.zeros((size, size, 3), dtype=np.float32)
    frames, instances, _ = _render(layout, classes, np.ones(3), background, real.paint_sprite)

    expected = np.zeros((size, size), dtype=np.uint8)
    colours = np.zeros((size, size, 3), dtype=np.uint8)
    for j, spec in enumerate(classes):
        archive = RccArchive(spec.drawing["bundle"])
        png = subprocess.run(
            ["rsvg-convert", "-a", "-w", "128", "-h", "128", "-f", "png"],
            input=archive.read(spec.drawing["member"]),
            capture_output=True,
            check=True,
        ).stdout
        rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
        box = np.zeros((128, 128, 4), dtype=np.uint8)
        h, w = rgba.shape[:2]
        box[(128 - h) // 2 : (128 - h) // 2 + h, (128 - w) // 2 : (128 - w) // 2 + w] = rgba
        x0, y0 = int(centres[j, 0, 0]) - 64, int(centres[j, 0, 1]) - 64
        inside = box[..., 3] >= 128
        expected[y0 : y0 + 128, x0 : x0 + 128][inside] = j + 1
        colours[y0 : y0 + 128, x0 : x0 + 128][inside] = box[..., :3][inside]
    assert np.array_equal(instances[0], expected)
    assert len(np.unique(expected)) == 4  # every object is (partly) visible, and they overlap
    drawn = expected > 0
    assert np.array_equal(frames[0][drawn], colours[drawn])


@needs_packages
@pytest.mark.skipif(not TIMGM.is_file(), reason="timgm6mb-soundfont is not installed")
def test_another_soundfont_changes_only_the_melodies(tmp_path):
    """`soundfont=` (the timbre-shift test split): the same pictures, masks and sources; the
    instruments' audio differs; a new cache key; the soundfont's package and licence are recorded."""
    options = {**SMALL, "clips_per_split": {"train": 0, "val": 0, "test": 2}}
    a = synth.generate(tmp_path / "fluid", "ms3", **options)
    b = synth.generate(tmp_path / "timgm", "ms3", soundfont=str(TIMGM), **options)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa if k.endswith(".png"))
    assert any(fa[k] != fb[k] for k in fa if k.endswith(".wav"))
    sb = json.loads((b / synth.SIDECAR_NAME).read_text())
    assert sb["assets"]["soundfont"]["package"] == "timgm6mb-soundfont"
    violin = sb["classes"][0]["sound"]["melody"]
    assert violin["package"] == "timgm6mb-soundfont" and violin["licence"] == "GPL-2"
    ra = synth.resolve_options("ms3", **options)
    rb = synth.resolve_options("ms3", soundfont=str(TIMGM), **options)
    assert synth.cache_key("ms3", ra) != synth.cache_key("ms3", rb)


# ---------------------------------------------------------------------------------------------
# Training on a real-asset tree


@needs_packages
def test_fast_dev_run_of_the_real_experiment(tmp_path, monkeypatch):
    """experiment=synth_real_ms3 generates its tree, trains a step and tests, end to end."""
    from helpers_train import TINY_MODEL, TINY_SYNTH, compose_train

    from avseg.train import run

    monkeypatch.setenv("AVSEG_CACHE", str(tmp_path / "cache"))
    cfg = compose_train(
        [
            "experiment=synth_real_ms3",
            "debug=fast_dev_run",
            *TINY_SYNTH,
            *TINY_MODEL,
            "trainer.enable_progress_bar=false",
        ],
        run_dir=tmp_path / "run",
    )
    assert cfg.data.synth.assets == "real"
    metrics = run(cfg)
    assert 0.0 <= metrics["test/miou"] <= 1.0 and "test/fscore" in metrics
    (tree,) = (tmp_path / "cache" / "synth").glob("ms3-*")
    sidecar = json.loads((tree / synth.SIDECAR_NAME).read_text())
    assert sidecar["options"]["assets"] == "real" and sidecar["options"]["image_size"] == 48
