"""Mesh and volume files: PLY (vertex colours), OBJ and binary glTF (vertex colours or a texture), PanoHead's .mrc.

Meshes are written by trimesh, the volume by mrcfile; every write goes to a temporary file
beside the target and is renamed into place (headstyle.io.atomic_path). GLB and OBJ carry the
vertex normals (glTF viewers shade a mesh without them flat). A textured mesh's GLB embeds its
PNG; its OBJ is NAME.obj + NAME.mtl + NAME_texture.png, the OBJ written last so that it never
names a file that is not there yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import trimesh
from trimesh.exchange.obj import export_obj

from headstyle.io import atomic_path
from headstyle.mesh.texture import join_textured
from headstyle.mesh.volume import Volume

MESH_FORMATS = ("glb", "ply", "obj")
FORMATS = (*MESH_FORMATS, "mrc")
WHITE, BLACK = (255, 255, 255, 255), (0, 0, 0, 255)


def parse_formats(text: str) -> tuple[str, ...]:
    """'glb', 'ply,obj' or 'all' -> formats in FORMATS order. Raises ValueError naming a bad one."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return FORMATS
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ValueError(f"unknown mesh format {', '.join(bad) or repr(text)}: use {', '.join(FORMATS)} or all")
    return tuple(f for f in FORMATS if f in names)


def write_mesh(mesh: trimesh.Trimesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` as .glb, .ply (binary) or .obj by its suffix, with its vertex colours or texture."""
    path = Path(path)
    file_type = path.suffix.lower().lstrip(".")
    if file_type not in MESH_FORMATS:
        raise ValueError(f"{path}: mesh suffix must be one of {', '.join('.' + f for f in MESH_FORMATS)}")
    if file_type == "obj" and isinstance(mesh.visual, trimesh.visual.TextureVisuals):
        return write_textured_obj(mesh, path)
    data = mesh.export(file_type=file_type, **({} if file_type == "ply" else {"include_normals": True}))
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def write_textured_obj(mesh: trimesh.Trimesh, path: Path) -> Path:
    """A textured mesh as ``path`` (.obj), its material NAME.mtl and its texture NAME_texture.png beside it."""
    mtl, png = obj_sidecars(path)
    # The MTL holds the texture alone: a white diffuse factor (viewers multiply the map by Kd), no specular.
    material = trimesh.visual.material.SimpleMaterial(
        image=mesh.visual.material.baseColorTexture, diffuse=WHITE, ambient=WHITE, specular=BLACK, glossiness=1.0,
        name=png.stem,  # trimesh names the PNG after the material
    )  # fmt: skip
    visual = trimesh.visual.TextureVisuals(uv=mesh.visual.uv, material=material)
    named = trimesh.Trimesh(mesh.vertices, mesh.faces, visual=visual, vertex_normals=mesh.vertex_normals,
                            process=False)  # fmt: skip
    text, files = export_obj(named, include_normals=True, return_texture=True, mtl_name=mtl.name)
    for sidecar in (mtl, png):
        with atomic_path(sidecar) as tmp:
            tmp.write_bytes(files[sidecar.name])
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def obj_sidecars(path: Path) -> tuple[Path, Path]:
    """The material and texture files a textured NAME.obj names: NAME.mtl and NAME_texture.png."""
    return path.with_suffix(".mtl"), path.with_name(f"{path.stem}_texture.png")


def panohead_mrc_array(volume: Volume) -> np.ndarray:
    """The array gen_samples.py writes: sigma[x, y, z] (trimmed shell at -1000) flipped along x."""
    return np.ascontiguousarray(np.flip(volume.sigma, 0), dtype=np.float32)


def write_mrc(volume: Volume, path: str | os.PathLike) -> Path:
    """The density volume as PanoHead writes it (mode 2, float32; opens in ChimeraX)."""
    path = Path(path)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(panohead_mrc_array(volume))
    return path


def side_by_side(left: trimesh.Trimesh, right: trimesh.Trimesh, spacing: float) -> trimesh.Trimesh:
    """One mesh holding ``left`` and ``right`` shifted by ``spacing`` along +x (image right from the front); textured
    meshes share one texture, theirs side by side."""
    shifted = right.copy(include_cache=True)  # with its normals
    shifted.apply_translation((spacing, 0.0, 0.0))
    if isinstance(left.visual, trimesh.visual.TextureVisuals):
        return join_textured(left, shifted)
    return trimesh.util.concatenate([left, shifted])
