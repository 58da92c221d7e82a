"""The lab's identity sets: the held-out evaluation identities, the check that no other set touches them, and
cameras that cover every pose."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from headstyle.cameras import cameras
from headstyle.lab.world.heads import sample_z

# Seeds naming the identity sets: evaluation (held out) and prior exemplars are disjoint draws.
# The evaluation identities' seed (the prior exemplars' is PRIOR_SEED, lab/prior/exemplar.py): disjoint draws.
HELD_OUT_SEED = 1_000


def held_out_z(n: int) -> Tensor:
    """The lab's evaluation identities (never seen by the prior)."""
    return sample_z(n, HELD_OUT_SEED)


class LeakError(ValueError):
    """An exemplar identity coincides with a held-out identity."""


def check_disjoint(z: Tensor, held_out: Tensor, min_distance: float = 1e-3) -> None:
    """Raise LeakError if any row of z lies within ``min_distance`` of a held-out identity."""
    if held_out.numel() == 0:
        return
    d = torch.cdist(z.float(), held_out.float())
    if (d < min_distance).any():
        i, j = (d < min_distance).nonzero()[0].tolist()
        raise LeakError(f"prior identity {i} equals held-out identity {j}: the prior must not see evaluation heads")


def stratified_360_cameras(identities: int, views: int, generator: torch.Generator) -> Tensor:
    """(identities * views, 25) random cameras, per identity one in each of ``views`` equal yaw sectors of
    [-pi, pi) and alternating pitch halves of [-pi/6, pi/6]: random, but covering every pose."""
    u = torch.rand(identities, views, 2, generator=generator)
    sector = torch.arange(views, dtype=torch.float32)
    yaw = -math.pi + (sector + u[..., 0]) * (2 * math.pi / views)
    pitch = (u[..., 1] * 0.5 + (sector % 2) * 0.5 - 0.5) * (math.pi / 3)
    return cameras(yaw.reshape(-1), pitch.reshape(-1))
