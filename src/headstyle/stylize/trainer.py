"""The domain-adaptation trainer: multi-view likelihood distillation into a 3D head generator.

One iteration (LD script defaults, ../shared/reference/likelihood-distillation.md):
  1. z ~ N(0, I); ws from the FROZEN mapping (psi 0.75, cutoff 14, camera yaw 0 / pitch 0.2).
  2. single view: a front camera and its mirror rendered by the trainable generator (with SR);
     the frozen generator renders the same camera for the canny control.
  3. grid: 4 random 360-degree cameras; the trainable RAW renders upsampled and tiled 2x2;
     depth control and mask from the frozen renders.
  4. ONE VAE encode of every render and ONE prior call for both branches (each branch with
     its own ControlNet); the LD gradient (or SDS / NFSD / DDS / IDS from distill.objectives);
     rank re-weighting and mirror injection on the single view; mask / scale / clamp.
  5. relative-distance regulariser between this and the previous identity's tri-grids, and
     optionally the Tweedie-target MSE of the single view.
  6. ONE backward; gradients averaged over processes (one all-reduce, as DDP); non-finite
     steps skipped and counted; Adam on the trainable parameters.
Noise: fresh (the script), fixed, or MV-NRS on the grid (anchor noise warped cell to cell with
the frozen depth; the resampled candidate and its anchor twin share the same prior call).
The trainer holds a Generator and a ScorePrior as objects (any implementation of the seams);
``build_from_config`` is the factory the CLI uses.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import inspect
import io
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from safetensors.torch import save_file
from torch import Tensor, nn

from headstyle import cameras, export
from headstyle.distill import noise, shaping
from headstyle.distill.inject import inject
from headstyle.distill.objectives import DistillTarget, run_objective, tweedie_x0
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.generator.base import Generator, RenderOutput
from headstyle.generator.checkpoint import load_generator, save_generator
from headstyle.priors import controls
from headstyle.priors.base import Control, ScorePrior
from headstyle.stylize import checkpointing
from headstyle.stylize.config import StylizeConfig, dumps
from headstyle.stylize.regularisers import LPIPS, relative_distance


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations produced non-finite gradients; the run stopped without saving them."""


@dataclass
class TrainResult:
    iteration: int
    interrupted: bool
    checkpoint: Path | None
    generator_path: Path | None
    skipped_steps: int


@dataclass
class _Branch:
    """One branch of an iteration: what the prior sees (images at its size) and what shapes the gradient.

    planes: (frozen, trainable) tri-grids of the branch's identities, for the regulariser.
    geometry: frozen (depth, mask, cameras) of the grid's views, for MV-NRS.
    """

    kind: str
    images: Tensor
    mask: Tensor
    control: Control | None
    source: Tensor | None
    planes: tuple[Tensor, Tensor] | None
    geometry: tuple[Tensor, Tensor, Tensor] | None = None
    latents: Tensor | None = None
    latents_mirror: Tensor | None = None
    source_latents: Tensor | None = None


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, process rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs the generator's renderer and libraries draw from (per process)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global stream third-party code draws from)
    torch.manual_seed(seed)


def prior_image_size(prior: ScorePrior) -> int:
    """The image size a prior expects: DiffusersPrior.image_size, or the side of an analytic prior's images."""
    size = getattr(prior, "image_size", None)
    if isinstance(size, int):
        return size
    shape = getattr(prior, "image_shape", None)
    if shape is not None:
        return int(shape[-1])
    raise ValueError("cannot tell the prior's image size: set model.prior_image_size")


def grid_image(views: Tensor, size: int) -> Tensor:
    """(N*4, C, h, w) renders, 4 per identity -> (N, C, size, size) 2x2 grids ("grid denoising").

    Each view is upsampled to size/2 bilinearly with align_corners=True (the script's x4 of 64 px raw renders).
    """
    half = size // 2
    up = F.interpolate(views.float(), size=(half, half), mode="bilinear", align_corners=True)
    up = up.reshape(-1, 4, *up.shape[1:])
    return shaping.tile_2x2([up[:, k] for k in range(4)])


