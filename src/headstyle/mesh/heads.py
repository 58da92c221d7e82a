"""Coloured meshes of a generator's heads: volume -> isosurface -> components -> smoothing -> decimation
-> vertex colours (-> UV atlas -> baked texture) -> files."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trimesh

from headstyle.generator.base import FieldSampler, Generator
from headstyle.generator.latents import Latent
from headstyle.mesh.decimate import MIN_FACES, decimate
from headstyle.mesh.files import MESH_FORMATS, obj_sidecars, side_by_side, write_mesh, write_mrc
from headstyle.mesh.surface import PANOHEAD_LEVEL, isosurface, largest_component, smooth, vertex_colours
from headstyle.mesh.texture import TEXTURE_SIZES, bake_texture, texel_coverage, textured_mesh, unwrap
from headstyle.mesh.volume import DEFAULT_BATCH, PANOHEAD_TRIM, Volume, extraction_cube, sample_volume
from headstyle.progress import progress_bar

if TYPE_CHECKING:
    from rich.progress import Progress


@dataclass(frozen=True)
class MeshSettings:
    """How a head becomes a mesh. Defaults: PanoHead's extraction (trim, level 10) at 256^3.

    resolution: lattice points per axis of the cube; level: the raw density of the surface;
    trim: fraction of the cube trimmed off each face; largest_component: drop every other
    component; smooth_steps: Taubin steps (0 = the marching-cubes surface); batch_size: points
    per field evaluation (bounds memory); faces: the face budget of the decimation (0 = every face
    marching cubes gives); texture: the side of a square texture baked from the field, in texels
    (0 = vertex colours only).
    """

    resolution: int = 256
    level: float = PANOHEAD_LEVEL
    trim: float = PANOHEAD_TRIM
    largest_component: bool = True
    smooth_steps: int = 0
    batch_size: int = DEFAULT_BATCH
    faces: int = 0
    texture: int = 0


def texture_options_problem(formats: Sequence[str], faces: int, texture: int, prefix: str) -> str | None:
    """What is wrong with a face budget and texture size for ``formats`` (None: nothing); ``prefix`` names the
    options in the message (e.g. "--mesh-" for a command, "render: mesh_" for the app's config)."""
    if faces != 0 and faces < MIN_FACES:
        return f"{prefix}faces must be 0 (every face) or at least {MIN_FACES}, got {faces}"
    if texture != 0 and texture not in TEXTURE_SIZES:
        sizes = ", ".join(map(str, TEXTURE_SIZES))
        return f"{prefix}texture must be 0 (vertex colours) or one of {sizes} texels, got {texture}"
    if texture and not {"glb", "obj"} & set(formats):
        return (f"{prefix}texture is written in glb and obj files (ply keeps vertex colours): add glb or obj to the "
                "formats")
    return None


Track = Callable[[str, int], Callable[[int], None]]
"""Starts a stage of one head's meshing ("sample", "decimate", "unwrap" or "bake") of ``total`` units (points,
steps, steps, texels) and returns its ``advance(n)``: a progress bar's task."""


def no_progress(stage: str, total: int) -> Callable[[int], None]:
    """A Track that shows nothing."""
    return lambda n: None


@dataclass
class HeadMesh:
    """A head's vertex-coloured mesh, the same surface with a baked texture (None without settings.texture;
    its vertices repeat along the UV seams) and the volume both came from."""

    mesh: trimesh.Trimesh
    volume: Volume
    textured: trimesh.Trimesh | None = None


def head_mesh(
    sampler: FieldSampler,
    box_warp: float,
    settings: MeshSettings = MeshSettings(),
    device: torch.device | str = "cpu",
    track: Track = no_progress,
) -> HeadMesh:
    """The coloured mesh of one head's field (a generator's field_sampler of one ws) in PanoHead's cube
    of side ``box_warp``. Raises EmptySurfaceError when the density never reaches ``settings.level``."""
    cube = extraction_cube(settings.resolution, box_warp, settings.trim)
    volume = sample_volume(sampler, cube, device, settings.batch_size, track("sample", cube.inner**3))
    mesh = isosurface(volume, settings.level)
    if settings.largest_component:
        mesh = largest_component(mesh)
    smooth(mesh, settings.smooth_steps)
    if settings.faces:
        advance = track("decimate", 1)
        mesh = decimate(mesh, settings.faces)
        advance(1)
    mesh.visual.vertex_colors = vertex_colours(sampler, mesh.vertices, device, settings.batch_size)
    textured = bake_head(sampler, mesh, settings, device, track) if settings.texture else None
    return HeadMesh(mesh, volume, textured)


def bake_head(
    sampler: FieldSampler, mesh: trimesh.Trimesh, settings: MeshSettings, device: torch.device | str, track: Track
) -> trimesh.Trimesh:
    """``mesh`` unwrapped and textured with the field's colours at ``settings.texture`` texels a side."""
    advance = track("unwrap", 1)
    atlas = unwrap(mesh, settings.texture)
    advance(1)
    coverage = texel_coverage(atlas, settings.texture)
    image = bake_texture(sampler, mesh, atlas, coverage, settings.texture, device, settings.batch_size,
                         track("bake", len(coverage.pixel)))  # fmt: skip
    return textured_mesh(mesh, atlas, image)


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
    side apart). With ``settings.texture``, GLB and OBJ hold the textured mesh (an OBJ with its
    NAME.mtl and NAME_texture.png), PLY the vertex-coloured one. Returns the paths written.
    """
    out = Path(out)
    generators = [("", G)] if stylized is None else [("_base", G), ("_stylized", stylized)]
    written: list[Path] = []
    with progress_bar(disable=not show_progress) as progress:
        for latent in latents:
            heads = []
            for suffix, gen in generators:
                track = progress_track(progress, f"{latent.name}{suffix}")
                head = head_mesh(gen.field_sampler(latent.ws), box_warp, settings, latent.ws.device, track)
                heads.append(head)
                stem = out / f"{latent.name}{suffix}"
                written += write_surfaces(head.mesh, head.textured, stem, formats)
                if "mrc" in formats:
                    written.append(write_mrc(head.volume, stem.with_suffix(".mrc")))
            if stylized is not None:
                base, styled = heads
                pair = side_by_side(base.mesh, styled.mesh, box_warp)
                textured = None if base.textured is None else side_by_side(base.textured, styled.textured, box_warp)
                written += write_surfaces(pair, textured, out / f"{latent.name}_pair", formats)
    return written


def progress_track(progress: Progress, name: str) -> Track:
    """A Track that adds a task per stage to ``progress``, described "STAGE NAME"."""
    units = {"sample": "points", "decimate": "steps", "unwrap": "steps", "bake": "texels"}

    def track(stage: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(f"{stage} {name}", total=total, info=units[stage])
        return lambda n: progress.update(task, advance=n)

    return track


def write_surfaces(
    mesh: trimesh.Trimesh, textured: trimesh.Trimesh | None, stem: Path, formats: Sequence[str]
) -> list[Path]:
    """STEM.EXT for each mesh format in ``formats``: PLY vertex-coloured, GLB and OBJ ``textured`` unless it is
    None. Returns the paths written (a textured OBJ's .mtl and _texture.png too)."""
    written: list[Path] = []
    for fmt in (f for f in formats if f in MESH_FORMATS):
        path = stem.with_suffix(f".{fmt}")
        if fmt == "ply" or textured is None:
            written.append(write_mesh(mesh, path))
        else:
            written.append(write_mesh(textured, path))
            written += list(obj_sidecars(path)) if fmt == "obj" else []
    return written
