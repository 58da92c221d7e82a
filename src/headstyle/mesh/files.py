"""Mesh and volume files: PLY (vertex colours), OBJ (vertex colours), binary glTF, PanoHead's .mrc.

Meshes are written by trimesh, the volume by mrcfile; every write goes to a temporary file
beside the target and is renamed into place (headstyle.io.atomic_path).
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import trimesh

from headstyle.io import atomic_path
from headstyle.mesh.volume import Volume

MESH_FORMATS = ("glb", "ply", "obj")
FORMATS = (*MESH_FORMATS, "mrc")


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
    """Write ``mesh`` as .glb, .ply (binary) or .obj by its suffix, with its vertex colours."""
    path = Path(path)
    file_type = path.suffix.lower().lstrip(".")
    if file_type not in MESH_FORMATS:
        raise ValueError(f"{path}: mesh suffix must be one of {', '.join('.' + f for f in MESH_FORMATS)}")
    data = mesh.export(file_type=file_type)
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


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
    """One mesh holding ``left`` and ``right`` shifted by ``spacing`` along +x (image right from the front)."""
    shifted = right.copy()
    shifted.apply_translation((spacing, 0.0, 0.0))
    return trimesh.util.concatenate([left, shifted])
