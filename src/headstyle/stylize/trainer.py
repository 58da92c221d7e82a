"""The domain-adaptation trainer: multi-view likelihood distillation into a 3D head generator.

One iteration (LD script defaults, ../shared/reference/likelihood-distillation.md) is a straight pipeline:
  1. z ~ N(0, I); ws from the FROZEN mapping (psi 0.75, cutoff 14, camera yaw 0 / pitch 0.2);
  2. render: every branch (stylize/branches.py: the single view with its mirror, the 2x2 grid)
     renders trainable and frozen views and makes its control;
  3. encode: ONE VAE encode of every render (and of the DDS/IDS sources);
  4. targets (stylize/targets.py): per branch a timestep and noise (fresh, fixed or MV-NRS with its anchor twin);
  5. ONE objective call (LD, SDS, NFSD, DDS or IDS from distill.objectives) over all targets;
  6. shaping: each branch turns its results into loss terms (rank re-weighting and mirror on the
     single view, MV-NRS retention on the grid, mask / scale / clamp, injection), plus the
     relative-distance regulariser between this and the previous identity's tri-grids;
  7. ONE backward (training/gradients.py); gradients averaged over processes (one all-reduce, as DDP);
     non-finite steps skipped and counted; Adam (the paper's) or SGD with momentum on the trainable parameters.
training/runner.py runs the iterations (run folder, checkpoints, resume, logs, signals); this class is its Task.
The stopping rule (optim.stop_rule, on by default; stylize/stopping.py) checks the diffusion classifier
margin of the current renders every few iterations and stops the run, or decays its learning rate, once
they are in style; every checkpoint's margin goes to signals.csv.
The trainer holds a Generator and a ScorePrior (any implementation of the seams) and the optional
LPIPS and depth estimator; stylize/factory.py builds them from a config.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headstyle.distill.objectives import DistillResult, get_objective
from headstyle.generator.base import Generator
from headstyle.generator.checkpoint import save_generator, sidecar_path
from headstyle.io import atomic_write_text
from headstyle.priors import controls
from headstyle.priors.base import ScorePrior
from headstyle.settings import ConfigError
from headstyle.stylize import stopping
from headstyle.stylize.branches import Identities, Rendered, StepContext, build_branches
from headstyle.stylize.config import StylizeConfig, conditioning_camera, dumps
from headstyle.stylize.outputs import Previews
from headstyle.stylize.probes import ClassifierProbes
from headstyle.stylize.regularisers import LPIPS, relative_distance
from headstyle.stylize.targets import TargetSampler
from headstyle.training import checkpointing, runner
from headstyle.training.gradients import GradientStep, calibrate_sgd
from headstyle.training.log import read_log
from headstyle.training.seeds import rank_seed, seed_everything


@dataclass
class TrainResult:
    """How a run ended; ``signal``: the signal number that interrupted it (SIGINT, SIGTERM), else None;
    ``rule_fired_at``: the iteration at which the stopping rule fired (0: it did not)."""

    iteration: int
    interrupted: bool
    checkpoint: Path | None
    generator_path: Path | None
    skipped_steps: int
    signal: int | None = None
    rule_fired_at: int = 0


def build_optimizer(params: list[nn.Parameter], optim: Any) -> torch.optim.Optimizer:
    """The config's optimiser (optim: an OptimConfig): the paper's Adam, or SGD with momentum (step = lr * velocity,
    v <- momentum * v + grad). SGD's param group carries "calibrated" (its lr set from the first step, see
    OptimConfig.sgd_step), checkpointed with the optimizer's state."""
    if optim.name == "sgd":
        calibrated = optim.sgd_step <= 0
        return torch.optim.SGD([{"params": params, "calibrated": calibrated}], lr=optim.lr, momentum=optim.momentum)
    return torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta1, optim.beta2))


