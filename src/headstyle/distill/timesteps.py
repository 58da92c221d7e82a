"""Timestep samplers for score distillation.

- ``sample_ddim_steps``: the LD script's rule, a DDIM step INDEX s ~ U{35..49} of the 50-step
  grid and t = timesteps[s] (SD 1.5's leading spacing: t in {281, 261, ..., 1}, low noise).
  The index is returned too, because LD's script weighting uses alphas_cumprod[s].
- ``sample_uniform_t``: t ~ U{t_min..t_max} (DreamFusion/threestudio style, e.g. 20..980).
- ``annealed_t_max`` + ``sample_annealed_t``: the upper bound of the range decays with training
  progress p = step / total, linearly (threestudio: max 980 -> 500) or as HiFA's
  t_max(p) = (start - end)(1 - sqrt(p)) + end; ``deterministic`` returns t = t_max(p) (HiFA).
All randomness comes from an explicit torch.Generator, so a run is reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from headstyle.priors.base import ddim_timesteps


@dataclass
class TimestepSample:
    """Sampled timesteps t (N,) long; step_index (N,) long for DDIM-grid samplers, else None."""

    t: Tensor
    step_index: Tensor | None = None


def _randint(low: int, high: int, n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(low, high + 1, (n,), generator=generator, dtype=torch.long)


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
    s = _randint(low, high, n, generator)
    return TimestepSample(t=grid[s], step_index=s)


def sample_uniform_t(
    n: int, t_min: int = 20, t_max: int = 980, generator: torch.Generator | None = None
) -> TimestepSample:
    """t ~ U{t_min..t_max} (inclusive)."""
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    return TimestepSample(t=_randint(t_min, t_max, n, generator))


def annealed_t_max(
    step: int, total: int, start: int = 980, end: int = 500, schedule: Literal["linear", "sqrt"] = "linear"
) -> int:
    """Upper timestep bound at training step ``step`` of ``total``: start at p = 0, end at p = 1."""
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    p = min(max(step / total, 0.0), 1.0)
    if schedule == "linear":
        value = start + (end - start) * p
    elif schedule == "sqrt":
        value = (start - end) * (1.0 - math.sqrt(p)) + end
    else:
        raise ValueError(f"unknown annealing schedule {schedule!r}: use 'linear' or 'sqrt'")
    return round(value)


def sample_annealed_t(
    n: int,
    step: int,
    total: int,
    t_min: int = 20,
    start: int = 980,
    end: int = 500,
    schedule: Literal["linear", "sqrt"] = "linear",
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> TimestepSample:
    """t ~ U{t_min..t_max(step)}, or t = t_max(step) for every sample when ``deterministic``."""
    t_max = max(annealed_t_max(step, total, start, end, schedule), t_min)
    if deterministic:
        return TimestepSample(t=torch.full((n,), t_max, dtype=torch.long))
    return sample_uniform_t(n, t_min, t_max, generator)
