"""Coloured meshes of a generator's heads: volume -> isosurface -> components -> smoothing -> colours -> files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import trimesh

from headstyle.generator.base import FieldSampler, Generator
from headstyle.generator.latents import Latent
from headstyle.mesh.files import MESH_FORMATS, side_by_side, write_mesh, write_mrc
from headstyle.mesh.surface import PANOHEAD_LEVEL, isosurface, largest_component, smooth, vertex_colours
from headstyle.mesh.volume import DEFAULT_BATCH, PANOHEAD_TRIM, Volume, extraction_cube, sample_volume
from headstyle.progress import progress_bar


@dataclass(frozen=True)
class MeshSettings:
    """How a head becomes a mesh. Defaults: PanoHead's extraction (trim, level 10) at 256^3.

    resolution: lattice points per axis of the cube; level: the raw density of the surface;
    trim: fraction of the cube trimmed off each face; largest_component: drop every other
    component; smooth_steps: Taubin steps (0 = the marching-cubes surface); batch_size: points
    per field evaluation (bounds memory).
    """

    resolution: int = 256
    level: float = PANOHEAD_LEVEL
    trim: float = PANOHEAD_TRIM
    largest_component: bool = True
    smooth_steps: int = 0
    batch_size: int = DEFAULT_BATCH


@dataclass
class HeadMesh:
    """A head's coloured mesh (vertex colours in mesh.visual) and the volume it came from."""

    mesh: trimesh.Trimesh
    volume: Volume


def head_mesh(
    sampler: FieldSampler,
    box_warp: float,
    settings: MeshSettings = MeshSettings(),
    device: torch.device | str = "cpu",
    advance: Callable[[int], None] | None = None,
) -> HeadMesh:
    """The coloured mesh of one head's field (a generator's field_sampler of one ws) in PanoHead's cube
    of side ``box_warp``. Raises EmptySurfaceError when the density never reaches ``settings.level``."""
    cube = extraction_cube(settings.resolution, box_warp, settings.trim)
    volume = sample_volume(sampler, cube, device, settings.batch_size, advance)
    mesh = isosurface(volume, settings.level)
    if settings.largest_component:
        mesh = largest_component(mesh)
    smooth(mesh, settings.smooth_steps)
    mesh.visual.vertex_colors = vertex_colours(sampler, mesh.vertices, device, settings.batch_size)
    return HeadMesh(mesh, volume)


def export_meshes(
    G: Generator,
    latents: Sequence[Latent],
    out: str | os.PathLike,
    formats: Sequence[str],
    box_warp: float,
    settings: MeshSettings = MeshSettings(),
    stylized: Generator | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Write each latent's mesh in ``formats`` (glb, ply, obj, mrc) to ``out`` as NAME.EXT.

    With ``stylized``, the same ws through both generators: NAME_base.EXT, NAME_stylized.EXT and,
    for the mesh formats, NAME_pair.EXT with the stylised head beside the base one (+x, one cube
    side apart). Returns the paths written.
    """
    out = Path(out)
    generators = [("", G)] if stylized is None else [("_base", G), ("_stylized", stylized)]
    cube = extraction_cube(settings.resolution, box_warp, settings.trim)
    written: list[Path] = []
    with progress_bar(disable=not show_progress) as progress:
        for latent in latents:
            meshes = []
            for suffix, gen in generators:
                task = progress.add_task(
                    f"mesh {latent.name}{suffix}", total=cube.inner**3, info="points"
                )

                def advance(n: int, task: int = task) -> None:
                    progress.update(task, advance=n)

                head = head_mesh(gen.field_sampler(latent.ws), box_warp, settings, latent.ws.device, advance)
                meshes.append(head.mesh)
                stem = out / f"{latent.name}{suffix}"
                for fmt in formats:
                    if fmt == "mrc":
                        written.append(write_mrc(head.volume, stem.with_suffix(".mrc")))
                    else:
                        written.append(write_mesh(head.mesh, stem.with_suffix(f".{fmt}")))
            if stylized is not None:
                pair = side_by_side(meshes[0], meshes[1], box_warp)
                pair_formats = [fmt for fmt in formats if fmt in MESH_FORMATS]
                written += [write_mesh(pair, out / f"{latent.name}_pair.{fmt}") for fmt in pair_formats]
    return written
