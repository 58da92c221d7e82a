"""The domain-adaptation trainer: multi-view likelihood distillation into a 3D head generator.

One iteration (LD script defaults, ../shared/reference/likelihood-distillation.md) is a straight pipeline:
  1. z ~ N(0, I); ws from the FROZEN mapping (psi 0.75, cutoff 14, camera yaw 0 / pitch 0.2);
  2. render: every branch (stylize/branches.py: the single view with its mirror, the 2x2 grid)
     renders trainable and frozen views and makes its control;
  3. encode: ONE VAE encode of every render (and of the DDS/IDS sources);
  4. targets: per branch a timestep and noise (fresh, fixed or MV-NRS with its anchor twin);
  5. ONE objective call (LD, SDS, NFSD, DDS or IDS from distill.objectives) over all targets;
  6. shaping: each branch turns its results into loss terms (rank re-weighting and mirror on the
     single view, MV-NRS retention on the grid, mask / scale / clamp, injection), plus the
     relative-distance regulariser between this and the previous identity's tri-grids;
  7. ONE backward; gradients averaged over processes (one all-reduce, as DDP); non-finite steps
     skipped and counted; Adam (the paper's) or SGD with momentum on the trainable parameters.
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
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from headstyle import cameras
from headstyle.distill import noise, shaping
from headstyle.distill.objectives import DistillResult, DistillTarget, get_objective
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.generator.base import Generator
from headstyle.generator.checkpoint import save_generator, sidecar_path
from headstyle.io import atomic_write_text
from headstyle.priors import controls
from headstyle.priors.base import Control, Layout, NoiseQuery, PromptEmbeds, ScorePrior
from headstyle.progress import progress_bar
from headstyle.settings import ConfigError
from headstyle.stylize import checkpointing, stopping
from headstyle.stylize.branches import Identities, Rendered, StepContext, build_branches
from headstyle.stylize.config import StylizeConfig, conditioning_camera, dumps
from headstyle.stylize.outputs import MetricsLog, Previews, read_log
from headstyle.stylize.regularisers import LPIPS, relative_distance
from headstyle.training.lock import folder_lock
from headstyle.training.signals import STOP


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations produced non-finite gradients; the run stopped without saving them."""


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


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, process rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# The classifier probes' stream: the same on every process (a rank no run reaches), apart from the training streams.
PROBE_STREAM = 1 << 20
# Timesteps of the classifier margin: this many, evenly spaced over the objective's step range.
PROBE_TIMESTEPS = 3


def build_optimizer(params: list[nn.Parameter], optim: Any) -> torch.optim.Optimizer:
    """The config's optimiser (optim: an OptimConfig): the paper's Adam, or SGD with momentum (step = lr * velocity,
    v <- momentum * v + grad). SGD's param group carries "calibrated" (its lr set from the first step, see
    OptimConfig.sgd_step), checkpointed with the optimizer's state."""
    if optim.name == "sgd":
        calibrated = optim.sgd_step <= 0
        return torch.optim.SGD([{"params": params, "calibrated": calibrated}], lr=optim.lr, momentum=optim.momentum)
    return torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta1, optim.beta2))


def calibrate_sgd(optimizer: torch.optim.Optimizer, grad_rms: float, step: float) -> bool:
    """Set an uncalibrated SGD group's lr so that a constant gradient of RMS ``grad_rms`` would reach steady steps
    lr * grad / (1 - momentum) of RMS ``step``; a zero gradient leaves it for the next step. True when set now."""
    group = optimizer.param_groups[0]
    if group["calibrated"] or not (grad_rms > 0 and math.isfinite(grad_rms)):
        return False
    group["lr"] = step * (1 - group["momentum"]) / grad_rms
    group["calibrated"] = True
    return True


