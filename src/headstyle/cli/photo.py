"""`headstyle align`, `headstyle project` and `headstyle photo`: a real person's photo into PanoHead's
crop and camera, into W+ (optionally with pivotal tuning), and through a stylised generator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from headstyle.cli.common import (
    UserError,
    app,
    check_count,
    check_image,
    check_out_dir,
    check_seed,
    load_generator,
    parse_yaws,
    pick_device,
)
from headstyle.cli.mesh import check_mesh_flags, write_meshes
from headstyle.settings import (
    MAX_ITERATIONS,
    MAX_TURNTABLE_FRAMES,
    MAX_W_AVG_SAMPLES,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from headstyle.faces.align import AlignedFace
    from headstyle.faces.projector import Projection

GENERATOR_HELP = ("Generator: PanoHead .pkl, .pth state dict, .safetensors (+ .json) or a folder (params.safetensors "
                  "+ config.json, e.g. the parity fixture).")
VGG_HELP = ("LPIPS-VGG16 weights: NVIDIA's TorchScript vgg16.pt (what PanoHead's projector uses; its tensors are read, "
            "its code never runs) or a torchvision VGG16 state dict with --lpips-lin. Without it the projector uses a "
            "Laplacian-pyramid L1 distance instead of LPIPS and says so.")


def _check_projection(space: str, steps: int, w_avg_samples: int, **values: float | None) -> None:
    """The projector's options (the space, its budgets, and counts that must be at least 1), before anything
    loads."""
    if space not in ("w", "w+"):
        raise UserError(f"--space must be w or w+, got {space!r}")
    check_count("--steps", steps, 1, MAX_ITERATIONS)
    check_count("--w-avg-samples", w_avg_samples, 1, MAX_W_AVG_SAMPLES)
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 1):
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _check_file(option: str, path: str | None) -> None:
    if path is not None and not Path(path).exists():
        raise UserError(f"{option} {path}: no such file")


def _align(images: list[str], face: int | None) -> list[AlignedFace]:
    """Align every photo before anything is written: one bad photo stops the command with no output."""
    from headstyle.faces.align import align_photo
    from headstyle.faces.detect import PhotoError, detect_faces, load_photo

    aligned = []
    for name in images:
        try:
            image = load_photo(name)
            aligned.append(align_photo(image, detect_faces(image), face, what=name))
        except PhotoError as exc:
            raise UserError(str(exc)) from None
    return aligned


def _write_aligned(out: Path, images: list[str], aligned: list[AlignedFace]) -> list[str]:
    from headstyle.export import save_image
    from headstyle.faces.dataset import dataset_json
    from headstyle.io import atomic_write_text

    names = [f"{Path(p).stem}.png" for p in images]
    if len(set(names)) != len(names):
        raise UserError("two photos share a file name stem; their crops would overwrite each other: rename one")
    for name, a in zip(names, aligned, strict=True):
        save_image(a.crop, out / name)
    atomic_write_text(out / "dataset.json", dataset_json((n, a.camera) for n, a in zip(names, aligned, strict=True)))
    poses = {n: {"yaw": a.yaw, "pitch": a.pitch, "roll": a.roll, "photo_roll": a.photo_roll, "scale": a.scale,
                 "box": list(a.face.box)} for n, a in zip(names, aligned, strict=True)}
    atomic_write_text(out / "poses.json", json.dumps(poses, indent=1) + "\n")
    return names


@app.command()
def align(
    images: list[str] = typer.Argument(..., help="Photos (JPEG/PNG) with a face."),
    out: str = typer.Option(..., help="Output folder: NAME.png crops (512 px), dataset.json (PanoHead's camera "
                            "labels), poses.json (3DDFA-convention yaw/pitch/roll in degrees)."),
    face: int | None = typer.Option(None, help="Which face when a photo has several (0 = largest, the default)."),
) -> None:
    """Crop photos the way PanoHead's 3DDFA_V2 cropping does and estimate each camera (25-vector labels)."""
    out_path = check_out_dir(out)
    for name in images:
        _check_file("photo", name)
    aligned = _align(images, face)
    names = _write_aligned(out_path, images, aligned)
    for name, a in zip(names, aligned, strict=True):
        typer.echo(f"{name}: yaw {a.yaw:+.1f} pitch {a.pitch:+.1f} roll {a.roll:+.1f} degrees")
    typer.echo(f"wrote {len(names)} crop(s) and dataset.json to {out}")


