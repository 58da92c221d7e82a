"""LD's gradient-shaping constants for a prior's latents, measured as the trainer sees them.

The LD script shapes SD's latent gradient with ``grad /= 1000; clamp(-1, 1)`` and re-weights the
(4, H*W) score by rank with (1, 0.75, 0.5, 0.25) (../shared/reference/likelihood-distillation.md,
steps 6-7). The reference gives these as constants tuned on SD's VAE latents, whose scaling
factor 0.18215 makes them unit-std. Whether they carry over to another prior depends on three
figures, measured here on the raw LD gradient omega (eps_cond - eps_uncond) w of the trainer's own
targets (single views with their canny control and 2x2 grids with their depth control, at the
recipe's DDIM steps):

- latent_std: the std of the prior's latents over the renders (SD's convention: 1);
- score_rms / score_max: the size of the raw gradient (what ``/ scale`` and the clamp act on);
- rank_energy: per rank, the mean share of the squared singular values of each sample's (C, H*W)
  score matrix (what the rank weights re-weight; C entries).

``shaping_scale`` keeps the script's divisor in the prior's latent units: the shaped gradient reaches
the renders through the encoder, whose Jacobian grows with the latents' scale, so scale = 1000 *
latent_std keeps the render-space gradient of a given score what the script's is on SD's unit-std
latents. The score's own size is left alone: it is the prior's classifier field, which the
objectives are meant to follow. ``score_max`` against the scale says whether the clamp binds; the
rank energy whether every rank weight acts. benchmarks/lab_shaping.py prints the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from headstyle import cameras
from headstyle.distill.objectives import DistillTarget, ld
from headstyle.distill.shaping import resize_to
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import style_prompt
from headstyle.lab.world.identities import held_out_z
from headstyle.priors import controls
from headstyle.priors.base import Control, ScorePrior
from headstyle.stylize.branches import grid_image
from headstyle.stylize.config import StylizeConfig

SCRIPT_SCALE = 1000.0  # the LD script's grad /= 1000 on SD latents
SCRIPT_RANK_WEIGHTS = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class ShapingFigures:
    """latent_std, score_rms, score_max, clamped share at ``scale`` (entries of |grad| / scale > 1) and
    rank_energy (C,), as in the module docstring; ``samples`` score matrices were measured."""

    latent_std: float
    score_rms: float
    score_max: float
    rank_energy: tuple[float, ...]
    samples: int


def shaping_figures(latents: list[Tensor], grads: list[Tensor]) -> ShapingFigures:
    """The figures of raw LD gradients ``grads`` (each (N, C, h, w)) of latents ``latents`` (same shapes)."""
    if not grads or len(latents) != len(grads):
        raise ValueError(f"need one latent batch per gradient batch, got {len(latents)} and {len(grads)}")
    lat = torch.cat([x.flatten() for x in latents]).double()
    g = torch.cat([x.flatten() for x in grads]).double()
    energy = []
    for x in grads:
        s = torch.linalg.svdvals(x.double().flatten(2))  # (N, C) singular values of each (C, h*w) score
        energy.append(s.square() / s.square().sum(dim=1, keepdim=True).clamp_min(1e-300))
    shares = torch.cat(energy).mean(dim=0)
    return ShapingFigures(
        latent_std=float(lat.std()),
        score_rms=float(g.square().mean().sqrt()),
        score_max=float(g.abs().max()),
        rank_energy=tuple(float(v) for v in shares),
        samples=sum(x.shape[0] for x in grads),
    )


def clamped_share(grads: list[Tensor], scale: float, clamp: float = 1.0) -> float:
    """The share of gradient entries the script's clamp would cut after ``/ scale``."""
    g = torch.cat([x.flatten() for x in grads])
    return float((g.abs() / scale > clamp).double().mean())


def shaping_scale(figures: ShapingFigures) -> float:
    """The script's divisor in this prior's latent units: 1000 * latent_std (SD's latents: std 1)."""
    if not figures.latent_std > 0:
        raise ValueError(f"the latents' std must be positive, got {figures.latent_std}")
    return SCRIPT_SCALE * figures.latent_std


@torch.no_grad()
def ld_scores(
    prior: ScorePrior, G: LabGenerator, style: str, identities: int, seed: int = 0, guidance: float = 7.5
) -> tuple[list[Tensor], list[Tensor]]:
    """(latents, raw LD gradients) of the trainer's two targets for ``identities`` held-out identities rendered by G:
    the single view at a front camera (canny control) and the 2x2 grid of 360-degree raw views (depth control), at
    the recipe's DDIM steps, each control only when the prior has its ControlNet."""
    cfg = StylizeConfig()
    gen = torch.Generator().manual_seed(seed)
    size, o, s = prior.image_size, cfg.objective, cfg.single
    ws = G.mapping(held_out_z(identities), cameras.conditioning_camera(), cfg.latent.truncation_psi)
    front = cameras.sample_front_cameras(identities, gen, math.radians(s.yaw_range), math.radians(s.pitch_range))[0]
    single = G.synthesis(ws, front).image.float()
    around = cameras.sample_360_cameras(4 * identities, gen, math.radians(cfg.grid.pitch_range))[0]
    raw = G.synthesis(ws.repeat_interleave(4, 0), around, render_sr=False)
    depth = grid_image(controls.depth_control(raw.depth, raw.mask), size)
    branches = [
        (resize_to(single, size), "canny", lambda: controls.canny_control(resize_to(single, size), s.canny_low,
                                                                           s.canny_high), "view"),
        (grid_image(raw.image_raw.float(), size), "depth", lambda: depth, "grid"),
    ]  # fmt: skip
    timesteps = prior.inference_timesteps(o.num_inference_steps)
    prompt = prior.embed_prompts(style_prompt(style))
    targets, latents = [], []
    for images, name, control, layout in branches:
        x = prior.encode(images).float()
        steps = sample_ddim_steps(identities, o.min_step_index, o.max_step_index, timesteps=timesteps, generator=gen)
        ctl = Control(name, control()) if name in prior.control_names else None
        targets.append(DistillTarget(x, prompt, steps.t, torch.randn(x.shape, generator=gen), ctl, steps.step_index,
                                     layout=layout))  # fmt: skip
        latents.append(x)
    return latents, [r.grad for r in ld(prior, targets, guidance_scale=guidance)]