def _to_unit(images: Tensor) -> Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


class MetricsLog:
    """JSONL + CSV log of per-iteration metrics, and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, resume_iteration: int | None) -> None:
        self.jsonl = run_dir / "log.jsonl"
        self.csv = run_dir / "log.csv"
        if resume_iteration is not None:
            self._truncate(resume_iteration)
        else:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
        self._columns: list[str] | None = None
        if self.csv.is_file():
            with self.csv.open(newline="") as fh:
                self._columns = next(csv.reader(fh), None)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            pass
        else:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate(self, iteration: int) -> None:
        """Drop entries written after the checkpoint we resume from (they are recomputed)."""
        if self.jsonl.is_file():
            keep = [line for line in self.jsonl.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
            export.atomic_write_text(self.jsonl, "".join(f"{line}\n" for line in keep))
        if self.csv.is_file():
            with self.csv.open(newline="") as fh:
                rows = list(csv.reader(fh))
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= iteration])
            export.atomic_write_text(self.csv, out.getvalue())

    def write(self, metrics: dict[str, Any]) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        new_file = self._columns is None
        if new_file:
            self._columns = list(scalars)
        with self.csv.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new_file:
                writer.writerow(self._columns)
            writer.writerow([scalars.get(k, "") for k in self._columns])
        if self._tb is not None:
            for key, value in scalars.items():
                if key != "iteration":
                    self._tb.add_scalar(key, value, metrics["iteration"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its iteration, checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            # A second signal means "now": fall back to the default behaviour.
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the host
                pass
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


class Stylizer:
    """Fine-tunes ``generator`` towards the prompt of ``cfg`` with the scores of ``prior``.

    generator: the model to stylise (an nn.Module implementing the Generator protocol); its
    trainable subset is chosen by cfg.optim, and a frozen copy is taken here for controls, masks
    and the regulariser. accelerator: an ``accelerate.Accelerator`` (created when None) giving
    the device, the process rank and the number of processes.
    """

    def __init__(self, cfg: StylizeConfig, generator: Generator, prior: ScorePrior, accelerator: Any = None) -> None:
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

        self.frozen = copy.deepcopy(generator).requires_grad_(False).eval().to(self.device)
        self.G = generator.to(self.device).requires_grad_(False)
        trainable = {
            id(p) for p in generator.trainable_parameters(tuple(cfg.optim.train_modules), cfg.optim.train_biases)
        }
        if not trainable:
            raise ValueError(
                f"optim.train_modules={list(cfg.optim.train_modules)} selects no parameters of this generator; "
                "name modules it has (e.g. backbone.synthesis, superresolution)"
            )
        named = [(n, p) for n, p in generator.named_parameters() if id(p) in trainable]
        self.param_names = [n for n, _ in named]
        self.params = [p.requires_grad_(True) for _, p in named]
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.mixed_precision == "fp16" else None

        seed_everything(rank_seed(cfg.run.seed, self.rank))
        # Identities, cameras, timesteps and noise: one explicit stream per process (per-rank seed).
        self.rng = torch.Generator().manual_seed(rank_seed(cfg.run.seed, self.rank))
        self.iteration = 0
        self.skipped = 0
        self.nonfinite_in_row = 0
        self.prev_planes: tuple[Tensor, Tensor] | None = None
        self._frozen_samples: Tensor | None = None

        self.prompt = prior.embed_prompts(cfg.prompt.prompt, cfg.prompt.negative_prompt)
        self.source_prompt = None
        # A prior with content references (Style Fusion Attention) reads each sample's frozen render.
        self._style_content = callable(getattr(prior, "set_content", None))
        self._need_source = cfg.objective.name in ("dds", "ids") or self._style_content
        if cfg.objective.name in ("dds", "ids"):
            self.source_prompt = prior.embed_prompts(cfg.objective.source_prompt, cfg.prompt.negative_prompt)
        self.timesteps = prior.inference_timesteps(cfg.objective.num_inference_steps).long().cpu()
        self.c_cond = cameras.cameras(cfg.latent.cond_yaw, cfg.latent.cond_pitch)
        if cfg.single.enabled and len(cfg.single.rank_weights) > prior.latent_channels:
            raise ValueError(
                f"single.rank_weights has {len(cfg.single.rank_weights)} entries but the prior's latents have "
                f"{prior.latent_channels} channels; give at most {prior.latent_channels} (or [] to disable)"
            )
        self.controlnets = set(getattr(prior, "controlnets", None) or ())
        self.image_size = cfg.model.prior_image_size or prior_image_size(prior)
        # Extra synthesis arguments beyond the Generator protocol, for generators that take them.
        self.render_kwargs: dict[str, Any] = {}
        if "generate_background" in inspect.signature(generator.synthesis).parameters:
            self.render_kwargs["generate_background"] = cfg.model.background
        self.lpips = None
        if cfg.single.enabled and cfg.regularisers.lpips > 0:
            r = cfg.regularisers
            self.lpips = LPIPS.from_files(r.lpips_alexnet, r.lpips_linear).to(self.device)
        self.depth_estimator = None
        if cfg.grid.enabled and cfg.model.depth_estimator and "depth" in self.controlnets:
            self.depth_estimator = controls.MonocularDepth.from_pretrained(cfg.model.depth_estimator, self.device)

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

    def _objective_hyper(self) -> dict[str, Any]:
        o = self.cfg.objective
        hyper: dict[str, Any] = {"guidance_scale": self.cfg.prompt.guidance_scale}
        if o.name in ("ld", "sds"):
            hyper["weighting"] = o.weighting
        if o.name == "ids":
            hyper.update(fpr_iterations=o.fpr_iterations, fpr_lambda=o.fpr_lambda)
        return hyper

    def _noise(self, shape: tuple[int, ...], slot: int) -> Tensor:
        """eps for one branch: fresh from the run's stream, or (noise=fixed) the same eps every iteration
        for each (process, branch, batch slot)."""
        if self.cfg.objective.noise == "fixed":
            n = shape[0]
            ids = range(self.rank * n + slot * 10_000, self.rank * n + slot * 10_000 + n)
            return torch.cat([noise.identity_noise((1, *shape[1:]), i, self.cfg.run.seed) for i in ids]).to(self.device)
        return noise.random_noise(shape, self.rng, self.device)

    def _control(self, name: str, make: Callable[[], Tensor], scale: float) -> Control | None:
        """A ControlNet input when the prior has a ControlNet of that name (the image is only made then)."""
        return Control(name, make(), scale) if name in self.controlnets else None

    def _render_single(self, ws: Tensor) -> _Branch:
        """The single view and its mirror (trainable, with SR) and the frozen render of the view (control)."""
        cfg, n, dev = self.cfg, ws.shape[0], self.device
        c, _, _ = cameras.sample_front_cameras(n, self.rng, cfg.single.yaw_range, cfg.single.pitch_range)
        cams = torch.cat([c, cameras.mirror(c)]) if cfg.single.mirror else c
        kw = self.render_kwargs
        out = self.G.synthesis(ws.repeat(len(cams) // n, 1, 1), cams.to(dev), noise_mode="const", render_sr=True, **kw)
        with torch.no_grad():
            fro = self.frozen.synthesis(ws, c.to(dev), noise_mode="const", render_sr=True, **kw)
        return _Branch(
            kind="single",
            images=shaping.resize_to(out.image.float(), self.image_size),
            mask=out.mask.detach().float(),
            control=self._control("canny", lambda: self._canny(fro.image), cfg.single.control_scale),
            source=shaping.resize_to(fro.image.float(), self.image_size) if self._need_source else None,
            planes=None if out.planes is None else (fro.planes, out.planes[:n]),
        )

    def _render_grid(self, ws: Tensor) -> _Branch:
        """Four 360-degree raw renders per identity tiled 2x2 (trainable), frozen depth/mask for control and mask."""
        cfg, size = self.cfg, self.image_size
        cams = cameras.sample_360_cameras(4 * ws.shape[0], self.rng, cfg.grid.pitch_range)[0].to(self.device)
        ws4 = ws.repeat_interleave(4, dim=0)
        out = self.G.synthesis(ws4, cams, noise_mode="const", render_sr=False, **self.render_kwargs)
        with torch.no_grad():
            sr = self.depth_estimator is not None
            fro = self.frozen.synthesis(ws4, cams, noise_mode="const", render_sr=sr, **self.render_kwargs)
        return _Branch(
            kind="grid",
            images=grid_image(out.image_raw, size),
            mask=grid_image(fro.mask, 2 * fro.mask.shape[-1]),
            control=self._control("depth", lambda: self._depth(fro, size), cfg.grid.control_scale),
            source=grid_image(fro.image_raw, size) if self._need_source else None,
            planes=None if out.planes is None else (fro.planes[::4], out.planes[::4]),
            geometry=(fro.depth.float(), fro.mask.float(), cams),
        )

    @torch.no_grad()
    def _first_previous_identity(self, n: int) -> tuple[Tensor, Tensor] | None:
        """Tri-grids of an identity drawn before training (the script's batch 0), so the relative-distance
        regulariser acts from the first iteration. Trainable and frozen still agree, so one render serves both."""
        ws = self._mapping(n)
        out = self.frozen.synthesis(
            ws, self.c_cond.expand(n, -1).to(self.device), render_sr=False, **self.render_kwargs
        )
        return None if out.planes is None else (out.planes.float(), out.planes.float())

    def _targets(self, branches: list[_Branch]) -> tuple[list[DistillTarget], dict[int, DistillTarget]]:
        """One DistillTarget per branch (its timesteps and noise), plus MV-NRS anchor twins by branch index."""
        cfg, dev = self.cfg, self.device
        targets, anchors = [], {}
        for i, b in enumerate(branches):
            n = b.latents.shape[0]
            ts = sample_ddim_steps(
                n,
                cfg.objective.min_step_index,
                cfg.objective.max_step_index,
                timesteps=self.timesteps,
                generator=self.rng,
            )
            target = DistillTarget(
                latents=b.latents,
                prompt=self.prompt,
                t=ts.t.to(dev),
                noise=self._noise(tuple(b.latents.shape), i),
                control=b.control,
                step_index=ts.step_index.to(dev),
                source_latents=b.source_latents,
                source_prompt=self.source_prompt,
            )
            if b.kind == "grid" and cfg.objective.noise == "mv_nrs":
                anchor = self._mv_nrs_anchor(tuple(b.latents.shape), b.geometry)
                target.noise = noise.resample_noise(anchor, cfg.objective.mv_nrs_sigma, self.rng)
                anchors[i] = dataclasses.replace(target, noise=anchor)
            targets.append(target)
        return targets, anchors

    def step(self) -> dict[str, Any]:
        """One training iteration on this process; returns its metrics (after the optimizer step or skip)."""
        cfg = self.cfg
        n = cfg.run.batch_size
        if self.prev_planes is None and cfg.regularisers.relative_distance > 0:
            self.prev_planes = self._first_previous_identity(n)
        ws = self._mapping(n)
        with self._autocast():
            branches = []
            if cfg.single.enabled:
                branches.append(self._render_single(ws))
            if cfg.grid.enabled:
                branches.append(self._render_grid(ws))
            # Every image the prior sees (trainable renders, then DDS/IDS sources) goes through ONE encode.
            sources = [b.source for b in branches if b.source is not None]
            latents = self.prior.encode(torch.cat([b.images for b in branches] + sources)).float()
        chunks = latents.split([len(b.images) for b in branches] + [len(x) for x in sources])
        for i, b in enumerate(branches):
            mirrored = b.kind == "single" and cfg.single.mirror
            b.latents, b.latents_mirror = (chunks[i][:n], chunks[i][n:]) if mirrored else (chunks[i], None)
            b.source_latents = chunks[len(branches) + i] if sources else None
        targets, anchors = self._targets(branches)
        if self._style_content:
            order = list(range(len(branches))) + list(anchors)
            self.prior.set_content(torch.cat([branches[i].source_latents for i in order]), images_per_group=1)
        # ONE prior call for every branch (IDS: N fixed-point calls + 1); MV-NRS's anchor twins ride along.
        with self._autocast():
            results = run_objective(
                cfg.objective.name, self.prior, targets + list(anchors.values()), **self._objective_hyper()
            )
        anchor_results = dict(zip(anchors, results[len(targets) :], strict=True))

        metrics: dict[str, Any] = {}
        loss = torch.zeros((), device=self.device)
        for i, (b, res) in enumerate(zip(branches, results[: len(targets)], strict=True)):
            grad = res.grad
            if b.kind == "single":
                if cfg.single.rank_weights:
                    grad = shaping.rank_reweight(grad, cfg.single.rank_weights, cfg.single.restandardize)
                if b.latents_mirror is not None:
                    g_base, g_mirror = shaping.mirror_gradients(grad, cfg.single.base_weight, cfg.single.mirror_weight)
                    final, st = self._postprocess(g_base, b.mask[:n])
                    g_mirror, st_m = self._postprocess(g_mirror, b.mask[n:])
                    loss = loss + cfg.single.weight * (inject(b.latents, final) + inject(b.latents_mirror, g_mirror))
                    clamped = int(st.clamped + st_m.clamped)
                else:
                    final, st = self._postprocess(grad, b.mask)
                    loss = loss + inject(b.latents, final, cfg.single.weight)
                    clamped = int(st.clamped)
                for name, (weight, value) in self._tweedie_losses(res, b.images[:n]).items():
                    loss = loss + weight * value
                    metrics[name] = float(value.detach())
            else:
                if i in anchor_results:
                    grad, metrics["mv_nrs_kept_resampled"] = self._mv_nrs_retain(
                        res.grad, anchor_results[i].grad, targets[i].noise, anchors[i].noise, b.geometry
                    )
                final, st = self._postprocess(grad, b.mask)
                loss = loss + inject(b.latents, final, cfg.grid.weight)
                clamped = int(st.clamped)
            metrics.update(
                {
                    f"{b.kind}_t": int(res.t[0]),
                    f"{b.kind}_grad_norm": float(final.norm()),
                    f"{b.kind}_nonfinite": int(res.diagnostics["nonfinite"]),
                    f"{b.kind}_clamped": clamped,
                }
            )

        reg = torch.zeros((), device=self.device)
        planes = next((b.planes for b in branches if b.planes is not None), None)
        if cfg.regularisers.relative_distance > 0 and planes is not None:
            if self.prev_planes is not None:
                reg = relative_distance(self.prev_planes[0], planes[0], self.prev_planes[1], planes[1])
                loss = loss + cfg.regularisers.relative_distance * reg
            self.prev_planes = (planes[0].detach().float(), planes[1].detach().float())
        metrics["relative_distance"] = float(reg.detach())
        metrics["loss"] = float(loss.detach())

        self.optimizer.zero_grad(set_to_none=False)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        metrics.update(self._reduce_and_step())
        return metrics

    @staticmethod
    def _per_view(x: Tensor) -> list[Tensor]:
        """(N*4, ...) grid views, identity-major -> the 4 grid cells, each (N, ...)."""
        x = x.reshape(-1, 4, *x.shape[1:])
        return [x[:, k] for k in range(4)]

    def _mv_nrs_anchor(self, shape: tuple[int, ...], geometry: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """MV-NRS anchor noise of a grid: cell 0 fresh, each next cell warped from the previous one (eq. 11)."""
        depth, mask, cams = (self._per_view(t) for t in geometry)
        cell = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
        return shaping.tile_2x2(noise.init_anchor_noise(cell, depth, cams, self.rng, mask))

    def _mv_nrs_retain(
        self,
        cand_grad: Tensor,
        anchor_grad: Tensor,
        cand_noise: Tensor,
        anchor_noise: Tensor,
        geometry: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor, float]:
        """Per grid cell keep the resampled candidate or the anchor, whichever gradient aligns better with the
        previous cell's kept gradient warped into this view (eqs. 14-15). Cell 0 has no driving view and keeps
        its resampled noise. Returns the kept grid gradient and the fraction of cells that kept the candidate.
        """
        depth, mask, cams = (self._per_view(t) for t in geometry)
        cand, anc = shaping.untile_2x2(cand_grad), shaping.untile_2x2(anchor_grad)
        cand_eps, anc_eps = shaping.untile_2x2(cand_noise), shaping.untile_2x2(anchor_noise)
        kept, kept_candidate = [cand[0]], float(cand[0].shape[0])
        for k in range(1, 4):
            driving, _ = geometry.splat_to_view(kept[-1], depth[k - 1], cams[k - 1], cams[k], mask[k - 1])
            choice = noise.retain_better_aligned(driving, cand_eps[k], cand[k], anc_eps[k], anc[k])
            kept.append(choice.grad)
            kept_candidate += float(choice.keep_candidate.sum())
        return shaping.tile_2x2(kept), kept_candidate / (4 * cand[0].shape[0])

    def _postprocess(self, grad: Tensor, mask: Tensor) -> tuple[Tensor, shaping.GradStats]:
        sh = self.cfg.shaping
        return shaping.postprocess(grad, mask if sh.use_mask else None, sh.scale, sh.clamp)

    def _canny(self, image: Tensor) -> Tensor:
        """Canny edges of the frozen render's red channel (thresholds from the config), at the prior's size."""
        s = self.cfg.single
        return controls.canny_control(
            shaping.resize_to(image.float(), self.image_size), low=s.canny_low, high=s.canny_high
        )

    def _depth(self, fro: RenderOutput, size: int) -> Tensor:
        """Depth control of the grid: per frozen view a near-bright map in [0, 1], tiled 2x2.

        From the rendered depth (foreground min-max, inverted) by default, or from a monocular
        depth estimator on the frozen 512 px renders (the LD script's Depth Anything V2) when
        model.depth_estimator names a local checkpoint.
        """
        if self.depth_estimator is not None:
            control = controls.disparity_control(self.depth_estimator(fro.image.float()))
        else:
            control = controls.depth_control(fro.depth, fro.mask)
        return grid_image(control, size)

    def _tweedie_losses(self, res: Any, render: Tensor) -> dict[str, tuple[float, Tensor]]:
        """The script's Tweedie-target losses of the single view: x0_hat from one DDIM step with the full CFG
        eps, decoded without grad; weight * MSE(x0_hat in [0, 1], (render + 1) / 2) and weight * LPIPS."""
        r = self.cfg.regularisers
        if r.tweedie_mse <= 0 and self.lpips is None:
            return {}
        with torch.no_grad():
            target = self.prior.decode(tweedie_x0(self.prior.alphas_cumprod, res, self.cfg.prompt.guidance_scale))
        out = {}
        if r.tweedie_mse > 0:
            out["tweedie_mse"] = (r.tweedie_mse, F.mse_loss((render.float() + 1) / 2, _to_unit(target)))
        if self.lpips is not None:
            out["tweedie_lpips"] = (r.lpips, self.lpips(target.clamp(-1, 1), render).mean())
        return out

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
        shared = {"skipped": self.skipped, "nonfinite_in_row": self.nonfinite_in_row, "param_names": self.param_names}
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
        return ckpt.path

    # -- outputs a user looks at ---------------------------------------------------------------

    def _sample_cameras(self) -> Tensor:
        r = self.cfg.run
        return cameras.cameras(torch.tensor(r.sample_yaws), torch.full((len(r.sample_yaws),), r.sample_pitch))

    @torch.no_grad()
    def _render_views(self, G: Generator, ws: Tensor, cams: Tensor) -> Tensor:
        """(identities * views, 3, H, W) images in [-1, 1], one identity at a time."""
        rows = []
        for w in ws:
            sr = self.cfg.run.preview_sr
            out = G.synthesis(
                w[None].expand(len(cams), -1, -1),
                cams.to(self.device),
                noise_mode="const",
                render_sr=sr,
                **self.render_kwargs,
            )
            rows.append((out.image if sr else out.image_raw).float().cpu())
        return torch.cat(rows)

    def _sample_ws(self, count: int) -> Tensor:
        # A separate seeded stream: the same identities at every sample, whatever the training RNG.
        g = torch.Generator().manual_seed(self.cfg.run.seed + 12345)
        z = torch.randn(count, self.G.z_dim, generator=g).to(self.device)
        c = self.c_cond.expand(count, -1).to(self.device)
        with torch.no_grad():
            return self.frozen.mapping(z, c, self.cfg.latent.truncation_psi, self.cfg.latent.truncation_cutoff)

    def write_samples(self) -> Path:
        """PNG grid: per identity a row of frozen renders then a row of trainable renders at fixed views."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ws = self._sample_ws(self.cfg.run.sample_identities)
            cams = self._sample_cameras()
            if self._frozen_samples is None:
                self._frozen_samples = self._render_views(self.frozen, ws, cams)
            trained = self._render_views(self.G, ws, cams)
        v = len(cams)
        rows = []
        for i in range(len(ws)):
            rows += [self._frozen_samples[i * v : (i + 1) * v], trained[i * v : (i + 1) * v]]
        path = self.run_dir / "samples" / f"iter_{self.iteration:07d}.png"
        export.save_grid(torch.cat(rows), path, cols=v)
        return path

    def write_turntables(self) -> list[Path]:
        r = self.cfg.run
        paths: list[Path] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            ws = self._sample_ws(r.turntable_identities)
            cams = cameras.turntable_cameras(r.turntable_frames, pitch=r.sample_pitch)
            for i in range(len(ws)):
                frames = self._render_views(self.G, ws[i : i + 1], cams)
                paths += export.save_turntable(frames, self.run_dir / "turntable" / f"identity_{i}")
        return paths

    def save_generator(self) -> Path:
        """The stylised generator as a loadable checkpoint (``headstyle render --generator`` takes it)."""
        path = self.run_dir / "generator.safetensors"
        try:
            save_generator(self.G, path)
        except TypeError:
            # Generators without a PanoHead configuration (e.g. the lab's): weights only.
            with export.atomic_path(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.G.state_dict().items()}, str(tmp))
        return path

    # -- the loop ------------------------------------------------------------------------------

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _gather_scalar(self, value: float) -> list[float]:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.gather(t).cpu().tolist() if self.world_size > 1 else [value]

    def _weights_digest(self) -> float:
        """Sum of all trainable weights in float64: equal on every rank when data-parallel stays in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params))

    def train(self, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
        """Run until cfg.run.iterations (resuming from ``resume`` if given); SIGINT/SIGTERM checkpoint and stop."""
        cfg = self.cfg
        resumed = self.load_checkpoint(resume) if resume is not None else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            export.atomic_write_text(self.run_dir / "config.toml", dumps(cfg))
        log = MetricsLog(self.run_dir, self.iteration if resumed else None) if self.is_main else None
        if self.is_main and self.iteration == 0:
            self.write_samples()
        stop = _StopFlag()
        last_ckpt: Path | None = resumed
        interrupted = False
        columns = (
            TextColumn("[bold]stylize"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
        )
        with stop.installed(), Progress(*columns, disable=not (progress and self.is_main)) as bar:
            task = bar.add_task("stylize", total=cfg.run.iterations, completed=self.iteration, losses="")
            while self.iteration < cfg.run.iterations:
                t0 = time.perf_counter()
                metrics = self.step()
                self.iteration += 1
                metrics["seconds"] = time.perf_counter() - t0
                metrics["effective_batch"] = cfg.run.batch_size * self.world_size
                if self.world_size > 1:
                    metrics["loss_per_rank"] = self._gather_scalar(metrics["loss"])
                    metrics["grad_norm_local_per_rank"] = self._gather_scalar(metrics["grad_norm_local"])
                    metrics["weights_digest_per_rank"] = self._gather_scalar(self._weights_digest())
                if log is not None and (
                    self.iteration % cfg.run.log_every == 0 or self.iteration == cfg.run.iterations
                ):
                    log.write({"iteration": self.iteration, **metrics})
                bar.update(
                    task,
                    advance=1,
                    losses=f"loss {metrics['loss']:.4g} rd {metrics['relative_distance']:.3g} skipped {self.skipped}",
                )
                if self.is_main and self.iteration % cfg.run.sample_every == 0:
                    self.write_samples()
                stopping = self._any_rank(stop.requested)
                if stopping or self.iteration % cfg.run.checkpoint_every == 0 or self.iteration == cfg.run.iterations:
                    last_ckpt = self.save_checkpoint()
                if stopping:
                    interrupted = self.iteration < cfg.run.iterations
                    break
        if log is not None:
            log.close()
        generator_path = None
        if not interrupted and self.is_main:
            generator_path = self.save_generator()
            if self.iteration % cfg.run.sample_every:
                self.write_samples()
            if cfg.run.turntable_identities > 0:
                self.write_turntables()
        self._barrier()
        return TrainResult(self.iteration, interrupted, last_ckpt, generator_path, self.skipped)


class _RateColumn(ProgressColumn):
    """Iterations per second (rich's own speed estimate)."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} it/s" if speed else "-- it/s")


def build_prior(cfg: StylizeConfig, device: torch.device) -> ScorePrior:
    """The ScorePrior named by cfg.model (the CLI's factory; lab code passes its own prior object)."""
    from headstyle.priors.diffusers_prior import DiffusersPrior

    m = cfg.model
    controlnets = {}
    if cfg.single.enabled and m.canny_controlnet:
        controlnets["canny"] = m.canny_controlnet
    if cfg.grid.enabled and m.depth_controlnet:
        controlnets["depth"] = m.depth_controlnet
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.prior_dtype]
    if device.type == "cpu":
        dtype = torch.float32  # half-precision convolutions are slow or missing on CPU
    prior = DiffusersPrior.from_pretrained(
        m.prior, vae=m.vae or None, controlnets=controlnets, device=device, dtype=dtype
    )
    return style_fusion_prior(cfg, prior) if cfg.style.image else prior


def style_fusion_prior(cfg: StylizeConfig, prior: ScorePrior) -> ScorePrior:
    """``prior`` with Style Fusion Attention reading cfg.style's image(s) (DiffStyle360) as the target's style."""
    from headstyle.attention.prior import StyleFusionConfig, StyleFusionPrior, load_image

    s = cfg.style
    size = prior_image_size(prior)
    with torch.no_grad():
        styles = [
            prior.encode(load_image(path, size).to(prior.device)) if path else None for path in (s.image, s.image_2)
        ]
    fusion = StyleFusionConfig(tau=s.tau, alpha=s.alpha, pairing=s.pairing, layers=s.layers, reference=s.reference)
    return StyleFusionPrior(prior, styles[0], styles[1], fusion, seed=cfg.run.seed)


def build_from_config(cfg: StylizeConfig, accelerator: Any = None) -> Stylizer:
    """Load the generator and prior named by the config and build the trainer."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=cfg.run.mixed_precision)
    if not cfg.model.generator:
        raise ValueError("model.generator is empty: pass --generator PATH (a PanoHead .pkl/.pth or our .safetensors)")
    generator = load_generator(cfg.model.generator, device=accelerator.device)
    prior = build_prior(cfg, accelerator.device)
    return Stylizer(cfg, generator, prior, accelerator)


def run_stylize(cfg: StylizeConfig, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build the trainer from the config (generator and prior from their paths) and train."""
    return build_from_config(cfg).train(resume=resume, progress=progress)
