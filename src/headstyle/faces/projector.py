"""PanoHead's projector (projector.py): a photo's crop into W or W+, then optional pivotal tuning (PTI).

Projection: w starts at w_avg (the mean of 10k mapped z at the front camera), Adam (betas 0.9, 0.999)
with PanoHead's learning-rate ramp lr(t) = lr0 * min(1, t / 0.05) * (1 - cos(pi * min(1, (1 - t) / 0.25))) / 2,
noise on w of std sigma_w * 0.05 * max(0, 1 - t / 0.75)^2 (sigma_w: the spread of mapped w), and loss
0.1 * MSE + d(target, render) + 1.0 * mean (w - w_avg)^2, with d computed on images area-downsampled
to 256 px when larger. PTI: the pivot fixed, every generator parameter trained with Adam at 3e-4 on
0.1 * MSE + d. ``d`` is LPIPS-VGG16 when its weights are given, else the named fallback
(headstyle.faces.perceptual).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.cameras import camera_label, look_at_pose
from headstyle.faces.perceptual import PerceptualDistance
from headstyle.generator.base import Generator
from headstyle.progress import progress_bar
from headstyle.settings import MAX_ITERATIONS, MAX_W_AVG_SAMPLES, check_fields, param

# PanoHead computes w_avg at LookAtPoseSampler.sample(3.14 / 2, 3.14 / 2, lookat (0, 0, 0)).
W_AVG_YAW = W_AVG_PITCH = 3.14 / 2 - math.pi / 2
W_AVG_SEED = 123


@dataclass
class ProjectConfig:
    """PanoHead's projector defaults (its command line runs 500 steps); steps and w_avg samples within the budgets
    of headstyle.settings."""

    steps: int = param(500, at_least=1, budget=MAX_ITERATIONS)
    space: Literal["w", "w+"] = "w+"
    w_avg_samples: int = param(10_000, at_least=1, budget=MAX_W_AVG_SAMPLES)
    initial_learning_rate: float = 0.1
    initial_noise_factor: float = 0.05
    lr_rampdown_length: float = 0.25
    lr_rampup_length: float = 0.05
    noise_ramp_length: float = 0.75
    mse_weight: float = 0.1
    w_reg_weight: float = 1.0
    perceptual_size: int = 256
    raw: bool = False  # fit the raw neural render (no super-resolution): fast, low resolution
    seed: int = 303
    frame_every: int = 2

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PTIConfig:
    """PanoHead's project_pti: all generator parameters, Adam 3e-4 (no ramp), 0.1 * MSE + d, 350 steps."""

    steps: int = param(350, at_least=1, budget=MAX_ITERATIONS)
    learning_rate: float = 3e-4
    mse_weight: float = 0.1
    frame_every: int = 10

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Projection:
    """The projector's result: ws (1, num_ws, w_dim), the final render (1, 3, H, W) in [-1, 1],
    progress frames (uint8 target | render), the loss log and the perceptual distance's name."""

    ws: Tensor
    image: Tensor
    frames: list[np.ndarray] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)
    perceptual: str = ""


def learning_rate(step: int, cfg: ProjectConfig) -> float:
    """PanoHead's ramp: cosine ramp-down over the last 25%, linear ramp-up over the first 5%."""
    t = step / cfg.steps
    ramp = min(1.0, (1.0 - t) / cfg.lr_rampdown_length)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return cfg.initial_learning_rate * ramp * min(1.0, t / cfg.lr_rampup_length)


def w_noise_scale(step: int, cfg: ProjectConfig, w_std: float) -> float:
    """Std of the noise added to w: w_std * 0.05 * max(0, 1 - t / 0.75)^2."""
    t = step / cfg.steps
    return w_std * cfg.initial_noise_factor * max(0.0, 1.0 - t / cfg.noise_ramp_length) ** 2


@torch.no_grad()
def w_statistics(G: Generator, samples: int = 10_000, batch: int = 1000) -> tuple[Tensor, float]:
    """(w_avg (1, 1, w_dim), w_std): mean and RMS spread of mapped w for RandomState(123) z at the front camera."""
    device = next(G.parameters()).device
    z = torch.from_numpy(np.random.RandomState(W_AVG_SEED).randn(samples, G.z_dim)).float()
    c = camera_label(look_at_pose(W_AVG_YAW, W_AVG_PITCH, lookat=(0.0, 0.0, 0.0))).to(device)
    ws = torch.cat([G.mapping(z[i : i + batch].to(device), c.expand(len(z[i : i + batch]), 25))[:, :1]
                    for i in range(0, samples, batch)])
    w_avg = ws.mean(0, keepdim=True)
    return w_avg, float(((ws - w_avg).square().sum() / samples).sqrt())


def perceptual_view(images: Tensor, size: int) -> Tensor:
    """Images as the perceptual distance sees them: area-downsampled to ``size`` when larger."""
    return F.interpolate(images, size=(size, size), mode="area") if images.shape[-1] > size else images


def _render(G: Generator, ws: Tensor, c: Tensor, raw: bool) -> Tensor:
    out = G.synthesis(ws, c, noise_mode="const", render_sr=not raw)
    return out.image_raw if raw else out.image


