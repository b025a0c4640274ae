"""``python -m avseg.analysis <command> ...``: does the model listen, how robust is it to noise, do
the quantised sub-space codes line up with the true sources, and what does an ablation sweep say.

Commands (docs/ANALYSIS.md):

- ``reliance ckpt_path=PATH [require_drop=0.5] [eval overrides]``: `avseg.eval` with perturb
  ``none``, ``mute`` and ``swap`` on the checkpoint's data; a table of M_J / M_F and their relative
  drops. With ``require_drop=D`` the exit status is 3 unless M_J loses at least the fraction D
  under mute AND under swap.
- ``noise ckpt_paths=[A,B] [snrs=[clean,20,10,5,0,-5]] [average=true]``: M_J and M_F against the SNR of
  white noise added at evaluation (``perturb=noise``) for one or more checkpoints; writes a
  markdown table, a JSON file and a PNG plot (matplotlib, Agg).
- ``decomposition ckpt_path=PATH [split=test] [clips=multi|all]``: on SynthAVS clips, the
  quantised code indices (``quant["local_indices"]`` [B, T, K] per second, ``quant["global_indices"]``
  [B, K] per clip) against the true sounding classes of ``synth_sources.json``: normalised mutual
  information, purity and the number of codes used, per sub-space, pooled over sub-spaces and for
  the joint K-tuple; per second, the sub-space agreement, the held-out source-set F1 and the
  multi-source recall, beside oracle codes for scale. ``pq``, ``pq_split`` and ``vq``; ``none``
  through a k-means codebook of its unquantised features.
- ``data-baselines [ckpt_path=PATH | data overrides]``: on a binary SynthAVS split, the M_J / M_F
  of rule-based predictors: every visible object (the best a model ignoring the audio can do), and
  an ideal listener with clean, muted and swapped audio (what the data allows mute / swap to cost).
- ``selectivity ckpt_path=PATH``: on a binary SynthAVS split, the share of the pixels of "heard"
  objects (whose class sounds in the audio the model is given), of the other objects and of the
  background that the model predicts foreground, with the audio clean, muted and swapped: whether
  the model selects by sound, whatever the relative M_J drops say.
- ``ablation-summary sweep_dirs=[DIR,DIR] [reliance=true]``: groups the rows of the sweeps' ``summary.csv``
  by their overrides minus the seed and writes mean +- std per group (markdown and CSV).

Arguments: Hydra overrides of the command's ``conf/analysis/<command>.yaml`` (its own keys, lists
as ``key=[a,b]``) and, for the commands that evaluate a checkpoint, of any other `conf/eval.yaml`
key, e.g. ``split=val``, ``data.synth.clips_per_split.test=64``, ``device=cpu`` (`.cli`). The
data config is chosen as `avseg.eval` chooses it: the command line's when it names any ``data``
option, else the training run's (``<run dir>/.hydra/config.yaml``).

Exit status: 0 done, 1 a project error (bad data / checkpoint / config; one ``error: ...`` line),
2 a command line that cannot be read, 3 ``require_drop`` not met. Every output file is written
atomically (temp file in the same folder + ``os.replace``).

Rooms: `avseg.analysis.reliance`, `.noise`, `.codes` (decomposition), `.selectivity`,
`.baselines` (data-baselines), `.sweeps` (ablation-summary), `.measures` (the information measures,
numpy only, checked against hand-computed values), `.common` (what they share: the evaluation
config, one `avseg.eval` run, the checkpoint's dataset, the SynthAVS sidecar) and `.cli`.
"""

from __future__ import annotations

from avseg.analysis import measures
from avseg.analysis.baselines import data_baselines, run_data_baselines
from avseg.analysis.cli import EXIT_REQUIREMENT, main
from avseg.analysis.codes import (
    ClipCodes,
    audio_features,
    collect_clip_codes,
    decomposition_tables,
    format_decomposition_tables,
    oracle_codes,
    run_decomposition,
    source_set_rows,
    subspace_agreement,
)
from avseg.analysis.common import AnalysisInputs, analysis_dataset, load_analysis_inputs, load_synth_sources
from avseg.analysis.measures import *  # noqa: F403  (the information measures; their list: measures.__all__)
from avseg.analysis.noise import average_curves, noise_table_markdown, parse_snr_list, plot_noise_curves, run_noise
from avseg.analysis.reliance import (
    audio_token_spread,
    format_reliance_table,
    reliance_rows,
    reliance_verdict,
    run_reliance,
)
from avseg.analysis.selectivity import pixel_selectivity, run_selectivity
from avseg.analysis.sweeps import format_summary_markdown, run_ablation_summary, split_overrides, summarise_sweeps

__all__ = [
    "main",
    *measures.__all__,
    "oracle_codes",
    "source_set_rows",
    "load_synth_sources",
    "ClipCodes",
    "collect_clip_codes",
    "audio_features",
    "analysis_dataset",
    "AnalysisInputs",
    "load_analysis_inputs",
    "decomposition_tables",
    "format_decomposition_tables",
    "subspace_agreement",
    "audio_token_spread",
    "reliance_rows",
    "reliance_verdict",
    "format_reliance_table",
    "parse_snr_list",
    "noise_table_markdown",
    "average_curves",
    "plot_noise_curves",
    "summarise_sweeps",
    "split_overrides",
    "format_summary_markdown",
    "run_reliance",
    "run_noise",
    "run_decomposition",
    "run_ablation_summary",
    "data_baselines",
    "pixel_selectivity",
    "run_selectivity",
    "run_data_baselines",
    "EXIT_REQUIREMENT",
]
