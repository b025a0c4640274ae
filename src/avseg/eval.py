"""``python -m avseg.eval ckpt_path=PATH [data=...] [split=test] [perturb=none|mute|swap|noise]
[perturb_snr_db=10] [save_masks=true]``: the official AVSBench metrics of a trained checkpoint.

The data config is the command line's when it names any ``data`` option, else the training run's
(``<run dir>/.hydra/config.yaml`` next to ``<run dir>/checkpoints/<ckpt>``, so
``python -m avseg.eval ckpt_path=<run>/checkpoints/best.ckpt`` evaluates on the data the model was
trained for), else ``conf/eval.yaml``'s default. The work is `avseg.evaluation.evaluate_checkpoint`
(the same predictor, batches and metric as the training run's test step: `avseg.inference`).

Outputs in the Hydra run directory: ``metrics.json`` (atomic; ``test/miou``, ``test/fscore``,
``test/fscore_global`` (binary), ``perturb``, ``perturb_snr_db``, ``ckpt_path``, ``cpu_threads``, ...)
and, with ``save_masks=true``, PNG masks in the official naming under ``<run dir>/pred_masks/``; the
result table in the run log (``<run dir>/eval.log``) and on the console.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from avseg.cli import run_main
from avseg.evaluation import evaluate_checkpoint

__all__ = ["main"]


@hydra.main(config_path="../../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    hydra_cfg = HydraConfig.get()
    # a bad input or config: one clear `error:` line, not a deep stack trace (avseg.cli)
    return run_main(
        evaluate_checkpoint,
        cfg,
        output_dir=Path(hydra_cfg.runtime.output_dir),
        overrides=list(hydra_cfg.overrides.task),
    )


if __name__ == "__main__":
    main()
