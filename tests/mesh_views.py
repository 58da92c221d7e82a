"""A small software renderer of coloured and textured meshes for the mesh tests: z-buffered triangles at a
PanoHead camera, colours interpolated per pixel (vertex colours) or looked up bilinearly (textures, as a viewer
samples them), supersampled so that a pixel averages its footprint as the raw render's ray does. Interpolation
is affine in screen space (a head 2.7 from the camera varies in depth by about 15%)."""

from __future__ import annotations

import numpy as np
import torch
import trimesh

from headstyle.mesh.raster import rasterise


def bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookups (N, C) of ``image`` (H, W, C) at trimesh uvs (N, 2) (v up), texel centres at +0.5,
    clamped at the border (glTF's default sampler wraps; no chart reaches the border)."""
    h, w = image.shape[:2]
    image = image.astype(np.float64)
    x, y = uv[:, 0] * w - 0.5, (1 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    ax, ay = (x - x0)[:, None], (y - y0)[:, None]

    def at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return image[np.clip(i, 0, h - 1), np.clip(j, 0, w - 1)]

    return (at(y0, x0) * (1 - ax) * (1 - ay) + at(y0, x0 + 1) * ax * (1 - ay)
            + at(y0 + 1, x0) * (1 - ax) * ay + at(y0 + 1, x0 + 1) * ax * ay)  # fmt: skip


def texture_of(mesh: trimesh.Trimesh) -> np.ndarray:
    """The uint8 RGB base-colour texture of a textured mesh."""
    return np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"))


def screen(vertices: np.ndarray, c: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (V, 2) (x along rows, y down) on a size x size grid and camera z (V,) at camera c (1, 25)."""
    pose = c[0, :16].reshape(4, 4).double().numpy()
    k = c[0, 16:].reshape(3, 3).double().numpy()
    p = (np.asarray(vertices, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]
    z = p[:, 2]
    return np.stack(((k[0, 0] * p[:, 0] / z + k[0, 2]) * size, (k[1, 1] * p[:, 1] / z + k[1, 2]) * size), -1), z


def render_mesh(mesh: trimesh.Trimesh, c: torch.Tensor, size: int, supersample: int = 4) -> tuple[np.ndarray, ...]:
    """Colours (size, size, 3) in [0, 255] of ``mesh`` at camera c, and the covered fraction (size, size) of each
    pixel."""
    big = size * supersample
    xy, z = screen(mesh.vertices, c, big)
    cover = rasterise(xy[mesh.faces], big, big)
    depth = np.einsum("tk,tk->t", cover.barycentric, z[mesh.faces[cover.face]])
    order = np.lexsort((depth, cover.pixel))
    nearest = order[np.r_[True, cover.pixel[order][1:] != cover.pixel[order][:-1]]]
    pixel, face, bary = cover.pixel[nearest], cover.face[nearest], cover.barycentric[nearest]
    if isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        colours = bilinear(texture_of(mesh), np.einsum("tk,tkd->td", bary, mesh.visual.uv[mesh.faces[face]]))
    else:
        rgb = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(np.float64)
        colours = np.einsum("tk,tkd->td", bary, rgb[mesh.faces[face]])
    image, hit = np.zeros((big * big, 3)), np.zeros(big * big)
    image[pixel], hit[pixel] = colours, 1.0
    image = image.reshape(size, supersample, size, supersample, 3).sum((1, 3))
    hit = hit.reshape(size, supersample, size, supersample).sum((1, 3))
    return image / np.maximum(hit, 1)[..., None], hit / supersample**2