def seed_everything(seed: int) -> None:
    """Seed the global RNGs the generator's renderer and libraries draw from (per process)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global stream third-party code draws from)
    torch.manual_seed(seed)


class Stylizer:
    """Fine-tunes ``generator`` towards the prompt of ``cfg`` with the scores of ``prior``.

    generator: the model to stylise (an nn.Module implementing the Generator protocol); its
    trainable subset is chosen by cfg.optim, and a frozen copy is taken here for controls, masks
    and the regulariser. accelerator: an ``accelerate.Accelerator`` (created when None) giving
    the device, the process rank and the number of processes. lpips / depth_estimator: the
    Tweedie-target LPIPS and the grid's monocular depth (stylize/factory.py builds them from cfg).
    generator_digest: the content hash of the generator's file, when it came from one.
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
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.run_dir = Path(cfg.run.out)
        self.prior = prior
        # sha256 of the generator's file, saved with every checkpoint: a resume must continue the same model.
        self.generator_digest = generator_digest

        self.frozen = copy.deepcopy(generator).requires_grad_(False).eval().to(self.device)
        self.G = generator.to(self.device).requires_grad_(False)
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
        named = [(n, p) for n, p in generator.named_parameters() if id(p) in trainable]
        self.param_names = [n for n, _ in named]
        self.params = [p.requires_grad_(True) for _, p in named]
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.mixed_precision == "fp16" else None

        seed_everything(rank_seed(cfg.run.seed, self.rank))
        # Identities, cameras, timesteps and noise: one explicit stream per process (per-rank seed).
        self.rng = torch.Generator().manual_seed(rank_seed(cfg.run.seed, self.rank))
        self.iteration = 0
        self.skipped = 0
        self.nonfinite_in_row = 0
        # Iteration at which the stopping rule fired (0: not yet).
        self.stop_triggered_at = 0
        self.prev_planes: tuple[Tensor, Tensor] | None = None
        # Whether this step's objective gradient at the renders was exactly zero (the prior gave no direction).
        self._objective_grad_zero = False

        self.prompt = prior.embed_prompts(cfg.prompt.prompt, cfg.prompt.negative_prompt)
        self.objective = get_objective(cfg.objective.name)
        self.objective_kwargs = {"guidance_scale": cfg.prompt.guidance_scale, **cfg.objective.params.kwargs(prior)}
        self.source_prompt = None
        if self.objective.needs_source:
            self.source_prompt = prior.embed_prompts(cfg.prompt.source_prompt, cfg.prompt.negative_prompt)
        self.timesteps = prior.inference_timesteps(cfg.objective.num_inference_steps).long().cpu()
        self.c_cond = conditioning_camera(cfg)
        if cfg.single.enabled and len(cfg.single.rank_weights) > prior.latent_channels:
            raise ConfigError(
                f"single.rank_weights has {len(cfg.single.rank_weights)} entries but the prior's latents have "
                f"{prior.latent_channels} channels; give at most {prior.latent_channels} (or [] to disable)"
            )
        render_kwargs: dict[str, Any] = {"generate_background": cfg.model.background}
        self.ctx = StepContext(
            cfg=cfg,
            G=self.G,
            frozen=self.frozen,
            prior=prior,
            device=self.device,
            rng=self.rng,
            image_size=cfg.model.prior_image_size or prior.image_size,
            render_kwargs=render_kwargs,
            # A prior with content references (Style Fusion Attention) reads each sample's frozen render.
            need_source=self.source_prompt is not None or prior.takes_content,
            lpips=lpips.to(self.device) if lpips is not None else None,
            depth_estimator=depth_estimator,
        )
        self.branches = build_branches(self.ctx)
        # Every run measures the margin at its checkpoints (signals.csv), the rule or not.
        self.probes = self._classifier_probes()
        self.previews = Previews(cfg, self.G, self.frozen, self.device, render_kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- one iteration -------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast() if self.cfg.run.mixed_precision != "no" else contextlib.nullcontext()

    @torch.no_grad()
    def _mapping(self, n: int) -> Tensor:
        z = torch.randn(n, self.G.z_dim, generator=self.rng).to(self.device)
        c = self.c_cond.expand(n, -1).to(self.device)
        return self.frozen.mapping(z, c, self.cfg.latent.truncation_psi, self.cfg.latent.truncation_cutoff)

    def _noise(self, shape: tuple[int, ...], slot: int) -> Tensor:
        """eps for one branch: fresh from the run's stream, or (noise=fixed) the same eps every iteration
        for each (process, branch, batch slot)."""
        if self.cfg.objective.noise == "fixed":
            n = shape[0]
            ids = range(self.rank * n + slot * 10_000, self.rank * n + slot * 10_000 + n)
            return torch.cat([noise.identity_noise((1, *shape[1:]), i, self.cfg.run.seed) for i in ids]).to(self.device)
        return noise.random_noise(shape, self.rng, self.device)

    def _target(
        self, latents: Tensor, control: Control | None, source_latents: Tensor | None, layout: Layout, slot: int
    ) -> DistillTarget:
        """A branch's DistillTarget: DDIM timesteps in the configured step range and the branch's noise."""
        o = self.cfg.objective
        ts = sample_ddim_steps(
            latents.shape[0], o.min_step_index, o.max_step_index, timesteps=self.timesteps, generator=self.rng
        )
        return DistillTarget(
            latents=latents,
            prompt=self.prompt,
            t=ts.t.to(self.device),
            noise=self._noise(tuple(latents.shape), slot),
            control=control,
            step_index=ts.step_index.to(self.device),
            source_latents=source_latents,
            source_prompt=self.source_prompt,
            layout=layout,
        )

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

    def _regulariser(self, ids: Identities) -> Tensor | None:
        """Relative distance between this and the previous identity's tri-grids (frozen vs trainable), None
        when off or without a previous identity; this identity becomes the previous one."""
        if self.cfg.regularisers.relative_distance <= 0:
            return None
        previous = self.prev_planes
        self.prev_planes = (ids.frozen_planes.detach().float(), ids.planes.detach().float())
        if previous is None:
            return None
        return relative_distance(previous[0], ids.frozen_planes, previous[1], ids.planes)

    def step(self) -> dict[str, Any]:
        """One training iteration on this process; returns its metrics (after the optimizer step or skip)."""
        cfg = self.cfg
        n = cfg.run.batch_size
        if self.prev_planes is None and cfg.regularisers.relative_distance > 0:
            self.prev_planes = self._first_previous_identity(n)
        ws = self._mapping(n)
        with self._autocast():
            ids = self._identities(ws)
            rendered = [branch.render(ids) for branch in self.branches]
            self._encode(rendered)
        groups = [branch.targets(r, self._target) for branch, r in zip(self.branches, rendered, strict=True)]
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
        reg = self._regulariser(ids)
        if reg is not None:
            loss = loss + cfg.regularisers.relative_distance * reg
        metrics["relative_distance"] = 0.0 if reg is None else float(reg.detach())
        metrics["loss"] = float(loss.detach())

        self.optimizer.zero_grad(set_to_none=False)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        metrics["objective_grad_zero"] = int(self._objective_grad_zero)
        metrics.update(self._reduce_and_step())
        return metrics

    def _reduce_and_step(self) -> dict[str, Any]:
        """Average gradients over processes (one all-reduce, as DDP does), guard non-finite values, step."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        local_norm = torch.linalg.vector_norm(flat)
        if self.world_size > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p, g in zip(self.params, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].reshape(g.shape).to(p.dtype)
                offset += g.numel()
        grad_norm = torch.linalg.vector_norm(flat)
        out: dict[str, Any] = {"grad_norm": float(grad_norm), "grad_norm_local": float(local_norm)}
        if torch.isfinite(grad_norm):
            self.nonfinite_in_row = 0
            if self.cfg.optim.sgd_step > 0:
                rms = float(grad_norm) / math.sqrt(flat.numel())
                out["sgd_calibrated"] = int(calibrate_sgd(self.optimizer, rms, self.cfg.optim.sgd_step))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            out["skipped"] = 0
        else:
            self.skipped += 1
            self.nonfinite_in_row += 1
            self.optimizer.zero_grad(set_to_none=False)
            if self.scaler is not None:
                self.scaler.update()
            out["skipped"] = 1
            if self.nonfinite_in_row >= self.cfg.run.max_nonfinite_in_row:
                raise NonFiniteError(
                    f"{self.nonfinite_in_row} iterations in a row had non-finite gradients (up to iteration "
                    f"{self.iteration + 1}); stopped without saving them. Resume from the last checkpoint with a "
                    "lower optim.lr, run.mixed_precision=no or a larger shaping.scale"
                )
        out["skipped_total"] = self.skipped
        return out

    # -- the stopping rule ---------------------------------------------------------------------

    def _classifier_probes(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """Fixed probes of the classifier margin, the same on every process and at every check: ws (P, ...),
        front cameras (P, 25) as the single view draws them, PROBE_TIMESTEPS timesteps over the objective's step
        range, and the seed of the probe noise and of the VAE's posterior sample."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(rank_seed(cfg.run.seed, PROBE_STREAM))
        n = cfg.optim.stop_probes
        z = torch.randn(n, self.G.z_dim, generator=gen).to(self.device)
        with torch.no_grad():
            ws = self.frozen.mapping(z, self.c_cond.expand(n, -1).to(self.device), cfg.latent.truncation_psi,
                                     cfg.latent.truncation_cutoff)  # fmt: skip
        yaw, pitch = math.radians(cfg.single.yaw_range), math.radians(cfg.single.pitch_range)
        cams = cameras.sample_front_cameras(n, gen, yaw, pitch)[0].to(self.device)
        o = cfg.objective
        index = torch.linspace(o.min_step_index, o.max_step_index, PROBE_TIMESTEPS).round().long().unique()
        return ws, cams, self.timesteps[index].to(self.device), int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

    @torch.no_grad()
    def classifier_margin(self) -> float:
        """The diffusion classifier margin (``margin``) of the trainable generator's current renders: the fixed
        probe views (single-view cameras, no control) encoded, noised at the probe timesteps with the probe noise,
        and denoised once with [source prompt; style prompt] as [uncond; cond]."""
        ws, cams, t, seed = self.probes
        images = self.G.synthesis(ws, cams, noise_mode="const", **self.ctx.render_kwargs).image.float()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training streams stay as they are
            torch.manual_seed(seed)
            x0 = self.prior.encode(shaping.resize_to(images, self.ctx.image_size)).float()
        k, n = len(t), len(x0)
        eps = torch.randn(k * n, *x0.shape[1:], generator=torch.Generator().manual_seed(seed)).to(self.device)
        x0, t_all = x0.repeat(k, 1, 1, 1), t.repeat_interleave(n)
        source = self.prior.embed_prompts(self.cfg.prompt.source_prompt).cond
        prompts = PromptEmbeds(uncond=source, cond=self.prompt.cond).repeat(k * n)
        x_t = self.prior.add_noise(x0, eps, t_all)
        ((eps_src, eps_sty),) = self.prior.predict_noise([NoiseQuery(x_t, t_all, prompts)])
        return stopping.margin((eps_src - eps).square(), (eps_sty - eps).square())

    @property
    def _stopped_by_rule(self) -> bool:
        return self.stop_triggered_at > 0 and self.cfg.optim.stop_action == "stop"

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

    # -- state ---------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return dict(zip(self.param_names, self.params, strict=True))

    def _barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        state = checkpointing.capture_rng({"stylize": self.rng})
        if self.prev_planes is not None:
            state.tensors["prev_planes.frozen"] = self.prev_planes[0].cpu().contiguous()
            state.tensors["prev_planes.trainable"] = self.prev_planes[1].cpu().contiguous()
        if self.scaler is not None:
            state.meta["grad_scaler"] = self.scaler.state_dict()
        shared = {
            "skipped": self.skipped,
            "nonfinite_in_row": self.nonfinite_in_row,
            "stop_triggered_at": self.stop_triggered_at,
            "param_names": self.param_names,
            "generator_sha256": self.generator_digest,
        }
        return checkpointing.save_checkpoint(
            self.run_dir,
            self.iteration,
            self.trainable_state(),
            self.optimizer,
            state,
            shared,
            dumps(self.cfg),
            rank=self.rank,
            world_size=self.world_size,
            barrier=self._barrier,
            keep_last=self.cfg.run.keep_last,
        )

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore weights, optimizer, RNG streams, counters and the previous identity from a checkpoint."""
        ckpt = checkpointing.load_checkpoint(path, self.rank, self.world_size)
        saved_digest = ckpt.meta.get("generator_sha256", "")
        if saved_digest and self.generator_digest and saved_digest != self.generator_digest:
            raise checkpointing.ResumeError(
                f"{ckpt.path} stylises another generator (sha256 {saved_digest[:12]}..., this one "
                f"{self.generator_digest[:12]}...); resume with the run's own generator ({self.cfg.model.generator})"
            )
        if ckpt.meta["param_names"] != self.param_names:
            raise checkpointing.ResumeError(
                f"{ckpt.path} trained a different parameter set (optim.train_modules / train_biases changed?); "
                "resume with the checkpoint's config"
            )
        with torch.no_grad():
            for name, p in zip(self.param_names, self.params, strict=True):
                p.copy_(ckpt.trainable[name])
        checkpointing.optimizer_from_files(self.optimizer, ckpt.optimizer_tensors, ckpt.meta["optimizer"])
        checkpointing.restore_rng(ckpt.rank_state, {"stylize": self.rng})
        t = ckpt.rank_state.tensors
        self.prev_planes = None
        if "prev_planes.frozen" in t:
            self.prev_planes = (t["prev_planes.frozen"].to(self.device), t["prev_planes.trainable"].to(self.device))
        if self.scaler is not None and "grad_scaler" in ckpt.rank_state.meta:
            self.scaler.load_state_dict(ckpt.rank_state.meta["grad_scaler"])
        self.iteration = ckpt.iteration
        self.skipped = int(ckpt.meta["skipped"])
        self.nonfinite_in_row = int(ckpt.meta["nonfinite_in_row"])
        self.stop_triggered_at = int(ckpt.meta.get("stop_triggered_at", 0))  # absent before the stopping rule
        return ckpt.path

    # -- outputs a user looks at ---------------------------------------------------------------

    def write_samples(self) -> Path:
        return self.previews.write_samples(self.iteration)

    def write_turntables(self) -> list[Path]:
        return self.previews.write_turntables()

    @property
    def generator_path(self) -> Path:
        return self.run_dir / "generator.safetensors"

    def save_generator(self) -> Path:
        """The stylised generator as a loadable checkpoint (``headstyle render --generator`` takes it), written when
        the run reaches run.iterations: its presence says the run finished."""
        save_generator(self.G, self.generator_path)
        return self.generator_path

    # -- the loop ------------------------------------------------------------------------------

    def _gather_scalar(self, value: float) -> list[float]:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.gather(t).cpu().tolist() if self.world_size > 1 else [value]

    def _weights_digest(self) -> float:
        """Sum of all trainable weights in float64: equal on every rank when data-parallel stays in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params))

    def train(self, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
        """Run until cfg.run.iterations (resuming from ``resume`` if given) holding the run folder's lock (another live
        writer there: FolderLockedError); SIGINT/SIGTERM checkpoint and stop."""
        with folder_lock(self.run_dir) if self.is_main else contextlib.nullcontext():
            return self._train(resume, progress)

    def _train(self, resume: str | Path | None, progress: bool) -> TrainResult:
        cfg = self.cfg
        if resume is None and self.is_main:
            checkpointing.check_fresh_run_dir(self.run_dir)
        resumed = self.load_checkpoint(resume) if resume is not None else None
        if self.is_main:
            if self.iteration < cfg.run.iterations:
                # A run continued past an earlier end: its generator file is that end's, not this run's result.
                for path in (self.generator_path, sidecar_path(self.generator_path)):
                    path.unlink(missing_ok=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.toml", dumps(cfg))
        log = MetricsLog(self.run_dir, self.iteration if resumed else None) if self.is_main else None
        if self.is_main and self.iteration == 0:
            self.write_samples()
        last_ckpt: Path | None = resumed
        interrupted = False
        with STOP.deferred(), progress_bar(disable=not (progress and self.is_main)) as bar:
            task = bar.add_task("stylize", total=cfg.run.iterations, completed=self.iteration)
            while self.iteration < cfg.run.iterations and not self._stopped_by_rule:
                t0 = time.perf_counter()
                metrics = self.step()
                self.iteration += 1
                metrics.update(self._signals())
                metrics["seconds"] = time.perf_counter() - t0
                metrics["effective_batch"] = cfg.run.batch_size * self.world_size
                if self.world_size > 1:
                    metrics["loss_per_rank"] = self._gather_scalar(metrics["loss"])
                    metrics["grad_norm_local_per_rank"] = self._gather_scalar(metrics["grad_norm_local"])
                    metrics["weights_digest_per_rank"] = self._gather_scalar(self._weights_digest())
                if log is not None and (self.iteration % cfg.run.log_every == 0 or self.iteration == cfg.run.iterations
                                        or stopping.MARGIN in metrics):  # fmt: skip
                    log.write({"iteration": self.iteration, **metrics})
                bar.update(
                    task,
                    advance=1,
                    info=f"loss {metrics['loss']:.4g} rd {metrics['relative_distance']:.3g} skipped {self.skipped}",
                )
                if self.is_main and self.iteration % cfg.run.sample_every == 0:
                    self.write_samples()
                signalled = STOP.requested_on_any(self.world_size, self.device)
                done = self.iteration == cfg.run.iterations or self._stopped_by_rule
                if signalled or self.iteration % cfg.run.checkpoint_every == 0 or done:
                    last_ckpt = self.save_checkpoint()
                if signalled:
                    interrupted = self.iteration < cfg.run.iterations
                    break
        if log is not None:
            log.close()
            self.write_signals()
        generator_path = None
        if not interrupted and self.is_main:
            generator_path = self.save_generator()
            if self.iteration % cfg.run.sample_every:
                self.write_samples()
            if cfg.run.turntable_identities > 0:
                self.write_turntables()
        self._barrier()
        return TrainResult(self.iteration, interrupted, last_ckpt, generator_path, self.skipped, STOP.signal,
                           self.stop_triggered_at)
