"""Builds a run's parts from its config: the generator, the prior (diffusers, optionally with Style Fusion
Attention), the Tweedie LPIPS and the grid's depth estimator; then the trainer.

Where a part of the LD script (train_LD.py) cannot be had here (no LPIPS weights, no Depth Anything, no half
precision on CPU), the run goes on without it and says so in one line (``note``), naming how to supply it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from headstyle.generator.checkpoint import load_generator
from headstyle.io import content_digest
from headstyle.priors import controls
from headstyle.priors.base import ScorePrior
from headstyle.settings import ConfigError
from headstyle.stylize.config import StylizeConfig
from headstyle.stylize.regularisers import LPIPS, LPIPS_LINEAR_FILE, cached_alexnet, find_lpips_weights
from headstyle.stylize.trainer import Stylizer, TrainResult

# How a deviation from the script is told: one line of text.
Note = Callable[[str], None]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEPTH_ANYTHING = controls.MonocularDepth.HUB_ID


def print_note(text: str) -> None:
    """A deviation from the script, as one line on stderr."""
    print(f"note: {text}", file=sys.stderr, flush=True)


def _silent(text: str) -> None:
    """A note of a process other than the main one: the main process tells it."""


def check_local_files(cfg: StylizeConfig) -> None:
    """ConfigError naming a local file or folder the config names that is not there (checked before any model
    loads): the LPIPS weights and the depth estimator."""
    r, m = cfg.regularisers, cfg.model
    for key, path in (("regularisers.lpips_alexnet", r.lpips_alexnet), ("regularisers.lpips_linear", r.lpips_linear)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key} = {path!r}: no such file; give the weights file or leave it empty")
    if m.depth_estimator and not (Path(m.depth_estimator) / "config.json").is_file():
        raise ConfigError(
            f"--depth-estimator {m.depth_estimator!r} is not a transformers folder with config.json; download "
            f"one where there is network (`hf download {DEPTH_ANYTHING} --local-dir checkpoints/"
            f"{DEPTH_ANYTHING.split('/')[1]}`) and pass that folder"
        )


def build_prior(cfg: StylizeConfig, device: torch.device, note: Note = print_note) -> ScorePrior:
    """The ScorePrior named by cfg.model (the CLI's factory; lab code passes its own prior object)."""
    from headstyle.priors.loading import PriorSpec, load_prior

    m = cfg.model
    controlnets = {}
    if cfg.single.enabled and m.canny_controlnet:
        controlnets["canny"] = m.canny_controlnet
    if cfg.grid.enabled and m.depth_controlnet:
        controlnets["depth"] = m.depth_controlnet
    dtype, vae_dtype = DTYPES[m.prior_dtype], DTYPES[m.vae_dtype]
    half = (dtype, vae_dtype) != (torch.float32, torch.float32)
    if device.type == "cpu":
        dtype = vae_dtype = torch.float32  # half-precision convolutions are slow or missing on CPU
    # model.prior is the SD model (PriorSpec.model) of the user's config
    prior = load_prior(PriorSpec(m.prior, m.vae, controlnets, dtype=dtype, vae_dtype=vae_dtype), device)
    if device.type == "cpu" and half:
        note(f"the prior runs in fp32 on CPU (model.prior_dtype {m.prior_dtype} and model.vae_dtype {m.vae_dtype} "
             "apply on a GPU); train_LD.py runs it in fp16 on CUDA")  # fmt: skip
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


def build_lpips(cfg: StylizeConfig, device: torch.device, note: Note = print_note) -> LPIPS | None:
    """The Tweedie target's LPIPS-alex when the single view uses it, from the config's weight files or the caches
    (regularisers.find_lpips_weights); None, with a note, when they are not there."""
    r = cfg.regularisers
    if not (cfg.single.enabled and r.lpips > 0):
        return None
    alexnet, linear = find_lpips_weights(r.lpips_alexnet, r.lpips_linear)
    if alexnet is None or linear is None:
        missing = [what for what, path in (("AlexNet", alexnet), ("linear layers", linear)) if path is None]
        note(f"deviation from train_LD.py: no LPIPS-alex {' or '.join(missing)} here, so the Tweedie target's "
             f"LPIPS term (regularisers.lpips = {r.lpips:g}) is off; supply them with --set "
             f"regularisers.lpips_alexnet=FILE (or put torchvision's {cached_alexnet().name} in "
             f"{cached_alexnet().parent}) and --set regularisers.lpips_linear=FILE (or pip install lpips, which "
             f"ships {LPIPS_LINEAR_FILE.as_posix()})")  # fmt: skip
        return None
    return LPIPS.from_files(alexnet, linear).to(device)


def build_depth_estimator(
    cfg: StylizeConfig, prior: ScorePrior, device: torch.device, note: Note = print_note
) -> controls.MonocularDepth | None:
    """The grid's monocular depth estimator (a local Depth Anything) when configured and the prior has a depth
    ControlNet to feed; without one the grid reads the rendered depth, with a note."""
    if not (cfg.grid.enabled and "depth" in prior.control_names):
        return None
    if not cfg.model.depth_estimator:
        note("deviation from train_LD.py: the grid's depth control is the frozen generator's rendered depth, not "
             f"Depth Anything V2 (ViT-B) on its 512 px renders; give --depth-estimator FOLDER (a download of "
             f"{DEPTH_ANYTHING})")  # fmt: skip
        return None
    return controls.MonocularDepth.from_pretrained(cfg.model.depth_estimator, device)


def build_from_config(cfg: StylizeConfig, accelerator: Any = None, note: Note = print_note) -> Stylizer:
    """Load the generator, prior, LPIPS and depth estimator named by the config and build the trainer; the main
    process tells each deviation from the script (``note``)."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=cfg.run.device == "cpu", mixed_precision=cfg.run.mixed_precision)
    if not cfg.model.generator:
        raise ValueError("model.generator is empty: pass --generator PATH (a PanoHead .pkl/.pth or our .safetensors)")
    if not accelerator.is_main_process:
        note = _silent
    generator = load_generator(cfg.model.generator, device=accelerator.device)
    dev = accelerator.device
    prior = build_prior(cfg, dev, note)
    return Stylizer(
        cfg,
        generator,
        prior,
        accelerator,
        lpips=build_lpips(cfg, dev, note),
        depth_estimator=build_depth_estimator(cfg, prior, dev, note),
        generator_digest=content_digest(cfg.model.generator),
    )


def run_stylize(cfg: StylizeConfig, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Build the trainer from the config (generator and prior from their paths) and train."""
    return build_from_config(cfg).train(resume=resume, progress=progress)
