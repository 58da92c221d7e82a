"""From a density volume to a coloured triangle mesh: marching cubes, components, smoothing, colours.

Meshes are trimesh.Trimesh in world units (the renderer's coordinates: y up, the face towards +z,
as glTF expects), faces counter-clockwise seen from outside (positive volume).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import trimesh
from skimage.measure import marching_cubes

from headstyle.generator.base import FieldSampler
from headstyle.mesh.volume import DEFAULT_BATCH, PAD_VALUE, Volume

PANOHEAD_LEVEL = 10.0  # shape_utils.convert_sdf_samples_to_ply(..., level=10)


class EmptySurfaceError(ValueError):
    """The density never crosses the chosen level inside the cube."""


def isosurface(volume: Volume, level: float = PANOHEAD_LEVEL) -> trimesh.Trimesh:
    """The level set sigma = ``level`` (scikit-image's Lewiner marching cubes), inside where sigma > level."""
    cube, sigma = volume.cube, volume.sigma
    t, n = cube.trim, cube.inner
    inner = sigma[t : t + n, t : t + n, t : t + n]
    # Values at the pad value are cropped away (PanoHead's renderer crop writes -1e3 too).
    field = inner[inner > PAD_VALUE]
    low, high = (float(field.min()), float(field.max())) if field.size else (PAD_VALUE, PAD_VALUE)
    if not PAD_VALUE < level < high:
        raise EmptySurfaceError(
            f"no surface at level {level:g}: the raw density in the cube spans [{low:.3g}, {high:.3g}]; "
            f"choose a level inside that range"
        )
    # 'ascent': the inside holds the larger values, which orients the faces outwards.
    verts, faces, _, _ = marching_cubes(
        sigma, level=level, spacing=(cube.voxel_size,) * 3, gradient_direction="ascent"
    )
    return trimesh.Trimesh(verts + np.asarray(cube.origin), faces, process=False)


def largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The connected component with the most faces (drops floaters and detached debris)."""
    parts = mesh.split(only_watertight=False)
    return max(parts, key=lambda part: len(part.faces)) if len(parts) > 1 else mesh


def smooth(mesh: trimesh.Trimesh, steps: int) -> trimesh.Trimesh:
    """``steps`` Taubin steps (shrink by lambda 0.5, inflate by mu -0.52: a low-pass filter that keeps
    the volume), in place; returns ``mesh``."""
    if steps > 0:
        # trimesh alternates the two half-steps, one per iteration.
        trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.52, iterations=2 * steps)
    return mesh


def to_uint8_colours(rgb: np.ndarray) -> np.ndarray:
    """Raw-image colours (about [-1, 1]) -> uint8 with PanoHead's rounding (x * 127.5 + 128, clamped,
    truncated), as headstyle.export.to_uint8 writes the raw render's pixels."""
    return np.clip(np.nan_to_num(rgb.astype(np.float32), nan=0.0) * 127.5 + 128, 0, 255).astype(np.uint8)


def vertex_colours(
    sampler: FieldSampler,
    vertices: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """uint8 RGB (V, 3) of the field's colour at each point (V, 3) (vertices, texels' surface points), mapped as
    the raw image is; ``advance(n)`` is called after each batch of n points."""
    out = np.empty((len(vertices), 3), dtype=np.float32)
    points = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32))
    with torch.no_grad():
        for start in range(0, len(points), batch_size):
            chunk = points[start : start + batch_size]
            _, rgb = sampler(chunk.to(device).unsqueeze(0))
            out[start : start + len(chunk)] = rgb[0].to("cpu", torch.float32).numpy()
            if advance is not None:
                advance(len(chunk))
    return to_uint8_colours(out)
