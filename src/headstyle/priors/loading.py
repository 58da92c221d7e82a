"""One description of a Stable Diffusion prior (PriorSpec) and its one loader (load_prior).

Every command, the app and the lab say which SD 1.x-family model, VAE and ControlNets they run on
with a PriorSpec, and load it with load_prior on their device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from headstyle.priors.diffusers_prior import DiffusersPrior, resolve_vae


@dataclass(frozen=True)
class PriorSpec:
    """Which SD 1.x-family prior to load, independent of the device it runs on.

    model: the SD model, a diffusers folder or hub id (unet/, text_encoder/, tokenizer/, scheduler/,
    vae/). vae: "" (the model's own, the default), "auto" (the model folder's own vae/ when it has one, else
    sd-vae-ft-mse) or a VAE folder or hub id (diffusers_prior.resolve_vae). controlnets: name ->
    ControlNet folder or hub id ({} = none). dtype: weights of UNet, ControlNets and text encoder
    (None: fp16 on CUDA, fp32 on CPU); vae_dtype: the VAE's (None: fp32 under fp16 weights).
    latent_sample, channels_last, offload_text_encoder: as DiffusersPrior. Further conditioning
    modules (adapters, HPDM branches) take fields beside controlnets.
    """

    model: str | os.PathLike
    vae: str | os.PathLike = ""
    controlnets: Mapping[str, str | os.PathLike] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    vae_dtype: torch.dtype | None = None
    latent_sample: Literal["sample", "mean"] = "sample"
    channels_last: bool = False
    offload_text_encoder: bool = True


def load_prior(spec: PriorSpec, device: torch.device | str) -> DiffusersPrior:
    """The prior ``spec`` names, frozen on ``device``; a PriorLoadError says what is missing and where to get it."""
    return DiffusersPrior.from_pretrained(
        spec.model,
        vae=resolve_vae(spec.model, spec.vae),
        controlnets=dict(spec.controlnets),
        device=device,
        dtype=spec.dtype,
        vae_dtype=spec.vae_dtype,
        latent_sample=spec.latent_sample,
        channels_last=spec.channels_last,
        offload_text_encoder=spec.offload_text_encoder,
    )
