"""One training loop for every trainer: the stylize trainer, the SFA trainer and the lab prior's stages.

A trainer supplies its step and its state (a Task); the runner does the rest, the same way for all:
  - the run folder: its lock (training/lock.py), a fresh run refused where one exists, resume from a
    run folder or checkpoint (training/checkpointing.py: safetensors + JSON, checksummed, last K kept);
  - the loop: progress bar with rate and ETA, log.jsonl / log.csv / TensorBoard (training/log.py),
    checkpoints on an iteration cadence, a time cadence, at the end and on SIGINT/SIGTERM, which
    stop every process at the same iteration (training/signals.py: exit 130/143 is the CLI's).
Gradients go through training/gradients.py (one all-reduce, the non-finite guard) inside each step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headstyle.io import atomic_write_text
from headstyle.progress import progress_bar
from headstyle.training import checkpointing
from headstyle.training.lock import folder_lock
from headstyle.training.log import MetricsLog
from headstyle.training.signals import STOP


@dataclass(frozen=True)
class Processes:
    """The processes of a run: this one's rank, how many there are, its device and a barrier across them."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, accelerator: Any) -> Processes:
        """From an ``accelerate.Accelerator`` (one per process under ``accelerate launch``)."""
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device,
                   accelerator.wait_for_everyone)  # fmt: skip

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class RunPlan:
    """Where a run writes, how far it goes and its cadences. checkpoint_every: iterations between checkpoints (0:
    none on an iteration cadence); checkpoint_seconds: also one when this long has passed since the last (None:
    no time cadence); config_text: the resolved config, saved as config.toml in the run and every checkpoint."""

    out: Path
    iterations: int
    label: str
    config_text: str
    checkpoint_every: int = 0
    checkpoint_seconds: float | None = None
    keep_last: int = 3
    log_every: int = 1


@dataclass
class RunEnd:
    """Where a run stopped: its iteration, whether a signal cut it short of its end (``signal``: which one), and
    its last checkpoint."""

    iteration: int
    interrupted: bool
    checkpoint: Path | None
    signal: int | None


