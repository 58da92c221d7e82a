"""`headstyle render`: PNGs, sheets, turntables and depth maps of a generator's heads."""

from __future__ import annotations

import typer

from headstyle.cli.common import UserError, app


@app.command()
def render(
    generator: str = typer.Option(..., help="Generator: PanoHead .pkl, .pth state dict, .safetensors (+ .json) or "
                                  "a folder (params.safetensors + config.json, e.g. the parity fixture)."),
    out: str = typer.Option(..., help="Output folder (created)."),
    seeds: str | None = typer.Option(None, help="Comma-separated latent seeds, e.g. 0,1 (default 0)."),
    w_npz: str | None = typer.Option(None, help="W+ codes instead of seeds: npz with 'w' of shape (N, num_ws, 512) "
                                     "(PanoHead's projector: (1, 14, 512)); a code with another number of ws is "
                                     "refused, not cut: its ws belong to another network's layers."),
    yaws: str = typer.Option("-90,-30,0,30,90", help="View yaws in degrees (0 = front)."),
    pitch: float = typer.Option(0.0, help="View pitch in degrees (offset from pi/2, as in PanoHead's scripts)."),
    pivot: str = typer.Option("0,0,0.2", help="Look-at point x,y,z of every camera: PanoHead's avg_camera_pivot "
                              "(the default); 0,0,0 renders as infer_LD.py and PanoHead's gen_samples.py do."),
    turntable: int = typer.Option(0, help="Frames of a 360-degree turntable GIF (+ MP4); 0 = none."),
    fps: float = typer.Option(24.0, help="Turntable frames per second."),
    truncation: float = typer.Option(0.7, help="Truncation psi for seeds (1 = none)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    raw_only: bool = typer.Option(False, help="Write the raw neural renders (no super-resolution): much faster."),
    depth: bool = typer.Option(False, help="Also write a grey depth map per view (near = white)."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth (default: released PanoHead)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
    mesh: str | None = typer.Option(None, help="Also write each head's coloured mesh: glb, ply, obj, mrc, a list or "
                                    "all (PanoHead's extraction, level 10; `headstyle mesh` has every setting)."),
    mesh_resolution: int = typer.Option(256, help="Lattice points per axis of the --mesh extraction cube."),
    mesh_faces: int = typer.Option(0, help="Decimate the --mesh meshes to about this many faces (0 = all)."),
    mesh_texture: int = typer.Option(0, help="Bake a texture of this many texels a side (1024, 2048) into the --mesh "
                                     "glb and obj files (0 = vertex colours)."),
) -> None:
    """Render heads (PNG per seed and view, a sheet per seed, optionally a turntable GIF/MP4)."""
    import math

    from headstyle.cli.common import (
        check_count,
        check_heads,
        check_out_dir,
        check_truncation,
        heads,
        load_generator,
        parse_pivot,
        parse_yaws,
        pick_device,
    )
    from headstyle.cli.mesh import check_mesh_flags, write_meshes
    from headstyle.export import export_renders
    from headstyle.settings import MAX_TURNTABLE_FRAMES

    seed_list = check_heads(seeds, w_npz)
    yaw_list = parse_yaws(yaws)
    lookat = parse_pivot(pivot)
    check_count("--turntable", turntable, 0, MAX_TURNTABLE_FRAMES)
    if turntable == 0 and not yaw_list:
        raise UserError("nothing to render: give --yaws and/or --turntable N with N > 0")
    if not (math.isfinite(fps) and fps >= 1e-3):
        raise UserError(f"--fps must be at least 0.001, got {fps}")
    if not (math.isfinite(pitch) and abs(pitch) <= 360):
        raise UserError("--pitch must be degrees within [-360, 360]")
    check_truncation(truncation, truncation_cutoff)
    dev = pick_device(device)
    check_out_dir(out)
    mesh_formats = check_mesh_flags(mesh, mesh_resolution, mesh_faces, mesh_texture) if mesh is not None else ()

    G = load_generator(generator, dev, config, neural_rendering_resolution, depth_samples)
    latents = heads(G, seed_list, w_npz, truncation, truncation_cutoff, dev)
    paths = export_renders(G, latents, out, yaw_list, math.radians(pitch), turntable, fps,
                           render_sr=not raw_only, depth=depth, lookat=lookat)
    if mesh_formats:
        paths += write_meshes(G, latents, out, mesh_formats, mesh_resolution, None, mesh_faces, mesh_texture)
    typer.echo(f"wrote {len(paths)} files to {out}")

