"""The branches of a training step: what each one renders and how its prior results become a loss.

- ``SingleView``: a front camera and its mirror rendered by the trainable generator (with SR), the
  frozen render of the view for the canny control; rank re-weighting and mirror injection shape
  its gradient, and the script's Tweedie-target losses read its result.
- ``Grid``: 4 random 360-degree cameras; the trainable RAW renders upsampled and tiled 2x2, the
  frozen depth (or a monocular estimate) as control and the frozen mask; MV-NRS chains its noise
  from cell to cell with the frozen depth.

A step asks every branch to ``render``, encodes all images at once, asks each for its
``targets`` (one, or two with MV-NRS's anchor twin), makes ONE objective call over all targets and
gives each branch its results back in ``loss``.

Each branch registers itself (``register_branch``) under the name of its config section (whose
``enabled`` switches it on) in ``BRANCHES``; the step runs the enabled ones in registration order,
the order of this module: the single view, then the grid. That order fixes the branches' noise slots
and the order in which they draw from the run's random stream.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle import cameras, geometry
from headstyle.distill import noise, shaping
from headstyle.distill.inject import inject
from headstyle.distill.objectives import DistillResult, DistillTarget, tweedie_x0
from headstyle.generator.base import Generator, RenderOutput
from headstyle.priors import controls
from headstyle.priors.base import Control, Layout, ScorePrior
from headstyle.stylize.config import StylizeConfig
from headstyle.stylize.regularisers import LPIPS


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


@dataclass
class StepContext:
    """What the branches share: the config, both generators, the prior and its inputs' size, the run's
    random stream, synthesis options, and the optional LPIPS and depth estimator."""

    cfg: StylizeConfig
    G: Generator
    frozen: Generator
    prior: ScorePrior
    device: torch.device
    rng: torch.Generator
    image_size: int
    render_kwargs: dict[str, Any]
    need_source: bool
    lpips: LPIPS | None = None
    depth_estimator: controls.MonocularDepth | None = None

    def control(self, name: str, make: Callable[[], Tensor], scale: float) -> Control | None:
        """A ControlNet input when the prior offers a ControlNet of that name (the image is only made then)."""
        return Control(name, make(), scale) if name in self.prior.control_names else None

    def postprocess(self, grad: Tensor, mask: Tensor) -> tuple[Tensor, shaping.GradStats]:
        sh = self.cfg.shaping
        return shaping.postprocess(grad, mask if sh.use_mask else None, sh.scale, sh.clamp)


@dataclass
class Identities:
    """The identities of one step: ws (N, num_ws, w_dim) and their tri-grids from the trainable and the frozen
    generator, each computed ONCE; every camera of every branch is rendered from them."""

    ws: Tensor
    planes: Tensor
    frozen_planes: Tensor

    def ws_per_camera(self, k: int) -> Tensor:
        """ws for k cameras per identity, identity-major: the row order synthesis(planes=...) reads."""
        return self.ws.repeat_interleave(k, dim=0)


@dataclass
class Rendered:
    """One branch's renders of one step.

    images: what the prior encodes (trainable renders at its size); mask: the gradient mask;
    source: the frozen renders as DDS/IDS source or content reference; geometry: frozen (depth,
    mask, cameras) of the grid's views. latents / source_latents: filled in after the step's one encode.
    """

    images: Tensor
    mask: Tensor
    control: Control | None
    source: Tensor | None
    geometry: tuple[Tensor, Tensor, Tensor] | None = None
    latents: Tensor | None = None
    source_latents: Tensor | None = None


TargetFactory = Callable[[Tensor, Control | None, Tensor | None, Layout, int], DistillTarget]


class StepBranch(abc.ABC):
    """A branch of the training step. ``section``: its config section (a table with ``enabled``), the name it is
    registered under and the prefix of its metrics; ``slot``: its place among the enabled branches (its noise)."""

    section: ClassVar[str]

    def __init__(self, ctx: StepContext, slot: int) -> None:
        self.ctx = ctx
        self.slot = slot

    @classmethod
    def enabled(cls, cfg: StylizeConfig) -> bool:
        """Whether a run with ``cfg`` trains with this branch (its section's ``enabled``)."""
        return getattr(cfg, cls.section).enabled

    @abc.abstractmethod
    def render(self, identities: Identities) -> Rendered:
        """This step's renders of the branch's cameras of ``identities``."""

    @abc.abstractmethod
    def targets(self, r: Rendered, make: TargetFactory) -> list[DistillTarget]:
        """The branch's distillation targets of its encoded renders ``r`` (built by ``make``)."""

    @abc.abstractmethod
    def loss(
        self, r: Rendered, targets: list[DistillTarget], results: list[DistillResult]
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """Loss terms (summed in order by the trainer) and metrics from the objective's ``results``."""


# Config section -> branch, in registration order: the order of a step's branches.
BRANCHES: dict[str, type[StepBranch]] = {}
B = TypeVar("B", bound=type[StepBranch])


def register_branch(cls: B) -> B:
    """Class decorator: register a branch under its config section, after the branches registered before it."""
    if cls.section in BRANCHES:
        raise ValueError(f"a branch is already registered for config section {cls.section!r}")
    BRANCHES[cls.section] = cls
    return cls


@register_branch
class SingleView(StepBranch):
    """The 512 px single view (and its mirror) with canny control, rank re-weighting and mirror injection."""

    section = "single"

    def render(self, identities: Identities) -> Rendered:
        """The view and its mirror by the trainable generator (with SR); the frozen SR render of the view only
        when something reads it (the canny control, a DDS/IDS source or content reference)."""
        ctx, cfg, n = self.ctx, self.ctx.cfg, identities.ws.shape[0]
        s = cfg.single
        yaw, pitch = math.radians(s.yaw_range), math.radians(s.pitch_range)
        c = cameras.sample_front_cameras(n, ctx.rng, yaw, pitch, lookat=cfg.cameras.pivot)[0]
        k = 2 if s.mirror else 1
        cams = torch.stack([c, cameras.mirror(c)], 1).flatten(0, 1) if s.mirror else c
        kw = ctx.render_kwargs
        ws = identities.ws_per_camera(k)
        out = ctx.G.synthesis(ws, cams.to(ctx.device), noise_mode="const", planes=identities.planes, **kw)
        # Rendered identity-major (one tri-grid per identity); the loss reads every view, then every mirror.
        views_then_mirrors = torch.arange(k * n, device=out.image.device).reshape(n, k).T.flatten()
        fro = None
        if "canny" in ctx.prior.control_names or ctx.need_source:
            with torch.no_grad():
                fro = ctx.frozen.synthesis(
                    identities.ws, c.to(ctx.device), noise_mode="const", planes=identities.frozen_planes, **kw
                )
        return Rendered(
            images=shaping.resize_to(out.image[views_then_mirrors].float(), ctx.image_size),
            mask=out.mask[views_then_mirrors].detach().float(),
            control=ctx.control("canny", lambda: self._canny(fro.image), cfg.single.control_scale),
            source=shaping.resize_to(fro.image.float(), ctx.image_size) if ctx.need_source else None,
        )

    def _canny(self, image: Tensor) -> Tensor:
        """Canny edges of the frozen render's red channel (thresholds from the config), at the prior's size."""
        s = self.ctx.cfg.single
        return controls.canny_control(
            shaping.resize_to(image.float(), self.ctx.image_size), low=s.canny_low, high=s.canny_high
        )

    def _identities(self, r: Rendered) -> int:
        return r.latents.shape[0] // 2 if self.ctx.cfg.single.mirror else r.latents.shape[0]

    def targets(self, r: Rendered, make: TargetFactory) -> list[DistillTarget]:
        n = self._identities(r)
        return [make(r.latents[:n], r.control, r.source_latents, "view", self.slot)]

    def loss(
        self, r: Rendered, targets: list[DistillTarget], results: list[DistillResult]
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """Loss terms (summed in order by the trainer) and metrics of the single view."""
        ctx, s = self.ctx, self.ctx.cfg.single
        (res,) = results
        n = self._identities(r)
        grad = res.grad
        if s.rank_weights:
            grad = shaping.rank_reweight(grad, s.rank_weights, s.restandardize)
        if s.mirror:
            g_base, g_mirror = shaping.mirror_gradients(grad, s.base_weight, s.mirror_weight)
            final, st = ctx.postprocess(g_base, r.mask[:n])
            g_mirror, st_m = ctx.postprocess(g_mirror, r.mask[n:])
            terms = [s.weight * (inject(r.latents[:n], final) + inject(r.latents[n:], g_mirror))]
            clamped = int(st.clamped + st_m.clamped)
        else:
            final, st = ctx.postprocess(grad, r.mask)
            terms = [inject(r.latents, final, s.weight)]
            clamped = int(st.clamped)
        metrics = {}
        for name, (weight, value) in self._tweedie_losses(res, r.images[:n]).items():
            terms.append(weight * value)
            metrics[name] = float(value.detach())
        return terms, {**metrics, **_branch_metrics(self.section, res, final, clamped)}

    def _tweedie_losses(self, res: DistillResult, render: Tensor) -> dict[str, tuple[float, Tensor]]:
        """The script's Tweedie-target losses of the single view: x0_hat from one DDIM step with the full CFG
        eps, decoded without grad; weight * MSE(x0_hat in [0, 1], (render + 1) / 2) and weight * LPIPS."""
        ctx, r = self.ctx, self.ctx.cfg.regularisers
        if r.tweedie_mse <= 0 and ctx.lpips is None:
            return {}
        with torch.no_grad():
            x0 = tweedie_x0(ctx.prior.alphas_cumprod, res, ctx.cfg.prompt.guidance_scale)
            target = ctx.prior.decode(x0)
        out = {}
        if r.tweedie_mse > 0:
            out["tweedie_mse"] = (r.tweedie_mse, F.mse_loss((render.float() + 1) / 2, _to_unit(target)))
        if ctx.lpips is not None:
            out["tweedie_lpips"] = (r.lpips, ctx.lpips(target.clamp(-1, 1), render).mean())
        return out


@register_branch
class Grid(StepBranch):
    """Four 360-degree raw renders per identity tiled 2x2, with the frozen depth as control; optional MV-NRS."""

    section = "grid"

    def render(self, identities: Identities) -> Rendered:
        """Four raw views per identity by the trainable generator; the frozen raw views for mask, depth control
        and MV-NRS (with SR only for a monocular depth estimator)."""
        ctx, cfg, size = self.ctx, self.ctx.cfg, self.ctx.image_size
        pitch_range = math.radians(cfg.grid.pitch_range)
        n = 4 * identities.ws.shape[0]
        cams = cameras.sample_360_cameras(n, ctx.rng, pitch_range, lookat=cfg.cameras.pivot)[0].to(ctx.device)
        ws4, kw = identities.ws_per_camera(4), ctx.render_kwargs
        out = ctx.G.synthesis(ws4, cams, noise_mode="const", render_sr=False, planes=identities.planes, **kw)
        with torch.no_grad():
            sr, planes = ctx.depth_estimator is not None, identities.frozen_planes
            fro = ctx.frozen.synthesis(ws4, cams, noise_mode="const", render_sr=sr, planes=planes, **kw)
        return Rendered(
            images=grid_image(out.image_raw, size),
            mask=grid_image(fro.mask, 2 * fro.mask.shape[-1]),
            control=ctx.control("depth", lambda: self._depth(fro, size), cfg.grid.control_scale),
            source=grid_image(fro.image_raw, size) if ctx.need_source else None,
            geometry=(fro.depth.float(), fro.mask.float(), cams),
        )

    def _depth(self, fro: RenderOutput, size: int) -> Tensor:
        """Depth control of the grid: per frozen view a near-bright map in [0, 1], tiled 2x2.

        From the rendered depth (foreground min-max, inverted) by default, or from a monocular
        depth estimator on the frozen 512 px renders (the LD script's Depth Anything V2) when
        model.depth_estimator names a local checkpoint.
        """
        if self.ctx.depth_estimator is not None:
            control = controls.disparity_control(self.ctx.depth_estimator(fro.image.float()))
        else:
            control = controls.depth_control(fro.depth, fro.mask)
        return grid_image(control, size)

    @property
    def _mv_nrs(self) -> bool:
        return self.ctx.cfg.objective.noise == "mv_nrs"

    def targets(self, r: Rendered, make: TargetFactory) -> list[DistillTarget]:
        """The grid's target; with MV-NRS also its anchor twin (same t, the anchor noise), in the same call."""
        target = make(r.latents, r.control, r.source_latents, "grid", self.slot)
        if not self._mv_nrs:
            return [target]
        anchor = self._mv_nrs_anchor(tuple(r.latents.shape), r.geometry)
        target.noise = noise.resample_noise(anchor, self.ctx.cfg.objective.mv_nrs_sigma, self.ctx.rng)
        return [target, dataclasses.replace(target, noise=anchor)]

    def loss(
        self, r: Rendered, targets: list[DistillTarget], results: list[DistillResult]
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """The grid's loss term and metrics (MV-NRS keeps, per cell, the better-aligned of its two gradients)."""
        res, grad = results[0], results[0].grad
        extra: dict[str, Any] = {}
        if self._mv_nrs:
            grad, extra["mv_nrs_kept_resampled"] = self._mv_nrs_retain(targets, results, r.geometry)
        final, st = self.ctx.postprocess(grad, r.mask)
        terms = [inject(r.latents, final, self.ctx.cfg.grid.weight)]
        return terms, {**extra, **_branch_metrics(self.section, res, final, int(st.clamped))}

    @staticmethod
    def _per_view(x: Tensor) -> list[Tensor]:
        """(N*4, ...) grid views, identity-major -> the 4 grid cells, each (N, ...)."""
        x = x.reshape(-1, 4, *x.shape[1:])
        return [x[:, k] for k in range(4)]

    def _mv_nrs_anchor(self, shape: tuple[int, ...], geo: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """MV-NRS anchor noise of a grid: cell 0 fresh, each next cell warped from the previous one (eq. 11)."""
        depth, mask, cams = (self._per_view(t) for t in geo)
        cell = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
        return shaping.tile_2x2(noise.init_anchor_noise(cell, depth, cams, self.ctx.rng, mask))

    def _mv_nrs_retain(
        self, targets: list[DistillTarget], results: list[DistillResult], geo: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, float]:
        """Per grid cell keep the resampled candidate or the anchor, whichever gradient aligns better with the
        previous cell's kept gradient warped into this view (eqs. 14-15). Cell 0 has no driving view and keeps
        its resampled noise. Returns the kept grid gradient and the fraction of cells that kept the candidate.
        """
        depth, mask, cams = (self._per_view(t) for t in geo)
        cand, anc = (shaping.untile_2x2(res.grad) for res in results)
        cand_eps, anc_eps = (shaping.untile_2x2(target.noise) for target in targets)
        kept, kept_candidate = [cand[0]], float(cand[0].shape[0])
        for k in range(1, 4):
            driving, _ = geometry.splat_to_view(kept[-1], depth[k - 1], cams[k - 1], cams[k], mask[k - 1])
            choice = noise.retain_better_aligned(driving, cand_eps[k], cand[k], anc_eps[k], anc[k])
            kept.append(choice.grad)
            kept_candidate += float(choice.keep_candidate.sum())
        return shaping.tile_2x2(kept), kept_candidate / (4 * cand[0].shape[0])


def _branch_metrics(section: str, res: DistillResult, final: Tensor, clamped: int) -> dict[str, Any]:
    return {
        f"{section}_t": int(res.t[0]),
        f"{section}_grad_norm": float(final.norm()),
        f"{section}_nonfinite": int(res.diagnostics["nonfinite"]),
        f"{section}_clamped": clamped,
    }


def build_branches(ctx: StepContext) -> list[StepBranch]:
    """The enabled branches in the registry's order (single view, then grid); each draws noise from its own slot,
    its place among them."""
    enabled = [branch for branch in BRANCHES.values() if branch.enabled(ctx.cfg)]
    return [branch(ctx, slot) for slot, branch in enumerate(enabled)]
