"""UV atlas (xatlas) and a colour texture baked from the field at every texel's surface point.

    mesh --xatlas--> charts packed in [0, 1]^2 --texel centres rasterised--> surface points
      --field_sampler rgb, mapped as the raw image is--> texels --gutters filled--> PNG

The texture is square, ``size`` texels a side, image row i holding v in [i / size, (i + 1) / size)
(glTF's convention: v down the image; trimesh stores 1 - v and flips it back when it writes glTF).
Each texel whose centre lies in a chart takes the field's colour at the surface point under it, so
the colour detail does not depend on how many faces the mesh kept; every other texel takes the
colour of the nearest chart texel, so neither bilinear filtering nor mipmaps pull in a background
colour at chart borders (seams).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
import xatlas
from PIL import Image
from scipy.ndimage import distance_transform_edt

from headstyle.generator.base import FieldSampler
from headstyle.mesh.raster import Coverage, rasterise
from headstyle.mesh.surface import vertex_colours
from headstyle.mesh.volume import DEFAULT_BATCH

TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
PADDING = 4  # texels xatlas keeps between charts (about 3 after its atlas is scaled to the texture)
MARGIN = 2  # texels kept free along the texture's border (glTF's default sampler wraps around it)


@dataclass
class Atlas:
    """A mesh's UV layout: vertex_map (V',) indexes the mesh's vertices (seam vertices repeat), faces (F, 3)
    index the V' atlas vertices, uv (V', 2) in [0, 1] with v down the image."""

    vertex_map: np.ndarray
    faces: np.ndarray
    uv: np.ndarray


def unwrap(mesh: trimesh.Trimesh, size: int) -> Atlas:
    """xatlas's charts of ``mesh`` packed for a ``size`` x ``size`` texture, ``PADDING`` texels apart and
    ``MARGIN`` texels inside its border (bilinear lookups and mipmaps never reach across it)."""
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = size
    pack.padding = PADDING
    atlas.generate(xatlas.ChartOptions(), pack)
    vertex_map, faces, uv = atlas[0]
    # xatlas's own atlas is about size x size texels; its uvs in [0, 1] are scaled into the margin.
    uv = (uv.astype(np.float64) * (size - 2 * MARGIN) + MARGIN) / size
    return Atlas(vertex_map.astype(np.int64), faces.astype(np.int64), uv)


def texel_coverage(atlas: Atlas, size: int) -> Coverage:
    """The texels whose centres lie in a chart, each once, with its face and barycentric coordinates."""
    coverage = rasterise(atlas.uv[atlas.faces] * size, size, size)
    _, first = np.unique(coverage.pixel, return_index=True)
    return Coverage(coverage.pixel[first], coverage.face[first], coverage.barycentric[first])


def surface_points(mesh: trimesh.Trimesh, atlas: Atlas, coverage: Coverage) -> np.ndarray:
    """The point (T, 3) of ``mesh`` under each covered texel."""
    corners = np.asarray(mesh.vertices)[atlas.vertex_map[atlas.faces[coverage.face]]]
    return np.einsum("tk,tkd->td", coverage.barycentric, corners)


def fill_gutters(image: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) with every texel outside ``filled`` (H, W) set to its nearest filled texel's value."""
    _, (rows, cols) = distance_transform_edt(~filled, return_indices=True)
    return image[rows, cols]


def bake_texture(
    sampler: FieldSampler,
    mesh: trimesh.Trimesh,
    atlas: Atlas,
    coverage: Coverage,
    size: int,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The uint8 RGB texture (size, size, 3) of the field's colour on ``mesh`` laid out by ``atlas`` at the texels
    of ``coverage`` (texel_coverage), the gutters filled. ``advance(n)`` is called after each batch of n texels."""
    colours = vertex_colours(sampler, surface_points(mesh, atlas, coverage), device, batch_size, advance)
    image = np.zeros((size * size, 3), np.uint8)
    image[coverage.pixel] = colours
    filled = np.zeros(size * size, bool)
    filled[coverage.pixel] = True
    return fill_gutters(image.reshape(size, size, 3), filled.reshape(size, size))


def pbr_material(texture: np.ndarray) -> trimesh.visual.material.PBRMaterial:
    """A glTF PBR material of a uint8 RGB texture: baseColorTexture, matte (metallic 0, roughness 1)."""
    return trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0
    )


def textured_mesh(mesh: trimesh.Trimesh, atlas: Atlas, texture: np.ndarray) -> trimesh.Trimesh:
    """``mesh`` split at the atlas's seams with ``texture`` as its PBR material; each copy of a seam vertex keeps
    the normal of the unsplit mesh (no shading seam)."""
    uv = np.column_stack((atlas.uv[:, 0], 1.0 - atlas.uv[:, 1]))
    return trimesh.Trimesh(
        np.asarray(mesh.vertices)[atlas.vertex_map],
        atlas.faces,
        vertex_normals=np.asarray(mesh.vertex_normals)[atlas.vertex_map],
        visual=trimesh.visual.TextureVisuals(uv=uv, material=pbr_material(texture)),
        process=False,
    )


def join_textured(left: trimesh.Trimesh, right: trimesh.Trimesh) -> trimesh.Trimesh:
    """One textured mesh of two: their textures side by side in one image (no resampling), uvs moved to match."""
    images = [np.asarray(m.visual.material.baseColorTexture.convert("RGB")) for m in (left, right)]
    if images[0].shape[0] != images[1].shape[0]:
        raise ValueError(f"textures of {images[0].shape[0]} and {images[1].shape[0]} rows cannot be joined")
    widths = np.array([image.shape[1] for image in images], dtype=np.float64)
    offsets = np.array([0.0, widths[0]])
    uv = np.concatenate([np.column_stack(((m.visual.uv[:, 0] * w + o) / widths.sum(), m.visual.uv[:, 1]))
                         for m, w, o in zip((left, right), widths, offsets, strict=True)])  # fmt: skip
    return trimesh.Trimesh(
        np.concatenate([left.vertices, right.vertices]),
        np.concatenate([left.faces, right.faces + len(left.vertices)]),
        vertex_normals=np.concatenate([left.vertex_normals, right.vertex_normals]),
        visual=trimesh.visual.TextureVisuals(uv=uv, material=pbr_material(np.concatenate(images, axis=1))),
        process=False,
    )
