"""Training a style from the page: the unchanged trainer (headstyle.stylize) in a child process.

A run is a resumable folder (config.toml, log.jsonl, samples/, checkpoints/, generator.safetensors).
The child's main thread owns the trainer, so stopping is the trainer's own SIGTERM path: it finishes the
iteration, writes a checkpoint and ends; Resume continues from the newest checkpoint that verifies. The
page follows a run by reading its folder (``read_run``); a finished run's generator joins the style list.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from headstyle.app.config import AppConfig, LabSection
from headstyle.app.jobs import AppError, Job, Stopped
from headstyle.input_files import InputError, check_fields, parse_json, read_json_object
from headstyle.io import atomic_path

POLL_SECONDS = 0.5
STOP_TIMEOUT = 600.0  # a checkpoint of a full PanoHead run takes a while on a slow disk


@dataclass(frozen=True)
class TrainSpec:
    """What the training process needs (picklable): the stylize config as a nested dict, the run folder,
    whether to resume it, and the lab's settings for a lab run (None: the configured models)."""

    config: dict[str, Any]
    run_dir: str
    resume: bool = False
    lab: LabSection | None = None


def run_name(text: str) -> str:
    """A folder name from a person's words: letters, digits, '-' and '_' (at most 60)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip()).strip("-")[:60]
    if not name:
        raise AppError(f"style name {text!r}: use letters, digits, '-' or '_'")
    return name


def _check_new(run_dir: Path, iterations: int) -> None:
    from headstyle.training.checkpointing import run_exists

    if run_exists(run_dir):
        raise AppError(f"a run named {run_dir.name} exists: resume it, or give the new style another name")
    if int(iterations) < 1:
        raise AppError(f"iterations must be at least 1, got {iterations}")


def _every(iterations: int) -> int:
    """Preview (and checkpoint) about ten times per run."""
    return max(1, iterations // 10)


def lab_spec(lab: LabSection, style: str, iterations: int, run_dir: Path, seed: int = 0) -> TrainSpec:
    """The lab recipe (headstyle.lab.experiments.bench.lab_config: the paper's LD with mirror, grid and rank
    re-weighting) for a ground-truth style of the lab world."""
    from headstyle.lab.experiments.bench import LabSettings, lab_config
    from headstyle.lab.world.heads import STYLES
    from headstyle.stylize.config import ConfigError, to_dict

    if style not in STYLES:
        raise AppError(f"unknown lab style {style!r}; choose one of {', '.join(STYLES)}")
    _check_new(run_dir, iterations)
    settings = LabSettings(iterations=int(iterations), lr=lab.lr, seed=seed, resolution=lab.resolution,
                           sr_factor=lab.sr_factor, prior_identities=lab.prior_identities,
                           prior_views=lab.prior_views, prior=lab.prior)  # fmt: skip
    every = _every(settings.iterations)
    profile = _lab_prior_spec(lab).profile(lab.resolution, lab.sr_factor)
    try:
        cfg = lab_config(style, settings, run_dir, profile=profile,
                         variant=lambda c: replace(c, run=replace(c.run, sample_every=every, checkpoint_every=every)))
    except ConfigError as exc:
        raise AppError(str(exc)) from None
    return TrainSpec(to_dict(cfg), str(run_dir), lab=lab)


def models_spec(
    cfg: AppConfig, run_dir: Path, iterations: int, preset: str = "", prompt: str = "", style_image: str = ""
) -> TrainSpec:
    """A stylize run of the configured base generator with the configured SD model and ControlNets: a
    preset, a text prompt (overriding the preset's) or a style image (SDS with Style Fusion Attention)."""
    from headstyle.distill.objectives import SDSParams
    from headstyle.stylize.config import ConfigError, to_dict, validate
    from headstyle.stylize.presets import resolve_config

    m = cfg.models
    if not (preset or prompt or style_image):
        raise AppError("no target: choose a preset, write a prompt or give a style image")
    _check_new(run_dir, iterations)
    every = _every(int(iterations))
    kept = None
    if style_image:
        # The run keeps its own copy: an uploaded picture lives in a cache that is cleaned, and Resume reads it.
        kept = run_dir / f"style{Path(style_image).suffix.lower()}"
        with atomic_path(kept) as tmp:
            shutil.copyfile(style_image, tmp)
    try:
        run_cfg = resolve_config(preset or None)
        run_cfg = replace(
            run_cfg,
            model=replace(run_cfg.model, generator=m.generator, prior=m.prior, vae=m.vae,
                          canny_controlnet=m.canny_controlnet, depth_controlnet=m.depth_controlnet),
            run=replace(run_cfg.run, out=str(run_dir), iterations=int(iterations), sample_every=every,
                        checkpoint_every=every, device=cfg.server.device),
        )  # fmt: skip
        if prompt:
            run_cfg = replace(run_cfg, prompt=replace(run_cfg.prompt, prompt=prompt.strip()))
        if kept is not None:
            sds = replace(run_cfg.objective, name="sds", params=SDSParams(weighting="sds"))
            run_cfg = replace(run_cfg, style=replace(run_cfg.style, image=str(kept)), objective=sds)
        if m.lpips_alexnet and m.lpips_linear:
            lpips = replace(run_cfg.regularisers, lpips_alexnet=m.lpips_alexnet, lpips_linear=m.lpips_linear)
            run_cfg = replace(run_cfg, regularisers=lpips)
        validate(run_cfg)
    except ConfigError as exc:
        raise AppError(str(exc)) from None
    return TrainSpec(to_dict(run_cfg), str(run_dir))


def resume_spec(run_dir: Path, iterations: int, lab: LabSection | None) -> TrainSpec:
    """Continue a run from its newest checkpoint that verifies, to ``iterations`` in all."""
    from headstyle.stylize.config import ConfigError, to_dict, validate
    from headstyle.stylize.presets import resolve_config
    from headstyle.training import checkpointing

    try:
        checkpoint = checkpointing.resolve_checkpoint(run_dir)
        state = read_json_object(checkpoint / "state.json", checkpointing.ResumeError)
        check_fields(state, {"iteration": int}, str(checkpoint / "state.json"), checkpointing.ResumeError)
        reached = state["iteration"]
        if int(iterations) <= reached:
            raise AppError(f"{run_dir.name} is at iteration {reached}: set Iterations above {reached} to resume it")
        cfg = resolve_config(resume=checkpoint)
        cfg = replace(cfg, run=replace(cfg.run, iterations=int(iterations), out=str(run_dir)))
        validate(cfg)
    except (ConfigError, FileNotFoundError, checkpointing.ResumeError) as exc:
        raise AppError(str(exc)) from None
    return TrainSpec(to_dict(cfg), str(run_dir), resume=True, lab=lab)


# ---------------------------------------------------------------------------------------------- the child


def _lab_prior_spec(lab: LabSection):
    """lab.prior resolved (headstyle.lab.prior.learned.resolve_prior), its problem as an AppError."""
    from headstyle.lab.prior.learned import LabPriorError, resolve_prior

    try:
        return resolve_prior(lab.prior)
    except LabPriorError as exc:
        raise AppError(f"lab.prior: {exc}") from None


def lab_prior(lab: LabSection):
    """The prior lab styles are trained with (lab.prior): the learned lab prior through DiffusersPrior by default,
    the analytic exemplar prior with "exemplar", or an SD folder."""
    from headstyle.lab.prior.learned import LabPriorError

    try:
        return _lab_prior_spec(lab).load(lab.resolution, lab.sr_factor, lab.prior_identities, lab.prior_views)[0]
    except LabPriorError as exc:
        raise AppError(f"lab.prior: {exc}") from None


def train(spec: TrainSpec) -> tuple[str, int, str]:
    """Build the trainer and run it in this process (its main thread: SIGTERM stops it cleanly).
    Returns (status "done" | "stopped", iteration reached, generator path or "")."""
    from headstyle.stylize.config import from_dict

    cfg = from_dict(spec.config)
    resume = spec.run_dir if spec.resume else None
    if spec.lab is None:
        from headstyle.stylize.factory import build_from_config

        trainer = build_from_config(cfg)
    else:
        from headstyle.lab.world.generator import LabGenerator
        from headstyle.stylize.trainer import Stylizer

        lab = spec.lab
        G = LabGenerator(resolution=lab.resolution, sr_factor=lab.sr_factor, seed=cfg.run.seed)
        trainer = Stylizer(cfg, G, lab_prior(lab))
    result = trainer.train(resume=resume, progress=False)
    return ("stopped" if result.interrupted else "done"), result.iteration, str(result.generator_path or "")


def _stop_with_parent(parent: int) -> None:
    """When the app's process is gone without ending its children (killed), stop the run as a person would:
    SIGTERM to this process, so the trainer checkpoints after its iteration and returns."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(spec: TrainSpec, outcome: multiprocessing.Queue) -> None:
    threading.Thread(target=_stop_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        outcome.put(train(spec))
    except Exception as exc:  # reported to the page as one line; the run folder keeps its last checkpoint
        outcome.put(("failed", 0, f"{type(exc).__name__}: {exc}"))


class TrainProcess:
    """A training run in a spawned child process (a daemon: it ends with the app, checkpointing first)."""

    def __init__(self, spec: TrainSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._outcome = ctx.Queue()
        self._process = ctx.Process(target=_child, args=(spec, self._outcome), name="headstyle-train", daemon=True)
        self._process.start()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM: the trainer checkpoints after its current iteration and returns."""
        self._process.terminate()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def outcome(self) -> tuple[str, int, str]:
        """(status, iteration, generator path or error line) once the process has ended."""
        self._process.join()
        try:
            return self._outcome.get(timeout=5)
        except queue.Empty:
            code = self._process.exitcode
            if code == -signal.SIGTERM:
                return "killed", 0, "stopped before training began"
            return "failed", 0, f"the training process ended with exit code {code} (its output is in the app's log)"


# ---------------------------------------------------------------------------------------------- following a run


@dataclass(frozen=True)
class RunStatus:
    """A run folder as the page shows it: iterations done of total, its newest preview grid, its final
    generator (when finished) and number of checkpoints."""

    name: str
    iteration: int
    total: int
    sample: Path | None
    generator: Path | None
    checkpoints: int
    loss: float | None

    @property
    def progress(self) -> str:
        loss = f", loss {self.loss:.4g}" if self.loss is not None else ""
        return f"{self.name}: {self.iteration} / {self.total} iterations{loss}"

    @property
    def summary(self) -> str:
        """The progress and the state of a run that is not training now."""
        state = ("finished" if self.generator else
                 f"stopped at {self.iteration}, resumable" if self.checkpoints else "never checkpointed")  # fmt: skip
        return f"{self.progress}; {state}"


def _last_log_entry(path: Path, tail: int = 8192) -> dict[str, Any] | None:
    """The newest complete line of a log.jsonl (a line being written is skipped)."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - tail))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in reversed(lines):
        try:
            return parse_json(line, str(path), InputError)
        except InputError:  # torn, or not what the trainer writes (8 KB can nest past the parser's recursion)
            continue
    return None


def _total(run_dir: Path) -> int:
    from headstyle.settings import ConfigError, read_file

    try:
        return int(read_file(run_dir / "config.toml").get("run", {}).get("iterations", 0))
    except (ConfigError, TypeError, ValueError):
        return 0


def read_run(run_dir: str | Path) -> RunStatus:
    """Where a run stands, from its files alone (any process may be writing them)."""
    from headstyle.training.checkpointing import list_checkpoints

    run_dir = Path(run_dir)
    entry = _last_log_entry(run_dir / "log.jsonl") or {}
    samples = sorted((run_dir / "samples").glob("iter_*.png")) if (run_dir / "samples").is_dir() else []
    generator = run_dir / "generator.safetensors"
    loss = entry.get("loss")
    return RunStatus(run_dir.name, int(entry.get("iteration", 0)), _total(run_dir), samples[-1] if samples else None,
                     generator if generator.is_file() else None, len(list_checkpoints(run_dir)),
                     float(loss) if isinstance(loss, int | float) else None)  # fmt: skip


def runs_in(folder: Path) -> list[str]:
    """Run folders (with a config.toml) under ``folder``, newest first."""
    if not folder.is_dir():
        return []
    runs = [d for d in folder.iterdir() if d.is_dir() and (d / "config.toml").is_file()]
    return [d.name for d in sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)]


def training_job(spec: TrainSpec):
    """The queue's job for a run: start the child, report its progress and previews, stop it on request."""

    def run(job: Job) -> RunStatus:
        run_dir = Path(spec.run_dir)
        verb = "resuming" if spec.resume else "starting"
        job.report(0.0, f"{verb} {run_dir.name}: loading the models and the prior")
        process = TrainProcess(spec)
        while process.alive:
            status = read_run(run_dir)
            if status.total:
                job.report(status.iteration / status.total, status.progress, status.sample)
            if job.stop_requested:
                job.report(status.iteration / max(status.total, 1), "stopping: writing a checkpoint")
                process.stop()
                break
            time.sleep(POLL_SECONDS)
        state, iteration, detail = process.outcome()
        status = read_run(run_dir)
        if state == "failed":
            raise AppError(f"training {run_dir.name} failed: {detail}")
        if state in ("stopped", "killed"):
            where = f"at iteration {iteration}" if state == "stopped" else "before its first checkpoint"
            raise Stopped(f"{run_dir.name} stopped {where}; Resume continues it from its last checkpoint"
                          if status.checkpoints else f"{run_dir.name} stopped {where}")  # fmt: skip
        return replace(status, iteration=iteration)

    return run
