"""The diffusion classifier margin's fixed probes and its measurement (the stopping rule's signal, stopping.py).

The probes are P identities seen from single-view cameras, PROBE_TIMESTEPS timesteps over the objective's step
range, and one seed for the probe noise and the VAE's posterior sample: the same on every process and at every
check, so margins are comparable along a run and across runs with one seed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from headstyle import cameras
from headstyle.distill import shaping
from headstyle.generator.base import Generator
from headstyle.priors.base import NoiseQuery, PromptEmbeds, ScorePrior
from headstyle.stylize import stopping
from headstyle.stylize.config import StylizeConfig
from headstyle.training.seeds import rank_seed

# The probes' stream: the same on every process (a rank no run reaches), apart from the training streams.
PROBE_STREAM = 1 << 20
# Timesteps of the classifier margin: this many, evenly spaced over the objective's step range.
PROBE_TIMESTEPS = 3


class ClassifierProbes(NamedTuple):
    """ws (P, num_ws, w_dim), front cameras (P, 25) as the single view draws them, the probe timesteps, the seed."""

    ws: Tensor
    cams: Tensor
    t: Tensor
    seed: int

    @classmethod
    @torch.no_grad()
    def draw(cls, cfg: StylizeConfig, frozen: Generator, c_cond: Tensor, timesteps: Tensor,
             device: torch.device) -> ClassifierProbes:  # fmt: skip
        """cfg.optim.stop_probes probes from the run seed's probe stream, mapped by the frozen generator."""
        gen = torch.Generator().manual_seed(rank_seed(cfg.run.seed, PROBE_STREAM))
        n = cfg.optim.stop_probes
        z = torch.randn(n, frozen.z_dim, generator=gen).to(device)
        ws = frozen.mapping(z, c_cond.expand(n, -1).to(device), cfg.latent.truncation_psi, cfg.latent.truncation_cutoff)
        yaw, pitch = math.radians(cfg.single.yaw_range), math.radians(cfg.single.pitch_range)
        cams = cameras.sample_front_cameras(n, gen, yaw, pitch, lookat=cfg.cameras.pivot)[0].to(device)
        o = cfg.objective
        index = torch.linspace(o.min_step_index, o.max_step_index, PROBE_TIMESTEPS).round().long().unique()
        return cls(ws, cams, timesteps[index].to(device), int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))

    @torch.no_grad()
    def margin(self, G: Generator, prior: ScorePrior, source: Tensor, style: Tensor, image_size: int,
               render_kwargs: dict) -> float:  # fmt: skip
        """The diffusion classifier margin (stopping.margin) of G's renders of the probes: encoded at
        ``image_size``, noised at the probe timesteps with the probe noise, and denoised once with the prompts'
        cond embeddings [source; style] as [uncond; cond]."""
        images = G.synthesis(self.ws, self.cams, noise_mode="const", **render_kwargs).image.float()
        device = images.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # training streams stay put
            torch.manual_seed(self.seed)
            x0 = prior.encode(shaping.resize_to(images, image_size)).float()
        k, n = len(self.t), len(x0)
        eps = torch.randn(k * n, *x0.shape[1:], generator=torch.Generator().manual_seed(self.seed)).to(device)
        x0, t_all = x0.repeat(k, 1, 1, 1), self.t.repeat_interleave(n)
        prompts = PromptEmbeds(uncond=source, cond=style).repeat(k * n)
        x_t = prior.add_noise(x0, eps, t_all)
        ((eps_src, eps_sty),) = prior.predict_noise([NoiseQuery(x_t, t_all, prompts)])
        return stopping.margin((eps_src - eps).square(), (eps_sty - eps).square())
