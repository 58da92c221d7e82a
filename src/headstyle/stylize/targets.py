"""Step 4 of an iteration: each branch's DistillTarget, a DDIM timestep and noise per sample.

Timesteps are DDIM steps in objective.[min, max]_step_index (the LD script's sampling); noise is fresh from
the run's stream, or with objective.noise "fixed" the same eps at every iteration for each (process, branch
slot, sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headstyle.distill import noise
from headstyle.distill.objectives import DistillTarget
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.priors.base import Control, Layout, PromptEmbeds
from headstyle.stylize.config import ObjectiveConfig

# noise=fixed: the keys of a branch's (slot's) fixed noise start at slot * this, past any process's batch.
FIXED_NOISE_SLOT = 10_000


@dataclass
class TargetSampler:
    """Draws the targets of one process from ``rng``: its objective section, run seed and rank, the prompts'
    embeddings and the prior's DDIM timesteps (descending, on the CPU)."""

    objective: ObjectiveConfig
    seed: int
    rank: int
    prompt: PromptEmbeds
    source_prompt: PromptEmbeds | None
    timesteps: Tensor
    rng: torch.Generator
    device: torch.device

    def noise(self, shape: tuple[int, ...], slot: int) -> Tensor:
        """eps for the branch in ``slot``."""
        if self.objective.noise == "fixed":
            n = shape[0]
            first = self.rank * n + slot * FIXED_NOISE_SLOT
            eps = [noise.identity_noise((1, *shape[1:]), i, self.seed) for i in range(first, first + n)]
            return torch.cat(eps).to(self.device)
        return noise.random_noise(shape, self.rng, self.device)

    def __call__(
        self, latents: Tensor, control: Control | None, source_latents: Tensor | None, layout: Layout, slot: int
    ) -> DistillTarget:
        """A branch's DistillTarget for its latents (and its sources' for DDS/IDS)."""
        o = self.objective
        ts = sample_ddim_steps(
            latents.shape[0], o.min_step_index, o.max_step_index, timesteps=self.timesteps, generator=self.rng
        )
        return DistillTarget(
            latents=latents,
            prompt=self.prompt,
            t=ts.t.to(self.device),
            noise=self.noise(tuple(latents.shape), slot),
            control=control,
            step_index=ts.step_index.to(self.device),
            source_latents=source_latents,
            source_prompt=self.source_prompt,
            layout=layout,
        )
