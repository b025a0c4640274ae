"""Checkpoint and resume callbacks (Lightning).

- `LastCheckpoint`: ``last.ckpt`` every N optimizer steps, at every epoch end and at the step
  where ``fit`` ends (max_steps, max_time, a stop request, SIGTERM / Ctrl-C / a SLURM preemption
  signal), so the final weights are never lost (crash-safe through
  `avseg.lit.checkpoint_io.AtomicCheckpointIO`).
- `ResumeState`: every rank's RNG states (as tensors, so ``torch.load(weights_only=True)`` reads
  them) and data position, for exact mid-epoch resume, also under DDP.

The monitoring callbacks are in `avseg.lit.monitors`, the sweep summary in `avseg.lit.sweeps`.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning_utilities.core.apply_func import apply_to_collection

from avseg.errors import AvsegError, CheckpointError
from avseg.lit.sampler import ResumableDataLoader

log = logging.getLogger(__name__)

__all__ = [
    "LastCheckpoint",
    "TrainingInterrupted",
    "ResumeState",
    "capture_rng_state",
    "restore_rng_state",
]


# --------------------------------------------------------------------------------------------------
# checkpoints and resume


class TrainingInterrupted(AvsegError):
    """``fit`` was stopped by a signal (SIGINT / Ctrl-C, SIGTERM, or a SLURM preemption signal)
    after ``last.ckpt`` was written at the step it stopped on; ``ckpt_path`` resumes from it."""

    def __init__(self, signum: int, step: int, checkpoint: str, requeued: bool) -> None:
        self.signum = int(signum)
        self.step = int(step)
        self.checkpoint = checkpoint
        self.requeued = requeued
        name = signal.Signals(signum).name
        then = "the SLURM job was requeued and resumes from it" if requeued else f"resume with ckpt_path={checkpoint}"
        super().__init__(f"training stopped by {name} after step {step}; its final state is in {checkpoint} ({then})")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (submitit sends a job's exception back)
        return (type(self), (self.signum, self.step, self.checkpoint, self.requeued))


# SIGINT (Ctrl-C) and SIGTERM (kill, scancel, a SLURM preemption): save and stop. SIGUSR1 / SIGUSR2
# (``sbatch --signal``; submitit uses USR2): save, requeue the SLURM job, stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/<filename>`` every ``every_n_train_steps`` optimizer steps (0: never
    mid-epoch), at the end of every training epoch (after validation), and at the step where
    ``fit`` ends, overwriting it atomically: when ``trainer.max_steps`` is reached (also in the
    middle of an epoch), when something asked the trainer to stop (``max_time``, early stopping)
    and when a signal asked training to stop. The file then always holds the final state, as a
    resumable checkpoint.

    Signals (``handle_signals``, installed while training runs, the previous handlers restored
    after): the first SIGINT (Ctrl-C) or SIGTERM, or a SIGUSR1 / SIGUSR2 (SLURM's warning before a
    time limit or preemption, ``sbatch --signal``; submitit sends USR2), marks a stop request; at the
    end of the current optimizer step every rank agrees on it (one all-reduce), ``last.ckpt`` is
    written, for SIGUSR1 / SIGUSR2 rank 0 requeues the SLURM job (through submitit's own handler
    when submitit started the job, else ``scontrol requeue``), and `TrainingInterrupted` ends the
    run. A second Ctrl-C aborts at once.

    It subclasses Lightning's ``Checkpoint`` so that Lightning runs it after the other callbacks,
    and the checkpoint it writes holds their latest state (the best-checkpoint tracker included).
    """

    def __init__(
        self, *, dirpath: str, filename: str = "last.ckpt", every_n_train_steps: int = 0, handle_signals: bool = True
    ) -> None:
        super().__init__()
        if every_n_train_steps < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps}: must be >= 0")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = int(every_n_train_steps)
        self.handle_signals = bool(handle_signals)
        self._last_step_saved = -1
        self._requested: int = 0
        self._previous_handlers: dict[int, Any] = {}

    @property
    def last_model_path(self) -> str:
        return str(self.dirpath / self.filename)

    @property
    def last_step_saved(self) -> int:
        """The global step of the last write in this process (-1: none yet)."""
        return self._last_step_saved

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint{{'filename': '{self.filename}'}}"

    def _skip(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.last_model_path, weights_only=False)  # the full training state
        self._last_step_saved = trainer.global_step

    # -- signals -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._requested:
            # the second Ctrl-C: abort now, as without this handler
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = self._requested or int(signum)
        log.warning(
            "received %s: training stops after the current step, with last.ckpt written", signal.Signals(signum).name
        )

    def _install_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (*STOP_SIGNALS, *REQUEUE_SIGNALS):
            self._previous_handlers[int(signum)] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _agreed_request(self, trainer: Trainer, pl_module: LightningModule) -> int:
        """The stop request all ranks act on (the largest signal number any rank received)."""
        requested = self._requested
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([requested], dtype=torch.int64, device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = int(flag.item())
        return requested

    def _requeue(self, signum: int) -> bool:
        """Rank 0 requeues the SLURM job: through submitit when it started the job (its handler
        stores the resubmission and calls ``scontrol requeue``; it then exits the process), else
        with ``scontrol requeue``. False outside SLURM."""
        if _global_rank() != 0:
            return bool(os.environ.get("SLURM_JOB_ID"))
        previous = self._previous_handlers.get(signum)
        owner = getattr(previous, "__self__", None)
        if owner is not None and type(owner).__module__.startswith("submitit"):
            try:
                previous(signum, None)  # stores the resubmission, scontrol requeue, then sys.exit
            except SystemExit:
                pass
            return True
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            log.warning("%s outside a SLURM job: nothing to requeue", signal.Signals(signum).name)
            return False
        array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{array_job}_{array_task}" if array_job and array_task else job
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            log.error("scontrol requeue %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
            return False
        log.info("requeued SLURM job %s", job_id)
        return True

    # -- hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._requested = 0
        if not self._skip(trainer):
            self._install_handlers()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if not self._skip(trainer) and trainer.global_step != self._last_step_saved:
            # a stop that came between steps (early stopping in a mid-epoch validation): keep the
            # final weights (a resume from here starts the next epoch)
            log.info(
                "training ended at step %d between checkpoints: writing %s", trainer.global_step, self.last_model_path
            )
            self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer):
            return
        step = trainer.global_step
        requested = self._agreed_request(trainer, pl_module) if self._previous_handlers else 0
        periodic = self.every_n_train_steps > 0 and step > 0 and step % self.every_n_train_steps == 0
        # the step fit ends on: max_steps reached (Lightning ends the epoch loop right after this
        # hook), or a stop request that the loop will honour (min_epochs / min_steps met)
        final = (trainer.max_steps is not None and 0 < trainer.max_steps <= step) or (
            trainer.should_stop and getattr(trainer.fit_loop, "_can_stop_early", True)
        )
        if (periodic or final or requested) and step != self._last_step_saved:
            self._save(trainer)
        if requested:
            requeued = self._requeue(requested) if requested in REQUEUE_SIGNALS else False
            self._restore_handlers()
            if requeued:
                # SLURM ends this run of the job and starts it again, which resumes from last.ckpt.
                # Leave at once: no test, no teardown (its collectives would meet ranks already
                # gone), and no job result (submitit waits for the requeued run's result).
                log.warning(
                    "%s: last.ckpt holds step %d; the SLURM job was requeued and resumes from it. Exiting.",
                    signal.Signals(requested).name,
                    step,
                )
                logging.shutdown()
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(0)
            raise TrainingInterrupted(requested, step, self.last_model_path, requeued)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip(trainer):
            return
        # An epoch cut short (max_steps, a stop request) must not be recorded as finished: the
        # checkpoint of its last step (on_train_batch_end) is the resumable one.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done < trainer.num_training_batches:
            return
        self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"last_model_path": self.last_model_path, "every_n_train_steps": self.every_n_train_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # nothing to restore: the path is this run's own, the interval may change between runs
        return None


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "numpy_name": str(np_name),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_gauss"]),
        )
    )
    random.setstate(
        (int(state["python_version"]), tuple(int(v) for v in state["python_internal"].tolist()), state["python_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _gather(own: dict[str, Any]) -> list[dict[str, Any]]:
    """``own`` of every rank, in rank order (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered


class ResumeState(Callback):
    """Makes a resumed run continue exactly where the checkpoint was written, on every rank.

    - Saves the RNG states of every rank at checkpoint time (gathered to the rank that writes the
      file: ``ranks[r]["rng"]``; ``rng`` is rank 0's, as before) with each rank's data position
      (epoch, batches trained on); on resume each rank restores its own states when training
      starts (after the sanity check and the data loader set-up, which must not shift the streams).
    - Tells the `ResumableDataLoader` how many batches of the current epoch were trained on (the
      trainer's count; the loader itself is one batch ahead because Lightning prefetches).

    A checkpoint written with another number of ranks cannot give every rank its own stream: the
    run resumes with rank 0's states on every rank and says so (the loader refuses such a resume in
    the middle of an epoch, see `avseg.lit.sampler`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None
        self._trainer: Trainer | None = None

    @property
    def state_key(self) -> str:
        return "ResumeState"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _position(self) -> tuple[int, int]:
        trainer = self._trainer
        if trainer is None:
            return 0, 0
        return int(trainer.current_epoch), int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # trainer.train_dataloader: the loader(s) fit iterates (after Lightning's sampler set-up),
        # a single loader or a collection of them
        apply_to_collection(trainer.train_dataloader, ResumableDataLoader, self._attach)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            restore_rng_state(self._rank_state(pending, trainer))

    def _attach(self, loader: ResumableDataLoader) -> None:
        loader.progress_fn = self._position

    def _rank_state(self, pending: dict[str, Any], trainer: Trainer) -> dict[str, Any]:
        ranks = pending.get("ranks")
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        if ranks is None:  # a checkpoint from before per-rank states: rank 0's only
            if world > 1:
                log.warning("the checkpoint holds rank 0's RNG states only: every rank resumes with them")
            return pending["rng"]
        positions = {(int(r["epoch"]), int(r["batches_done"])) for r in ranks}
        if len(positions) != 1:
            raise CheckpointError(
                "<resume checkpoint>",
                f"its ranks were saved at different data positions {sorted(positions)}: not resumable",
            )
        if len(ranks) != world:
            log.warning(
                "the checkpoint holds the RNG states of %d ranks, this run has %d: every rank resumes with rank 0's",
                len(ranks),
                world,
            )
            return ranks[0]["rng"]
        return ranks[rank]["rng"]

    def state_dict(self) -> dict[str, Any]:
        epoch, batches_done = self._position()
        own = {"rank": _global_rank(), "rng": capture_rng_state(), "epoch": epoch, "batches_done": batches_done}
        ranks = _gather(own)
        return {"rng": ranks[0]["rng"], "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict if state_dict.get("rng") is not None else None
