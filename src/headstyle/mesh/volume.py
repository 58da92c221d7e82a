"""The density volume: PanoHead's extraction cube sampled in bounded batches.

PanoHead's gen_samples.py (as EG3D's) samples a cube of side ``box_warp`` centred at the origin
on an R^3 lattice that includes both faces (voxel size box_warp / (R - 1)), x varying slowest,
then trims ``int(30 * R / 256)`` voxels off every face by setting them to -1000, which closes
the surface and removes the tri-grid's border (PanoHead's renderer crops |x|, |z| > 0.4). The
trimmed shell is never evaluated here (at the default trim that skips 55% of the points); at
least one voxel is always trimmed so that every extracted surface is closed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from headstyle.generator.base import FieldSampler

PANOHEAD_TRIM = 30 / 256  # gen_samples.py: pad = int(30 * shape_res / 256) voxels per face
PAD_VALUE = -1000.0  # the density gen_samples.py writes into the trimmed shell
DEFAULT_BATCH = 2**18  # points per field evaluation: ~1 KiB of activations each on PanoHead's decoder


@dataclass(frozen=True)
class Cube:
    """An R^3 sampling lattice: point (i, j, k) is origin + (i, j, k) * voxel_size (x, y, z)."""

    resolution: int
    side: float
    trim: int

    @property
    def voxel_size(self) -> float:
        return self.side / (self.resolution - 1)

    @property
    def origin(self) -> tuple[float, float, float]:
        return (-self.side / 2,) * 3

    @property
    def inner(self) -> int:
        """Voxels per axis that are evaluated (the rest is the trimmed shell)."""
        return self.resolution - 2 * self.trim


def extraction_cube(resolution: int, box_warp: float, trim: float = PANOHEAD_TRIM) -> Cube:
    """PanoHead's cube of side ``box_warp`` at ``resolution``^3, ``int(trim * resolution)`` voxels
    (at least 1) trimmed off each face."""
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    if not (math.isfinite(box_warp) and box_warp > 0):
        raise ValueError(f"box_warp must be positive, got {box_warp}")
    if not (math.isfinite(trim) and trim >= 0):
        raise ValueError(f"trim must be a fraction of the cube in [0, 0.45), got {trim}")
    pad = max(1, int(trim * resolution))
    if resolution - 2 * pad < 2:
        raise ValueError(f"trim {trim} leaves nothing of a {resolution}^3 cube: use a trim in [0, 0.45)")
    return Cube(resolution, float(box_warp), pad)


@dataclass
class Volume:
    """Raw density on a cube: sigma[i, j, k] at cube.origin + (i, j, k) * cube.voxel_size (float32)."""

    sigma: np.ndarray
    cube: Cube


def lattice_points(cube: Cube, start: int, stop: int, device: torch.device | str = "cpu") -> Tensor:
    """World points (stop - start, 3) of the inner lattice's flat indices [start, stop), x slowest."""
    n = cube.inner
    flat = torch.arange(start, stop, device=device)
    ijk = torch.stack((flat // (n * n), (flat // n) % n, flat % n), dim=-1) + cube.trim
    return ijk.to(torch.float64).mul(cube.voxel_size).add(cube.origin[0]).to(torch.float32)


def sample_volume(
    sampler: FieldSampler,
    cube: Cube,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    advance: Callable[[int], None] | None = None,
) -> Volume:
    """Evaluate one head's raw density on ``cube``'s inner lattice, ``batch_size`` points at a time.

    ``sampler`` is a generator's field_sampler for a single ws; ``advance(n)`` is called after each
    batch of n points (a progress bar). Memory: the R^3 float32 volume plus one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = cube.inner**3
    inner = np.empty(total, dtype=np.float32)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            sigma, _ = sampler(lattice_points(cube, start, stop, device).unsqueeze(0))
            if sigma.shape[0] != 1:
                raise ValueError(f"sample_volume takes the sampler of one head, got a batch of {sigma.shape[0]}")
            inner[start:stop] = sigma[0].to("cpu", torch.float32).numpy()
            if advance is not None:
                advance(stop - start)
    r, t, n = cube.resolution, cube.trim, cube.inner
    sigma = np.full((r, r, r), PAD_VALUE, dtype=np.float32)
    sigma[t : t + n, t : t + n, t : t + n] = inner.reshape(n, n, n)
    return Volume(sigma, cube)