class Stylizer(runner.Task):
    """Fine-tunes ``generator`` towards the prompt of ``cfg`` with the scores of ``prior``.

    generator: the model to stylise (an nn.Module implementing the Generator protocol); its
    trainable subset is chosen by cfg.optim, and a frozen copy is taken here for controls, masks
    and the regulariser. accelerator: an ``accelerate.Accelerator`` (created when None) giving
    the device, the process rank and the number of processes. lpips / depth_estimator: the
    Tweedie-target LPIPS and the grid's monocular depth (stylize/factory.py builds them from cfg).
    generator_digest: the content hash of the generator's file, when it came from one.
    training/runner.py runs the loop: this class supplies its step and its state.
    """

    def __init__(
        self,
        cfg: StylizeConfig,
        generator: Generator,
        prior: ScorePrior,
        accelerator: Any = None,
        lpips: LPIPS | None = None,
        depth_estimator: controls.MonocularDepth | None = None,
        generator_digest: str = "",
    ) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=cfg.run.mixed_precision)
        if not isinstance(generator, nn.Module):
            raise TypeError("the generator must be a torch.nn.Module implementing the Generator protocol")
        self.cfg = cfg
        self.accelerator = accelerator
        self.processes = runner.Processes.of(accelerator)
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.run_dir = Path(cfg.run.out)
        self.prior = prior
        # sha256 of the generator's file, saved with every checkpoint: a resume must continue the same model.
        self.generator_digest = generator_digest
        self.frozen = copy.deepcopy(generator).requires_grad_(False).eval().to(self.device)
        self.G = generator.to(self.device).requires_grad_(False)
        self._select_parameters(generator)

        seed_everything(rank_seed(cfg.run.seed, self.rank))
        # Identities, cameras, timesteps and noise: one explicit stream per process (per-rank seed).
        self.rng = torch.Generator().manual_seed(rank_seed(cfg.run.seed, self.rank))
        self.rngs = {"stylize": self.rng}
        self.iteration = 0
        # Iteration at which the stopping rule fired (0: not yet).
        self.stop_triggered_at = 0
        self.prev_planes: tuple[Tensor, Tensor] | None = None
        # Whether this step's objective gradient at the renders was exactly zero (the prior gave no direction).
        self._objective_grad_zero = False
        self._prepare_objective()
        self.ctx = self._step_context(lpips, depth_estimator)
        self.branches = build_branches(self.ctx)
        # Every run measures the margin at its checkpoints (signals.csv), the rule or not.
        self.probes = ClassifierProbes.draw(cfg, self.frozen, self.c_cond, self.timesteps, self.device)
        self.previews = Previews(cfg, self.G, self.frozen, self.device, self.ctx.render_kwargs)

    def _select_parameters(self, generator: Generator) -> None:
        """The trainable subset (cfg.optim.train_modules / train_biases), its optimizer and its gradient step."""
        cfg = self.cfg
        try:
            selected = generator.trainable_parameters(tuple(cfg.optim.train_modules), cfg.optim.train_biases)
        except ValueError as exc:
            raise ConfigError(f"optim.train_modules: {exc}") from None
        trainable = {id(p) for p in selected}
        if not trainable:
            raise ConfigError(
                f"optim.train_modules={list(cfg.optim.train_modules)} selects no parameters of this generator; "
                "name modules it has (e.g. backbone.synthesis, superresolution)"
            )
        self.weights = {n: p.requires_grad_(True) for n, p in generator.named_parameters() if id(p) in trainable}
        self.params = list(self.weights.values())
        self.optimizer = build_optimizer(self.params, cfg.optim)
        scaler = torch.amp.GradScaler(self.device.type) if cfg.run.mixed_precision == "fp16" else None
        self.update = GradientStep(
            self.params, self.optimizer, self.world_size, scaler, cfg.run.max_nonfinite_in_row,
            "Resume from the last checkpoint with a lower optim.lr, run.mixed_precision=no or a larger shaping.scale",
        )  # fmt: skip

    def _prepare_objective(self) -> None:
        """The prompts' embeddings, the objective and its arguments, and the DDIM timesteps it samples from."""
        cfg, prior = self.cfg, self.prior
        self.prompt = prior.embed_prompts(cfg.prompt.prompt, cfg.prompt.negative_prompt)
        self.objective = get_objective(cfg.objective.name)
        self.objective_kwargs = {"guidance_scale": cfg.prompt.guidance_scale, **cfg.objective.params.kwargs(prior)}
        self.source_prompt = None
        if self.objective.needs_source:
            self.source_prompt = prior.embed_prompts(cfg.prompt.source_prompt, cfg.prompt.negative_prompt)
        self.timesteps = prior.inference_timesteps(cfg.objective.num_inference_steps).long().cpu()
        self.c_cond = conditioning_camera(cfg)
        self.targets = TargetSampler(cfg.objective, cfg.run.seed, self.rank, self.prompt, self.source_prompt,
                                     self.timesteps, self.rng, self.device)  # fmt: skip
        if cfg.single.enabled and len(cfg.single.rank_weights) > prior.latent_channels:
            raise ConfigError(
                f"single.rank_weights has {len(cfg.single.rank_weights)} entries but the prior's latents have "
                f"{prior.latent_channels} channels; give at most {prior.latent_channels} (or [] to disable)"
            )

    def _step_context(self, lpips: LPIPS | None, depth_estimator: controls.MonocularDepth | None) -> StepContext:
        cfg = self.cfg
        return StepContext(
            cfg=cfg,
            G=self.G,
            frozen=self.frozen,
            prior=self.prior,
            device=self.device,
            rng=self.rng,
            image_size=cfg.model.prior_image_size or self.prior.image_size,
            render_kwargs={"generate_background": cfg.model.background},
            # A prior with content references (Style Fusion Attention) reads each sample's frozen render.
            need_source=self.source_prompt is not None or self.prior.takes_content,
            lpips=lpips.to(self.device) if lpips is not None else None,
            depth_estimator=depth_estimator,
        )

    @property
    def skipped(self) -> int:
        return self.update.skipped

    def trainable_state(self) -> dict[str, Tensor]:
        return dict(self.weights)

    # -- one iteration -------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast() if self.cfg.run.mixed_precision != "no" else contextlib.nullcontext()

    @torch.no_grad()
    def _mapping(self, n: int) -> Tensor:
        z = torch.randn(n, self.G.z_dim, generator=self.rng).to(self.device)
        c = self.c_cond.expand(n, -1).to(self.device)
        return self.frozen.mapping(z, c, self.cfg.latent.truncation_psi, self.cfg.latent.truncation_cutoff)

    def _encode(self, rendered: list[Rendered]) -> None:
        """ONE encode of every image the prior sees (trainable renders, then DDS/IDS sources)."""
        sources = [r.source for r in rendered if r.source is not None]
        images = torch.cat([r.images for r in rendered] + sources)
        self._objective_grad_zero = True  # until a gradient reaches the renders in this step's backward
        if images.requires_grad:
            images.register_hook(self._note_objective_grad)
        latents = self.prior.encode(images).float()
        chunks = latents.split([len(r.images) for r in rendered] + [len(x) for x in sources])
        for i, r in enumerate(rendered):
            r.latents = chunks[i]
            r.source_latents = chunks[len(rendered) + i] if sources else None

    def _note_objective_grad(self, grad: Tensor) -> None:
        """The gradient reaching the renders through the prior's encoder is the objective's alone (the regulariser
        acts on tri-grids, the Tweedie losses on the renders themselves): is it exactly zero this step?"""
        self._objective_grad_zero = bool((grad == 0).all())

    @torch.no_grad()
    def _first_previous_identity(self, n: int) -> tuple[Tensor, Tensor]:
        """Tri-grids of an identity drawn before training (the script's batch 0), so the relative-distance
        regulariser acts from the first iteration. Trainable and frozen still agree, so one tri-grid serves both."""
        planes = self.frozen.trigrid(self._mapping(n)).float()
        return planes, planes

    def _identities(self, ws: Tensor) -> Identities:
        """The identities ws and their tri-grids, each generator's backbone run once for all branches."""
        with torch.no_grad():
            frozen_planes = self.frozen.trigrid(ws)
        return Identities(ws, self.G.trigrid(ws), frozen_planes)

    def _regulariser(self, identities: Identities) -> Tensor | None:
        """Relative distance between this and the previous identity's tri-grids (frozen vs trainable), None
        when off or without a previous identity; this identity becomes the previous one."""
        if self.cfg.regularisers.relative_distance <= 0:
            return None
        previous = self.prev_planes
        self.prev_planes = (identities.frozen_planes.detach().float(), identities.planes.detach().float())
        if previous is None:
            return None
        return relative_distance(previous[0], identities.frozen_planes, previous[1], identities.planes)

    def step(self) -> dict[str, Any]:
        """One training iteration on this process; returns its metrics (after the optimizer step or skip)."""
        cfg = self.cfg
        n = cfg.run.batch_size
        if self.prev_planes is None and cfg.regularisers.relative_distance > 0:
            self.prev_planes = self._first_previous_identity(n)
        ws = self._mapping(n)
        with self._autocast():
            identities = self._identities(ws)
            rendered = [branch.render(identities) for branch in self.branches]
            self._encode(rendered)
        groups = [branch.targets(r, self.targets) for branch, r in zip(self.branches, rendered, strict=True)]
        targets = [t for group in groups for t in group]
        if self.prior.takes_content:
            self.prior.set_content(torch.cat([t.source_latents for t in targets]), images_per_group=1)
        # ONE prior call for every branch (IDS: N fixed-point calls + 1); MV-NRS's anchor twins ride along.
        with self._autocast():
            results = self.objective.fn(self.prior, targets, **self.objective_kwargs)

        metrics: dict[str, Any] = {}
        loss = torch.zeros((), device=self.device)
        offset = 0
        for branch, r, group in zip(self.branches, rendered, groups, strict=True):
            group_results: list[DistillResult] = results[offset : offset + len(group)]
            offset += len(group)
            terms, branch_metrics = branch.loss(r, group, group_results)
            for term in terms:
                loss = loss + term
            metrics.update(branch_metrics)
        reg = self._regulariser(identities)
        if reg is not None:
            loss = loss + cfg.regularisers.relative_distance * reg
        metrics["relative_distance"] = 0.0 if reg is None else float(reg.detach())
        metrics["loss"] = float(loss.detach())

        calibrate = self._calibrate_sgd if cfg.optim.sgd_step > 0 else None
        metrics.update(self.update(loss, self.iteration + 1, calibrate))
        metrics["objective_grad_zero"] = int(self._objective_grad_zero)
        metrics["effective_batch"] = n * self.world_size
        if self.world_size > 1:
            metrics["loss_per_rank"] = self._gather_scalar(metrics["loss"])
            metrics["grad_norm_local_per_rank"] = self._gather_scalar(metrics["grad_norm_local"])
            metrics["weights_digest_per_rank"] = self._gather_scalar(self._weights_digest())
        return metrics

    def _calibrate_sgd(self, grad_norm: float, numel: int) -> dict[str, Any]:
        rms = grad_norm / math.sqrt(numel)
        return {"sgd_calibrated": int(calibrate_sgd(self.optimizer, rms, self.cfg.optim.sgd_step))}

    def _gather_scalar(self, value: float) -> list[float]:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.gather(t).cpu().tolist()

    def _weights_digest(self) -> float:
        """Sum of all trainable weights in float64: equal on every rank when data-parallel stays in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params))

    # -- the stopping rule ---------------------------------------------------------------------

    def classifier_margin(self) -> float:
        """The diffusion classifier margin of the trainable generator's current renders of the probes."""
        source = self.prior.embed_prompts(self.cfg.prompt.source_prompt).cond
        return self.probes.margin(self.G, self.prior, source, self.prompt.cond, self.ctx.image_size,
                                  self.ctx.render_kwargs)  # fmt: skip

    def _signals(self) -> dict[str, Any]:
        """The classifier margin at every checkpoint and, with optim.stop_rule "classifier", every optim.stop_every
        iterations until the rule fires (stopping.fires): then the run stops or its learning rate is multiplied by
        optim.stop_decay."""
        o = self.cfg.optim
        checking = o.stop_rule == "classifier" and not self.stop_triggered_at and self.iteration % o.stop_every == 0
        at_checkpoint = checkpointing.on_cadence(self.iteration, self.cfg.run.checkpoint_every, self.cfg.run.iterations)
        if not (checking or at_checkpoint):
            return {}
        value = self.classifier_margin()
        if checking and stopping.fires(value, o.stop_margin):
            self.stop_triggered_at = self.iteration
            if o.stop_action == "decay":
                for group in self.optimizer.param_groups:
                    group["lr"] *= o.stop_decay
        return {stopping.MARGIN: value, "stop_triggered_at": self.stop_triggered_at}

    def write_signals(self) -> Path:
        """signals.csv from the run's log: the margin of every checkpoint, so a user can pick one (resume from it with
        run.iterations=N and another run.out, or rerun the config to N), and where the rule fired."""
        rows = stopping.checkpoint_signals(read_log(self.run_dir), self.cfg.run.checkpoint_every, self.iteration)
        path = self.run_dir / stopping.SIGNALS
        atomic_write_text(path, stopping.signals_csv(rows, self.stop_triggered_at))
        return path

    # -- state (runner.Task) --------------------------------------------------------------------

    def done(self) -> bool:
        return self.stop_triggered_at > 0 and self.cfg.optim.stop_action == "stop"

    def measure(self, last: bool) -> dict[str, Any]:
        return self._signals()

    def info(self, metrics: dict[str, Any]) -> str:
        return f"loss {metrics['loss']:.4g} rd {metrics['relative_distance']:.3g} skipped {self.skipped}"

    def shared_state(self) -> dict[str, Any]:
        return {**self.update.state(), "stop_triggered_at": self.stop_triggered_at,
                "generator_sha256": self.generator_digest}  # fmt: skip

    def rank_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {}
        if self.prev_planes is not None:
            tensors["prev_planes.frozen"] = self.prev_planes[0].cpu().contiguous()
            tensors["prev_planes.trainable"] = self.prev_planes[1].cpu().contiguous()
        return tensors, self.update.rank_state()

    def check_resume(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        saved_digest = ckpt.meta.get("generator_sha256", "")
        if saved_digest and self.generator_digest and saved_digest != self.generator_digest:
            raise checkpointing.ResumeError(
                f"{ckpt.path} stylises another generator (sha256 {saved_digest[:12]}..., this one "
                f"{self.generator_digest[:12]}...); resume with the run's own generator ({self.cfg.model.generator})"
            )

    def restore(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        """The previous identity's tri-grids, the skip counters, the GradScaler and where the rule fired."""
        t = ckpt.rank_state.tensors
        self.prev_planes = None
        if "prev_planes.frozen" in t:
            self.prev_planes = (t["prev_planes.frozen"].to(self.device), t["prev_planes.trainable"].to(self.device))
        self.update.load_state(ckpt.meta)
        self.update.load_rank_state(ckpt.rank_state.meta)
        self.stop_triggered_at = int(ckpt.meta.get("stop_triggered_at", 0))  # absent before the stopping rule

    # -- outputs a user looks at ---------------------------------------------------------------

    def begin(self) -> None:
        if self.iteration < self.cfg.run.iterations:
            # A run continued past an earlier end: its generator file is that end's, not this run's result.
            for path in (self.generator_path, sidecar_path(self.generator_path)):
                path.unlink(missing_ok=True)
        if self.iteration == 0:
            self.write_samples()

    def after_iteration(self) -> None:
        if self.iteration % self.cfg.run.sample_every == 0:
            self.write_samples()

    def after_log(self) -> None:
        self.write_signals()

    def finish(self) -> None:
        """The stylised generator, the last samples and the turntables."""
        save_generator(self.G, self.generator_path)
        if self.iteration % self.cfg.run.sample_every:
            self.write_samples()
        if self.cfg.run.turntable_identities > 0:
            self.previews.write_turntables()

    def write_samples(self) -> Path:
        return self.previews.write_samples(self.iteration)

    @property
    def generator_path(self) -> Path:
        """The stylised generator as a loadable checkpoint (``headstyle render --generator`` takes it), written when
        the run reaches run.iterations: its presence says the run finished."""
        return self.run_dir / "generator.safetensors"

    # -- the loop ------------------------------------------------------------------------------

    def train(self, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
        """Run until cfg.run.iterations (resuming from ``resume`` if given) holding the run folder's lock (another live
        writer there: FolderLockedError); SIGINT/SIGTERM checkpoint and stop."""
        cfg = self.cfg
        plan = runner.RunPlan(self.run_dir, cfg.run.iterations, "stylize", dumps(cfg), cfg.run.checkpoint_every,
                              keep_last=cfg.run.keep_last, log_every=cfg.run.log_every)  # fmt: skip
        end = runner.run(self, plan, self.processes, resume, progress)
        finished = not end.interrupted and self.processes.is_main
        return TrainResult(end.iteration, end.interrupted, end.checkpoint, self.generator_path if finished else None,
                           self.skipped, end.signal, self.stop_triggered_at)  # fmt: skip