class Task:
    """What a trainer supplies to the runner: its step and its state.

    A subclass sets ``weights`` (name -> trainable parameter, the checkpoint's order), ``optimizer`` and ``rngs``
    (the torch.Generators it draws from, restored on resume with the global RNGs) and implements step(); the
    other methods are hooks that do nothing unless overridden. ``iteration`` counts finished iterations.
    """

    weights: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    rngs: dict[str, torch.Generator]
    iteration: int = 0

    def step(self) -> dict[str, Any]:
        """One iteration (forward, backward, update); its metrics, with "loss"."""
        raise NotImplementedError

    def measure(self, last: bool) -> dict[str, Any]:
        """Signals measured after an iteration (held-out loss, the classifier margin); an iteration that returns
        any is logged whatever the log cadence. ``last``: the run's final iteration."""
        return {}

    def done(self) -> bool:
        """Whether the run ends before its budget (a stopping rule fired)."""
        return False

    def info(self, metrics: dict[str, Any]) -> str:
        """The progress bar's text for an iteration's metrics."""
        return f"loss {metrics['loss']:.4g}"

    def shared_state(self) -> dict[str, Any]:
        """JSON-able counters every process shares, saved with each checkpoint."""
        return {}

    def rank_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This process's own tensors and JSON-able state, saved with each checkpoint."""
        return {}, {}

    def check_resume(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        """Raise ResumeError when ``ckpt`` cannot continue this run (another model, other data)."""

    def restore(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        """Restore what shared_state and rank_state saved (weights, optimizer and RNGs are restored already)."""

    def begin(self) -> None:
        """Main process, before the first iteration of this call (a fresh run or a resumed one)."""

    def after_iteration(self) -> None:
        """Main process, after each iteration's log line (previews)."""

    def after_log(self) -> None:
        """Main process, once the log is closed, however the run ended (files derived from the log)."""

    def finish(self) -> None:
        """Main process, when the run reached its end (not cut by a signal): write its result."""


def save(task: Task, plan: RunPlan, processes: Processes) -> Path:
    """One checkpoint of ``task`` at its iteration (every process calls this)."""
    state = checkpointing.capture_rng(task.rngs)
    tensors, meta = task.rank_state()
    state.tensors.update(tensors)
    state.meta.update(meta)
    shared = {"param_names": list(task.weights), **task.shared_state()}
    return checkpointing.save_checkpoint(
        plan.out, task.iteration, dict(task.weights), task.optimizer, state, shared, plan.config_text,
        rank=processes.rank, world_size=processes.world_size, barrier=processes.barrier, keep_last=plan.keep_last,
    )  # fmt: skip


def restore(task: Task, path: str | Path, processes: Processes) -> Path:
    """Continue ``task`` from a checkpoint (or a run folder's newest verified one): weights, optimizer, RNG streams,
    iteration and the task's own state."""
    ckpt = checkpointing.load_checkpoint(path, processes.rank, processes.world_size)
    task.check_resume(ckpt)
    if ckpt.meta["param_names"] != list(task.weights):
        raise checkpointing.ResumeError(
            f"{ckpt.path} trained a different parameter set than this run; resume with the checkpoint's config"
        )
    with torch.no_grad():
        for name, p in task.weights.items():
            p.copy_(ckpt.trainable[name])
    checkpointing.optimizer_from_files(task.optimizer, ckpt.optimizer_tensors, ckpt.meta["optimizer"])
    checkpointing.restore_rng(ckpt.rank_state, task.rngs)
    task.iteration = ckpt.iteration
    task.restore(ckpt)
    return ckpt.path


def run(
    task: Task, plan: RunPlan, processes: Processes = Processes(), resume: str | Path | None = None,
    progress: bool = True,
) -> RunEnd:
    """Train ``task`` to plan.iterations (from ``resume`` if given) holding the run folder's lock (another live
    writer: FolderLockedError); a signal checkpoints and stops every process at the same iteration."""
    with folder_lock(plan.out) if processes.is_main else contextlib.nullcontext():
        return _run(task, plan, processes, resume, progress)


def _run(task: Task, plan: RunPlan, processes: Processes, resume: str | Path | None, progress: bool) -> RunEnd:
    main = processes.is_main
    if resume is None and main:
        checkpointing.check_fresh_run_dir(plan.out)
    last = restore(task, resume, processes) if resume is not None else None
    if main:
        plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.out / "config.toml", plan.config_text)
        task.begin()
    log = MetricsLog(plan.out, task.iteration if last else None) if main else None
    interrupted = False
    saved_at = time.perf_counter()
    with STOP.deferred(), progress_bar(disable=not (progress and main)) as bar:
        job = bar.add_task(plan.label, total=plan.iterations, completed=task.iteration)
        while task.iteration < plan.iterations and not task.done():
            t0 = time.perf_counter()
            metrics = task.step()
            task.iteration += 1
            metrics["seconds"] = time.perf_counter() - t0
            end = task.iteration == plan.iterations
            measured = task.measure(end)
            metrics.update(measured)
            if log is not None and (task.iteration % plan.log_every == 0 or end or measured):
                log.write({"iteration": task.iteration, **metrics})
            bar.update(job, advance=1, info=task.info(metrics))
            if main:
                task.after_iteration()
            signalled = STOP.requested_on_any(processes.world_size, processes.device)
            on_time = plan.checkpoint_seconds is not None and time.perf_counter() - saved_at > plan.checkpoint_seconds
            on_cadence = plan.checkpoint_every > 0 and task.iteration % plan.checkpoint_every == 0
            if signalled or on_cadence or on_time or end or task.done():
                last = save(task, plan, processes)
                saved_at = time.perf_counter()
            if signalled:
                interrupted = not end
                break
    if log is not None:
        log.close()
        task.after_log()
    if main and not interrupted:
        task.finish()
    processes.barrier()
    return RunEnd(task.iteration, interrupted, last, STOP.signal)
