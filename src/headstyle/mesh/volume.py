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
# Points per field evaluation: ~1.2 KiB of activations each through PanoHead's decoder (about 80 MB a
# batch); on CPU smaller batches were no slower (benchmarks/mesh.py), on a GPU larger ones may help.
DEFAULT_BATCH = 2**16


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


def lattice_indices(cube: Cube, start: int, stop: int) -> Tensor:
    """Lattice indices (i, j, k) (stop - start, 3) of the inner lattice's flat indices [start, stop), x slowest."""
    n = cube.inner
    flat = torch.arange(start, stop)
    return torch.stack((flat // (n * n), (flat // n) % n, flat % n), dim=-1) + cube.trim


def lattice_points(cube: Cube, ijk: Tensor) -> Tensor:
    """World points (M, 3) of lattice indices (M, 3): origin + ijk * voxel_size."""
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
    r = cube.resolution
    sigma = np.full((r, r, r), PAD_VALUE, dtype=np.float32)
    total = cube.inner**3
    with torch.no_grad():
        for start in range(0, total, batch_size):
            ijk = lattice_indices(cube, start, min(start + batch_size, total))
            values, _ = sampler(lattice_points(cube, ijk).to(device).unsqueeze(0))
            if values.shape[0] != 1:
                raise ValueError(f"sample_volume takes the sampler of one head, got a batch of {values.shape[0]}")
            i, j, k = ijk.numpy().T
            sigma[i, j, k] = values[0].to("cpu", torch.float32).numpy()
            if advance is not None:
                advance(len(ijk))
    return Volume(sigma, cube)
