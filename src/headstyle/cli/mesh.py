"""`headstyle mesh`: coloured meshes (GLB, PLY, OBJ) and PanoHead's .mrc volume of a generator's heads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from headstyle.cli.common import UserError, app, check_count, check_truncation
from headstyle.settings import MAX_SMOOTH_STEPS, Budget

if TYPE_CHECKING:
    from headstyle.generator.base import Generator
    from headstyle.generator.latents import Latent

MAX_RESOLUTION = 1024  # 1024^3 float32 is a 4 GiB volume
MAX_BATCH_SIZE = Budget(2**24, "points per field evaluation; 2**24 already take several GiB")


def check_mesh_options(resolution: int, level: float, trim: float, smooth: int, batch_size: int) -> None:
    """Raise UserError for mesh settings that cannot work (before any model is loaded)."""
    import math

    from headstyle.mesh import extraction_cube

    if not 8 <= resolution <= MAX_RESOLUTION:
        raise UserError(f"--resolution must be between 8 and {MAX_RESOLUTION} points per axis, got {resolution}")
    if not math.isfinite(level):
        raise UserError(f"--level must be a finite raw density (PanoHead uses 10), got {level}")
    check_count("--smooth", smooth, 0, MAX_SMOOTH_STEPS)
    check_count("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    try:
        extraction_cube(resolution, 1.0, trim)
    except ValueError as exc:
        raise UserError(f"--trim: {exc}") from None


def check_texture_options(formats: tuple[str, ...], faces: int, texture: int, prefix: str = "--") -> None:
    """Raise UserError for a face budget or texture size that cannot work (``prefix``: "--" or "--mesh-")."""
    from headstyle.mesh.heads import texture_options_problem

    problem = texture_options_problem(formats, faces, texture, prefix)
    if problem is not None:
        raise UserError(problem)


def check_mesh_flags(mesh: str, resolution: int, faces: int = 0, texture: int = 0) -> tuple[str, ...]:
    """The formats of another command's --mesh option (and its --mesh-resolution, --mesh-faces and
    --mesh-texture), checked before models load."""
    from headstyle.mesh import parse_formats

    try:
        formats = tuple(parse_formats(mesh))
    except ValueError as exc:
        raise UserError(f"--mesh: {exc}") from None
    if not 8 <= resolution <= MAX_RESOLUTION:
        raise UserError(f"--mesh-resolution must be between 8 and {MAX_RESOLUTION}, got {resolution}")
    check_texture_options(formats, faces, texture, "--mesh-")
    return formats


def write_meshes(
    G: Generator,
    latents: list[Latent],
    out: str | os.PathLike,
    formats: tuple[str, ...],
    resolution: int,
    G_stylized: Generator | None = None,
    faces: int = 0,
    texture: int = 0,
) -> list[Path]:
    """Another command's --mesh: each head's mesh at PanoHead's settings (and the stylised one beside it),
    decimated to ``faces`` and textured at ``texture`` texels when those are not 0."""
    from headstyle.mesh import EmptySurfaceError, MeshSettings, export_meshes

    settings = MeshSettings(resolution=resolution, faces=faces, texture=texture)
    try:
        return export_meshes(G, latents, out, formats, G.box_warp, settings, G_stylized)
    except EmptySurfaceError as exc:
        raise UserError(f"{exc} with `headstyle mesh --level` (the other outputs are written)") from None


@app.command()
def mesh(
    generator: str = typer.Option(..., help="Generator: PanoHead .pkl, .pth state dict, .safetensors (+ .json) or "
                                  "a folder (params.safetensors + config.json)."),
    out: str = typer.Option(..., help="Output folder (created)."),
    seeds: str | None = typer.Option(None, help="Comma-separated latent seeds, e.g. 0,1 (default 0)."),
    w_npz: str | None = typer.Option(None, help="W+ codes instead of seeds: npz with 'w' of shape (N, num_ws, 512)."),
    stylized: str | None = typer.Option(None, help="A stylised generator (e.g. runs/x/generator.safetensors): "
                                        "the same heads through both, written side by side."),
    format: str = typer.Option("glb", "--format", help="glb, ply, obj, mrc (PanoHead's density volume), a "
                               "comma-separated list, or all."),
    resolution: int = typer.Option(256, help="Lattice points per axis of PanoHead's extraction cube."),
    level: float = typer.Option(10.0, help="Raw density of the surface (PanoHead's shape_utils: 10)."),
    trim: float = typer.Option(30 / 256, help="Fraction of the cube trimmed off each face (PanoHead: 30/256)."),
    largest_component: bool = typer.Option(True, "--largest-component/--all-components",
                                           help="Keep only the largest connected piece (drops floaters)."),
    smooth: int = typer.Option(0, help="Taubin smoothing steps (0 = the marching-cubes surface)."),
    batch_size: int = typer.Option(2**16, help="Points per field evaluation (bounds memory; larger may be faster "
                                   "on a GPU)."),
    faces: int = typer.Option(0, help="Decimate to about this many faces (quadric collapse; a closed surface stays "
                              "closed), e.g. 50000; 0 = every face marching cubes gives."),
    texture: int = typer.Option(0, help="Bake a square texture of this many texels a side from the field (1024, "
                                "2048; also 256, 512, 4096) into the glb and obj (+ .mtl, _texture.png) files, on "
                                "an xatlas UV atlas; 0 = vertex colours (ply always has them)."),
    truncation: float = typer.Option(0.7, help="Truncation psi for seeds (1 = none)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth (default: released PanoHead)."),
) -> None:
    """Extract each head's surface (marching cubes on the density, vertex colours as the raw render shows them)."""
    from headstyle.cli.common import check_heads, check_out_dir, heads, load_generator, pick_device
    from headstyle.mesh import EmptySurfaceError, MeshSettings, export_meshes, parse_formats

    seed_list = check_heads(seeds, w_npz)
    try:
        formats = parse_formats(format)
    except ValueError as exc:
        raise UserError(f"--format: {exc}") from None
    check_mesh_options(resolution, level, trim, smooth, batch_size)
    check_texture_options(formats, faces, texture)
    check_truncation(truncation, truncation_cutoff)
    dev = pick_device(device)
    check_out_dir(out)
    if stylized is not None and not Path(stylized).exists():
        raise UserError(f"--stylized {stylized}: no such file")

    G = load_generator(generator, dev, config)
    G_stylized = None if stylized is None else load_generator(stylized, dev, config)
    if G_stylized is not None and (G_stylized.num_ws, G_stylized.w_dim) != (G.num_ws, G.w_dim):
        raise UserError(f"--stylized {stylized} takes {G_stylized.num_ws} ws of {G_stylized.w_dim}, the base generator "
                        f"{G.num_ws} of {G.w_dim}: give the stylised version of the same generator")
    latents = heads(G, seed_list, w_npz, truncation, truncation_cutoff, dev)
    settings = MeshSettings(resolution=resolution, level=level, trim=trim, largest_component=largest_component,
                            smooth_steps=smooth, batch_size=batch_size, faces=faces, texture=texture)
    try:
        paths = export_meshes(G, latents, out, formats, G.box_warp, settings, G_stylized)
    except EmptySurfaceError as exc:
        raise UserError(f"{exc} with --level") from None
    typer.echo(f"wrote {len(paths)} files to {out}")
