"""The timestep sampler for score distillation.

``sample_ddim_steps``: the LD script's rule, a DDIM step INDEX s ~ U{35..49} of the 50-step grid and
t = timesteps[s] (SD 1.5's leading spacing: t in {281, 261, ..., 1}, low noise). The index is returned
too, because LD's script weighting uses alphas_cumprod[s]. All randomness comes from an explicit
torch.Generator, so a run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headstyle.priors.base import ddim_timesteps


@dataclass
class TimestepSample:
    """Sampled timesteps t (N,) long and their indices step_index (N,) long on the DDIM grid."""

    t: Tensor
    step_index: Tensor


def sample_ddim_steps(
    n: int,
    low: int = 35,
    high: int = 49,
    *,
    timesteps: Tensor | None = None,
    num_train_timesteps: int = 1000,
    num_inference_steps: int = 50,
    generator: torch.Generator | None = None,
) -> TimestepSample:
    """s ~ U{low..high} (inclusive) on the descending DDIM grid, t = timesteps[s].

    ``timesteps`` is the prior's grid (prior.inference_timesteps(50)); by default SD 1.5's
    leading spacing with steps_offset 1.
    """
    grid = ddim_timesteps(num_train_timesteps, num_inference_steps) if timesteps is None else timesteps.long().cpu()
    if not 0 <= low <= high < len(grid):
        raise ValueError(f"DDIM step range [{low}, {high}] must lie within [0, {len(grid) - 1}]")
    s = torch.randint(low, high + 1, (n,), generator=generator, dtype=torch.long)
    return TimestepSample(t=grid[s], step_index=s)
