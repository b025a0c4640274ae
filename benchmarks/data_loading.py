"""Clips per second through the AVSBench loader (0 and 2 workers) on a 224 px SynthAVS tree.

    python benchmarks/data_loading.py [--subsets s4 avss] [--clips 24] [--image-size 224]
        [--workers 0 2] [--passes 3] [--out bench_data_loading.md] [--cache DIR]

For each subset (S4: 5 frames, PNG; AVSS: 10 frames, JPEG + colour masks), each audio source
(`wav`: log-mel computed per item; `pkl`: the official pickled log-mel, S4 only; `embeddings`:
precomputed `.npy`) and each worker count, it times full passes over the training split through
`DataLoader(batch_size=4, collate_fn=collate_clips, persistent_workers=True)` with the training
transform (official resize + joint augmentation), after one warm-up pass (which starts the workers),
and reports the median clips/s over `--passes` passes, the variants' passes interleaved. A third
variant loads in the main process with all of PyTorch's intra-op threads (`loading_threads=None`)
instead of the default single thread. The tree is generated once under the cache
(`$AVSEG_CACHE/synth` or --cache). Prints a Markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from avseg.data.avsbench import DATASETS, AVSBenchDataset
from avseg.data.collate import collate_clips
from avseg.data.synth import default_cache_dir, ensure_synth_tree

AUGMENT = {"hflip_prob": 0.5, "scale_min": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}


def write_fake_embeddings(dataset: AVSBenchDataset, out_dir: Path) -> None:
    """Random [T, 128] arrays at the paths the loader reads (only the loading cost is measured)."""
    rng = np.random.default_rng(0)
    for record in dataset.records:
        path = out_dir / record.wav_relpath.with_suffix(".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal((dataset.num_frames, 128)).astype(np.float32))


def time_interleaved(
    make_dataset: Callable[[int | None], AVSBenchDataset],
    *,
    variants: list[tuple[str, int, int | None]],
    passes: int,
    batch_size: int,
) -> dict[str, list[float]]:
    """clips/s per pass for each (name, workers, loading_threads) variant.

    Passes of the variants are interleaved (v1, v2, v3, v1, v2, ...) so that changing load from other
    jobs falls on all of them alike; one warm-up pass each first (it also starts the workers).
    """
    loaders = {
        name: DataLoader(
            make_dataset(threads),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            collate_fn=collate_clips,
            persistent_workers=workers > 0,
        )
        for name, workers, threads in variants
    }
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for index in range(passes + 1):
        for name, _, _ in variants:
            start = time.perf_counter()
            clips = sum(len(batch["video_id"]) for batch in loaders[name])
            elapsed = time.perf_counter() - start
            if index > 0:
                rates[name].append(clips / elapsed)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", nargs="+", default=["s4", "avss"], choices=sorted(DATASETS))
    parser.add_argument("--clips", type=int, default=24, help="training clips in the generated tree")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench_data_loading.md"))
    parser.add_argument("--cache", type=Path, default=None, help="synth cache (default $AVSEG_CACHE/synth)")
    args = parser.parse_args(argv)

    cache = args.cache or default_cache_dir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="avseg-bench-emb-") as emb_dir:
        for subset in args.subsets:
            start = time.perf_counter()
            root = ensure_synth_tree(
                cache,
                subset,
                image_size=args.image_size,
                seed=0,
                write_pkl=subset != "avss",
                clips_per_split={"train": args.clips, "val": 0, "test": 0},
            )
            print(f"{subset}: tree at {root} ({time.perf_counter() - start:.1f} s incl. generation)", flush=True)
            sources = ["wav", "pkl", "embeddings"] if DATASETS[subset].supports_pkl else ["wav", "embeddings"]
            for source in sources:
                options: dict = {"audio_source": source}
                if source == "embeddings":
                    options["embeddings_dir"] = Path(emb_dir) / subset

                def make_dataset(
                    threads: int | None, options: dict = options, subset: str = subset, root: Path = root
                ) -> AVSBenchDataset:
                    return DATASETS[subset](
                        root, "train", image_size=args.image_size, augment=AUGMENT, loading_threads=threads, **options
                    )

                if source == "embeddings":
                    write_fake_embeddings(make_dataset(1), Path(emb_dir) / subset)
                variants = [(f"{w} workers", w, 1) for w in args.workers]
                variants.append(("0 workers, all threads", 0, None))
                rates = time_interleaved(
                    make_dataset, variants=variants, passes=args.passes, batch_size=args.batch_size
                )
                for name, values in rates.items():
                    print(f"  {source:<10} {name}: {[round(r, 1) for r in values]} clips/s", flush=True)
                rows.append((subset, DATASETS[subset].num_frames, source, rates))

    base = f"{args.workers[0]} workers"
    names = list(rows[0][3])
    header = ["subset", "T", "audio", *[f"{n} (clips/s)" for n in names]]
    header += [f"{n} vs {base}" for n in names if n != base]
    lines = [
        f"Data loading: median clips/s over {args.passes} interleaved passes of {args.clips} training clips, "
        f"{args.image_size} px SynthAVS, batch {args.batch_size}, training transform (resize + joint "
        f"augmentation), after a warm-up pass. Items load with 1 intra-op thread (workers, and the main "
        f"process's default `loading_threads=1`) except in the 'all threads' column "
        f"({torch.get_num_threads()} threads). Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared with other jobs while measured), torch {torch.__version__}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for subset, frames, source, rates in rows:
        medians = {n: statistics.median(r) for n, r in rates.items()}
        cells = [subset, str(frames), source, *[f"{medians[n]:.1f}" for n in names]]
        cells += [f"{medians[n] / medians[base]:.2f}x" for n in names if n != base]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(table)
    os.replace(tmp, args.out)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