def _load_target(path: str | Path, size: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """PanoHead's target: centre square, Lanczos to ``size``; returns ([-1, 1] (1, 3, size, size), uint8)."""
    import numpy as np
    import torch
    from PIL import Image

    from headstyle.faces.detect import PhotoError, load_photo

    try:
        image = Image.fromarray(load_photo(path))
    except PhotoError as exc:
        raise UserError(str(exc)) from None
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.LANCZOS)
    pixels = np.array(image, dtype=np.uint8)
    target = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    return target, pixels


def _load_perceptual(vgg16: str | None, lpips_lin: str | None, device: torch.device):
    from headstyle.faces.perceptual import WeightsError, load_perceptual

    try:
        return load_perceptual(vgg16, lpips_lin).to(device)
    except WeightsError as exc:
        raise UserError(str(exc)) from None


def _write_projection(out: Path, pixels: np.ndarray, result: Projection, tuned: Projection | None, fps: float) -> None:
    import numpy as np

    from headstyle.export import save_image, save_video
    from headstyle.io import atomic_path, atomic_write_text

    save_image(pixels, out / "target.png")
    save_image(result.image[0], out / ("proj_w.png" if tuned else "proj.png"))
    if tuned is not None:
        save_image(tuned.image[0], out / "proj.png")
    with atomic_path(out / "projected_w.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, w=result.ws.detach().cpu().numpy().astype(np.float32))
    frames = result.frames + (tuned.frames if tuned else [])
    save_video(np.stack(frames), out / "proj.mp4", fps=fps)
    log = {"perceptual": result.perceptual, "projection": result.losses, "pti": tuned.losses if tuned else []}
    atomic_write_text(out / "losses.json", json.dumps(log) + "\n")


def _camera(image: str, camera: str | None) -> np.ndarray:
    from headstyle.faces.dataset import read_camera

    path = Path(camera) if camera else Path(image).with_name("dataset.json")
    if not path.is_file():
        raise UserError(f"no camera for {image}: give --camera dataset.json (written by `headstyle align`)")
    try:
        return read_camera(path, image)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@app.command()
def project(
    generator: str = typer.Option(..., help=GENERATOR_HELP),
    image: str = typer.Option(..., help="The aligned crop (from `headstyle align`)."),
    out: str = typer.Option(..., help="Output folder: projected_w.npz, target.png, proj.png, proj.mp4, losses.json "
                            "(+ tuned_generator.safetensors with --pti)."),
    camera: str | None = typer.Option(None, help="dataset.json holding the crop's camera (default: the one beside "
                                      "the image)."),
    steps: int = typer.Option(500, help="Projection steps (PanoHead: 500)."),
    space: str = typer.Option("w+", help="w (one code for every layer) or w+ (one per layer, PanoHead's)."),
    pti: int = typer.Option(0, help="Pivotal-tuning steps after the projection (PanoHead: 350); 0 = none."),
    vgg16: str | None = typer.Option(None, help=VGG_HELP),
    lpips_lin: str | None = typer.Option(None, help="The lpips package's weights/v0.1/vgg.pth (with a torchvision "
                                         "VGG16 state dict as --vgg16)."),
    w_avg_samples: int = typer.Option(10_000, help="Mapped samples for w_avg (PanoHead: 10000)."),
    seed: int = typer.Option(303, help="Random seed (PanoHead's default)."),
    raw: bool = typer.Option(False, help="Fit the raw neural render (no super-resolution): fast, low resolution."),
    ray_start: float = typer.Option(2.35, help="Ray start while projecting (PanoHead's projector sets 2.35)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth (default: released PanoHead)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
    fps: float = typer.Option(30.0, help="Frames per second of proj.mp4."),
) -> None:
    """Project an aligned crop into the generator's W / W+ (PanoHead's projector), optionally with PTI."""
    import torch

    from headstyle.faces.projector import ProjectConfig, PTIConfig, pivotal_tuning
    from headstyle.faces.projector import project as run_projection
    from headstyle.generator.checkpoint import save_generator

    _check_projection(space, steps=steps, w_avg_samples=w_avg_samples, fps=fps, depth_samples=depth_samples,
                      neural_rendering_resolution=neural_rendering_resolution)
    check_count("--pti", pti, 0, MAX_ITERATIONS)
    check_seed(seed)
    out_path = check_out_dir(out)
    for option, path in (("--image", image), ("--vgg16", vgg16), ("--lpips-lin", lpips_lin)):
        _check_file(option, path)
    check_image(image, "--image")  # here, not only once the generator has loaded
    c_np = _camera(image, camera)
    dev = pick_device(device)
    perceptual = _load_perceptual(vgg16, lpips_lin, dev)
    G = load_generator(generator, dev, config, neural_rendering_resolution, depth_samples, ray_start)
    size = G.neural_rendering_resolution if raw else G.img_resolution
    target, pixels = _load_target(image, size, dev)
    c = torch.from_numpy(c_np)[None].to(dev)
    typer.echo(f"perceptual distance: {perceptual.name}")
    cfg = ProjectConfig(steps=steps, space=space, w_avg_samples=w_avg_samples, raw=raw, seed=seed)
    result = run_projection(G, target, c, perceptual, cfg)
    tuned = None
    if pti:
        G_tuned, tuned = pivotal_tuning(G, target, result.ws, c, perceptual, PTIConfig(steps=pti), raw=raw, seed=seed)
        save_generator(G_tuned, out_path / "tuned_generator.safetensors")
    _write_projection(out_path, pixels, result, tuned, fps)
    final = tuned or result
    psnr = 10 * math.log10(4 / max(float((final.image - target).square().mean()), 1e-12))
    typer.echo(f"projected {image} into {space.upper()}: PSNR {psnr:.2f} dB; wrote {out}"
               + (" (PTI generator: tuned_generator.safetensors)" if pti else ""))


@app.command()
def photo(
    image: str = typer.Argument(..., help="A photo with a face."),
    generator: str = typer.Option(..., help=GENERATOR_HELP + " The base (unstylised) PanoHead."),
    stylized: str = typer.Option(..., help="The stylised generator: our .safetensors save, or a .pth state dict "
                                 "(the LD authors' releases), read with the base generator's configuration."),
    out: str = typer.Option(..., help="Output folder (created)."),
    face: int | None = typer.Option(None, help="Which face when the photo has several (0 = largest)."),
    steps: int = typer.Option(500, help="Projection steps (PanoHead: 500)."),
    space: str = typer.Option("w+", help="w or w+ (the LD authors project into W+)."),
    vgg16: str | None = typer.Option(None, help=VGG_HELP),
    lpips_lin: str | None = typer.Option(None, help="The lpips package's vgg.pth (with a torchvision VGG16)."),
    yaws: str = typer.Option("-90,-30,0,30,90", help="Stylised views, yaw in degrees (0 = front)."),
    pitch: float = typer.Option(10.0, help="Pitch of the stylised views in degrees (headstyle.cameras convention)."),
    turntable: int = typer.Option(60, help="Frames of the stylised turntable (GIF + MP4); 0 = none."),
    fps: float = typer.Option(24.0, help="Turntable frames per second."),
    w_avg_samples: int = typer.Option(10_000, help="Mapped samples for w_avg (PanoHead: 10000)."),
    seed: int = typer.Option(303, help="Random seed."),
    raw: bool = typer.Option(False, help="Project and render the raw neural renders (no super-resolution): fast."),
    ray_start: float = typer.Option(2.35, help="Ray start of the base generator while projecting (PanoHead: 2.35)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth base generator."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size (both)."),
    depth_samples: int | None = typer.Option(None, help="Override samples per ray (both generators)."),
    mesh: str | None = typer.Option(None, help="Also write the head's coloured mesh through the base and the "
                                    "stylised generator, side by side: glb, ply, obj, mrc, a list or all."),
    mesh_resolution: int = typer.Option(256, help="Lattice points per axis of the --mesh extraction cube."),
    mesh_faces: int = typer.Option(0, help="Decimate the --mesh meshes to about this many faces (0 = all)."),
    mesh_texture: int = typer.Option(0, help="Bake a texture of this many texels a side (1024, 2048) into the --mesh "
                                     "glb and obj files (0 = vertex colours)."),
) -> None:
    """Stylise a real person: align the photo, project it with the base generator, render the stylised one."""
    import numpy as np
    import torch
    from PIL import Image

    from headstyle.export import export_renders, render_view, save_image, to_uint8
    from headstyle.faces.projector import ProjectConfig
    from headstyle.faces.projector import project as run_projection
    from headstyle.generator.latents import Latent

    _check_projection(space, steps=steps, w_avg_samples=w_avg_samples, fps=fps, depth_samples=depth_samples,
                      neural_rendering_resolution=neural_rendering_resolution)
    yaw_list = parse_yaws(yaws)
    check_count("--turntable", turntable, 0, MAX_TURNTABLE_FRAMES)
    if not math.isfinite(pitch):
        raise UserError("--pitch must be a finite number")
    check_seed(seed)
    mesh_formats = check_mesh_flags(mesh, mesh_resolution, mesh_faces, mesh_texture) if mesh is not None else ()
    out_path = check_out_dir(out)
    for option, path in (("photo", image), ("--generator", generator), ("--stylized", stylized), ("--vgg16", vgg16),
                         ("--lpips-lin", lpips_lin)):
        _check_file(option, path)
    # The photo is checked before any model is loaded.
    aligned = _align([image], face)[0]
    dev = pick_device(device)
    perceptual = _load_perceptual(vgg16, lpips_lin, dev)
    G = load_generator(generator, dev, config, neural_rendering_resolution, depth_samples, ray_start)
    S = load_generator(stylized, dev, config or generator, neural_rendering_resolution, depth_samples)
    if (S.num_ws, S.w_dim) != (G.num_ws, G.w_dim):
        raise UserError(f"--stylized takes {S.num_ws} ws of {S.w_dim} but the base generator {G.num_ws} of {G.w_dim}: "
                        "they are not the same PanoHead")
    names = _write_aligned(out_path, [image], [aligned])
    size = G.neural_rendering_resolution if raw else G.img_resolution
    target, pixels = _load_target(out_path / names[0], size, dev)
    c = torch.from_numpy(aligned.camera)[None].to(dev)
    typer.echo(f"{names[0]}: yaw {aligned.yaw:+.1f} pitch {aligned.pitch:+.1f} roll {aligned.roll:+.1f} degrees; "
               f"perceptual distance: {perceptual.name}")
    result = run_projection(G, target, c, perceptual, ProjectConfig(steps=steps, space=space,
                                                                    w_avg_samples=w_avg_samples, raw=raw, seed=seed))
    _write_projection(out_path, pixels, result, None, fps)
    latent = Latent("stylized", result.ws, seed)
    export_renders(S, [latent], out_path, yaw_list, math.radians(pitch), turntable, fps, render_sr=not raw)
    styled = render_view(S, latent, c, render_sr=not raw)
    styled_image = styled.image_raw if raw else styled.image
    panels = [aligned.crop, to_uint8(result.image[0]), to_uint8(styled_image[0])]
    side = aligned.crop.shape[0]
    row = [np.asarray(Image.fromarray(p).resize((side, side), Image.LANCZOS)) for p in panels]
    save_image(np.concatenate(row, axis=1), out_path / "sheet.png")
    if mesh_formats:
        write_meshes(G, [latent], out_path, mesh_formats, mesh_resolution, S, mesh_faces, mesh_texture)
    meshes = ", stylized_base/_stylized/_pair meshes" if mesh_formats else ""
    typer.echo(f"wrote {out}: sheet.png (photo | base reconstruction | stylised), stylized_*.png, "
               f"stylized_turntable, projected_w.npz{meshes}")