def _frame(target: Tensor, image: Tensor) -> np.ndarray:
    pair = torch.cat([target[0], image[0].detach()], dim=-1)
    return (pair * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def project(
    G: Generator,
    target: Tensor,
    c: Tensor,
    perceptual: PerceptualDistance,
    cfg: ProjectConfig | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> Projection:
    """Optimise w (W) or ws (W+) so that G renders ``target`` (1, 3, H, W) in [-1, 1] at camera c (1, 25).

    H, W must be the render's size (G.img_resolution, or the neural rendering resolution with cfg.raw).
    The generator is left unchanged; the global RNG is restored afterwards. ``on_step(step, render)``, when
    given, sees every step's render (1, 3, H, W), detached (progress and previews in the web app).
    """
    cfg = cfg or ProjectConfig()
    if cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    device = target.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _project(G, target, c, perceptual, cfg, show_progress, on_step)


def _project(G: Generator, target: Tensor, c: Tensor, perceptual: PerceptualDistance, cfg: ProjectConfig,
             show_progress: bool, on_step: Callable[[int, Tensor], None] | None) -> Projection:
    frozen = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    try:
        w_avg, w_std = w_statistics(G, cfg.w_avg_samples)
        target = target.detach().float()
        target_embed = perceptual.embed(perceptual_view(target, cfg.perceptual_size)).detach()
        w_avg = w_avg if cfg.space == "w" else w_avg.repeat(1, G.num_ws, 1)
        w_opt = w_avg.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w_opt], betas=(0.9, 0.999), lr=cfg.initial_learning_rate)
        frames, losses = [], []
        with progress_bar(disable=not show_progress) as progress:
            task = progress.add_task("projecting", total=cfg.steps)
            for step in range(cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, cfg)
                ws = w_opt + torch.randn_like(w_opt) * w_noise_scale(step, cfg, w_std)
                image = _render(G, ws.expand(-1, G.num_ws, -1), c, cfg.raw).float()
                mse = (target - image).square().mean()
                perc = perceptual.distance(target_embed, perceptual.embed(perceptual_view(image, cfg.perceptual_size)))
                w_reg = (w_opt - w_avg).square().mean()
                loss = cfg.mse_weight * mse + perc.mean() + cfg.w_reg_weight * w_reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append({"step": step, "loss": loss.item(), "mse": mse.item(), "perceptual": perc.mean().item(),
                               "w_reg": w_reg.item()})
                if step % cfg.frame_every == 0:
                    frames.append(_frame(target, image))
                progress.update(task, advance=1, info=f"loss {loss.item():.4f} (mse {mse.item():.4f})")
                if on_step is not None:
                    on_step(step, image.detach())
        ws = w_opt.detach().expand(-1, G.num_ws, -1).clone()
        with torch.no_grad():
            final = _render(G, ws, c, cfg.raw).float()
        frames.append(_frame(target, final))
        return Projection(ws, final, frames, losses, perceptual.name)
    finally:
        for p, flag in zip(G.parameters(), frozen, strict=True):
            p.requires_grad_(flag)


def pivotal_tuning(
    G: Generator,
    target: Tensor,
    ws: Tensor,
    c: Tensor,
    perceptual: PerceptualDistance,
    cfg: PTIConfig | None = None,
    raw: bool = False,
    perceptual_size: int = 256,
    seed: int = 303,
    show_progress: bool = True,
) -> tuple[nn.Module, Projection]:
    """PTI (Roich et al. 2022) as PanoHead runs it: a copy of G whose every parameter is tuned so that it
    renders ``target`` from the fixed pivot ``ws``. Returns (tuned copy in eval mode, its Projection)."""
    cfg = cfg or PTIConfig()
    if cfg.steps < 1:
        raise ValueError(f"PTI steps must be at least 1, got {cfg.steps}")
    tuned = copy.deepcopy(G).train().requires_grad_(True)
    target = target.detach().float()
    ws = ws.detach()
    device = target.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        target_embed = perceptual.embed(perceptual_view(target, perceptual_size)).detach()
        optimizer = torch.optim.Adam(tuned.parameters(), betas=(0.9, 0.999), lr=cfg.learning_rate)
        frames, losses = [], []
        with progress_bar(disable=not show_progress) as progress:
            task = progress.add_task("pivotal tuning", total=cfg.steps)
            for step in range(cfg.steps):
                image = _render(tuned, ws, c, raw).float()
                mse = (target - image).square().mean()
                perc = perceptual.distance(target_embed, perceptual.embed(perceptual_view(image, perceptual_size)))
                loss = cfg.mse_weight * mse + perc.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append({"step": step, "loss": loss.item(), "mse": mse.item(), "perceptual": perc.mean().item()})
                if step % cfg.frame_every == 0:
                    frames.append(_frame(target, image))
                progress.update(task, advance=1, info=f"loss {loss.item():.4f} (mse {mse.item():.4f})")
        tuned.eval().requires_grad_(False)
        with torch.no_grad():
            final = _render(tuned, ws, c, raw).float()
    frames.append(_frame(target, final))
    return tuned, Projection(ws, final, frames, losses, perceptual.name)
