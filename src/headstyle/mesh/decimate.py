"""Decimation to a face budget: MeshLab's quadric edge collapse (pymeshlab) with its topology check.

Why pymeshlab: it refuses every collapse that would change the surface's topology (the link
condition), so a closed surface stays closed and of the same genus at any budget. The
Fast-Quadric-Mesh-Simplification wrappers (fast-simplification, pyfqmr) do not check it and are
about 25x faster: on the lab heads (genus 0) they kept every budget closed once zero-volume flaps
were dropped, but on the parity fixture's heads, which carry thin handles, they left edges of four
faces or holes at 30-60% of the budgets tried, with every aggressiveness. pymeshlab reached every
budget there within one face, closed. Its costs: a 100 MB wheel, GPL-3 (MeshLab's licence), and
about 10 s for a 320k-face head on one core (benchmarks/mesh.py).
"""

from __future__ import annotations

import numpy as np
import pymeshlab
import trimesh

MIN_FACES = 100


def decimate(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """``mesh`` reduced to about ``faces`` faces with its topology kept (a copy when it has no more), no colours."""
    if faces < MIN_FACES:
        raise ValueError(f"a face budget must be at least {MIN_FACES}, got {faces}")
    if len(mesh.faces) <= faces:
        return trimesh.Trimesh(mesh.vertices.copy(), mesh.faces.copy(), process=False)
    meshes = pymeshlab.MeshSet()
    meshes.add_mesh(pymeshlab.Mesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int32)))
    # preservenormal refuses collapses that flip a face; optimalplacement puts each new vertex at its quadric's
    # minimum; autoclean drops the unreferenced vertices and degenerate faces left behind.
    meshes.meshing_decimation_quadric_edge_collapse(
        targetfacenum=faces, preservetopology=True, preservenormal=True, optimalplacement=True, autoclean=True
    )
    out = meshes.current_mesh()
    return trimesh.Trimesh(out.vertex_matrix(), out.face_matrix(), process=False)
