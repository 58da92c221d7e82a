"""Builds a run's parts from its config: the generator, the prior (diffusers, optionally with Style Fusion
Attention), the Tweedie LPIPS and the grid's depth estimator; then the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from headstyle.generator.checkpoint import load_generator
from headstyle.io import content_digest
from headstyle.priors import controls
from headstyle.priors.base import ScorePrior
from headstyle.stylize.config import StylizeConfig
from headstyle.stylize.regularisers import LPIPS
from headstyle.stylize.trainer import Stylizer, TrainResult


def build_prior(cfg: StylizeConfig, device: torch.device) -> ScorePrior:
    """The ScorePrior named by cfg.model (the CLI's factory; lab code passes its own prior object)."""
    from headstyle.priors.loading import PriorSpec, load_prior

    m = cfg.model
    controlnets = {}
    if cfg.single.enabled and m.canny_controlnet:
        controlnets["canny"] = m.canny_controlnet
    if cfg.grid.enabled and m.depth_controlnet:
        controlnets["depth"] = m.depth_controlnet
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[m.prior_dtype]
    if device.type == "cpu":
        dtype = torch.float32  # half-precision convolutions are slow or missing on CPU
    # model.prior is the SD model (PriorSpec.model) of the user's config
    prior = load_prior(PriorSpec(m.prior, m.vae, controlnets, dtype=dtype), device)
    return style_fusion_prior(cfg, prior) if cfg.style.image else prior


def style_fusion_prior(cfg: StylizeConfig, prior: ScorePrior) -> ScorePrior:
    """``prior`` with Style Fusion Attention reading cfg.style's image(s) (DiffStyle360) as the target's style."""
    from headstyle.attention.config import StyleFusionConfig
    from headstyle.attention.prior import StyleFusionPrior, load_image

    s = cfg.style
    size = prior.image_size
    with torch.no_grad():
        styles = [
            prior.encode(load_image(path, size).to(prior.device)) if path else None for path in (s.image, s.image_2)
        ]
    fusion = StyleFusionConfig(tau=s.tau, alpha=s.alpha, pairing=s.pairing, layers=s.layers, reference=s.reference)
    return StyleFusionPrior(prior, styles[0], styles[1], fusion, seed=cfg.run.seed)


def build_lpips(cfg: StylizeConfig, device: torch.device) -> LPIPS | None:
    """The Tweedie target's LPIPS-alex from the config's local weight files, when the single view uses it."""
    r = cfg.regularisers
    if not (cfg.single.enabled and r.lpips > 0):
        return None
    return LPIPS.from_files(r.lpips_alexnet, r.lpips_linear).to(device)


def build_depth_estimator(
    cfg: StylizeConfig, prior: ScorePrior, device: torch.device
) -> controls.MonocularDepth | None:
    """The grid's monocular depth estimator (a local Depth Anything), when configured and the prior has a depth
    ControlNet to feed."""
    if not (cfg.grid.enabled and cfg.model.depth_estimator and "depth" in prior.control_names):
        return None
    return controls.MonocularDepth.from_pretrained(cfg.model.depth_estimator, device)


def build_from_config(cfg: StylizeConfig, accelerator: Any = None) -> Stylizer:
    """Load the generator, prior, LPIPS and depth estimator named by the config and build the trainer."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=cfg.run.mixed_precision)
    if not cfg.model.generator:
        raise ValueError("model.generator is empty: pass --generator PATH (a PanoHead .pkl/.pth or our .safetensors)")
    generator = load_generator(cfg.model.generator, device=accelerator.device)
    dev = accelerator.device
    prior = build_prior(cfg, dev)
    return Stylizer(
        cfg,
        generator,
        prior,
        accelerator,
        lpips=build_lpips(cfg, dev),
        depth_estimator=build_depth_estimator(cfg, prior, dev),
        generator_digest=content_digest(cfg.model.generator),
    )


def run_stylize(cfg: StylizeConfig, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build the trainer from the config (generator and prior from their paths) and train."""
    return build_from_config(cfg).train(resume=resume, progress=progress)
