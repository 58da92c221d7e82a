"""What the page's buttons do, as plain functions from inputs (arrays, generators, settings, an output
folder) to the files a person takes home. No Gradio here: every step is a call into the library.

    photo --align--> crop + camera --project (base generator)--> ws --stylised generator--> five views,
      turntable, sheet, GLB, W+ .npz
    seeds --base mapping--> ws --base | stylised--> views sheet, turntable (side by side), GLB pair
    seeds + style image(s) + mask --Style Fusion Attention img2img of rendered views--> views, turntable

``report(fraction, text, preview=None)`` receives progress (the job queue's Job.report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from headstyle.app.config import PhotoSection, RenderSection
from headstyle.app.jobs import AppError
from headstyle.cameras import cameras, turntable_cameras
from headstyle.export import image_grid, render_view, save_image, save_turntable, to_uint8, view_name
from headstyle.faces.align import AlignedFace
from headstyle.generator.base import Generator, RenderOutput
from headstyle.generator.latents import Latent, latents_from_seeds
from headstyle.io import atomic_path

Report = Callable[..., None]


def no_report(fraction: float, text: str, preview: np.ndarray | Path | None = None) -> None:
    """The default ``report``: progress goes nowhere."""


def parse_seed_list(text: str, most: int = 8) -> list[int]:
    """'0, 1' -> [0, 1]: between 1 and ``most`` integer seeds in [0, 2**32)."""
    try:
        seeds = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    except ValueError:
        raise AppError(f"seeds {text!r}: give integers separated by commas, e.g. 0,1") from None
    if not 1 <= len(seeds) <= most or any(not 0 <= s < 2**32 for s in seeds):
        raise AppError(f"seeds {text!r}: give 1 to {most} integers in [0, 2**32)")
    return seeds


def image_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) (or (H, W, 4), alpha dropped) -> (1, 3, H, W) float in [-1, 1]."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise AppError(f"expected an RGB picture, got an array of {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.array(arr[..., :3])).permute(2, 0, 1)[None].float() / 127.5 - 1


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def _image(r: RenderOutput, render_sr: bool) -> Tensor:
    return r.image if render_sr else r.image_raw


# ---------------------------------------------------------------------------------------------- photo


def align(photo: np.ndarray) -> AlignedFace:
    """PanoHead's 512 px crop and 25-vector camera of the largest face in an RGB photo (headstyle.faces)."""
    from headstyle.faces.align import align_photo
    from headstyle.faces.detect import PhotoError, detect_faces

    if photo is None:
        raise AppError("no photo: drop a photo with a face into the Photo box")
    image = np.ascontiguousarray(np.asarray(photo)[..., :3])
    try:
        return align_photo(image, detect_faces(image))
    except PhotoError as exc:
        raise AppError(str(exc)) from None


def camera_summary(face: AlignedFace) -> str:
    """The aligned face's pose and camera label as Markdown, for a person to check before projecting."""
    label = ", ".join(f"{v:.4f}" for v in face.camera)
    return (f"**Head pose** (3DDFA angles): yaw {face.yaw:+.1f}°, pitch {face.pitch:+.1f}°, roll {face.roll:+.1f}°; "
            f"scale {face.scale:.2f}\n\n**Camera label** (PanoHead's 25-vector: cam2world 4x4, intrinsics 3x3):\n\n"
            f"`[{label}]`")  # fmt: skip


@dataclass
class PhotoResult:
    """Files of a stylised photo: the crop, the base reconstruction, the stylised views (the paper's five),
    their sheet, photo | reconstruction | stylised, the turntable (MP4 when ffmpeg is there, GIF), the W+
    code, the GLB mesh (None when the head has no surface at PanoHead's level) and the projection's PSNR."""

    crop: Path
    reconstruction: Path
    views: list[Path]
    views_sheet: Path
    sheet: Path
    turntable: list[Path]
    w_npz: Path
    mesh: Path | None
    psnr: float
    perceptual: str
    notes: list[str] = field(default_factory=list)

    @property
    def downloads(self) -> list[Path]:
        mesh = [self.mesh] if self.mesh else []
        return [self.w_npz, *mesh, *self.views, self.views_sheet, self.sheet, self.crop, self.reconstruction,
                *self.turntable]  # fmt: skip


def photo_to_head(
    face: AlignedFace,
    base: Generator,
    stylised: Generator,
    perceptual: nn.Module,
    photo: PhotoSection,
    render: RenderSection,
    out: Path,
    report: Report = no_report,
) -> PhotoResult:
    """Project the aligned face into the base generator's W+ (PanoHead's projector) and render the stylised
    generator with that code: five views, turntable, sheet and mesh, all written into ``out``."""
    from headstyle.faces.projector import ProjectConfig, project

    device = next(base.parameters()).device
    size = base.neural_rendering_resolution if photo.raw else base.img_resolution
    target = image_tensor(_resized(face.crop, size)).to(device)
    c = torch.from_numpy(face.camera)[None].float().to(device)
    cfg = ProjectConfig(steps=photo.steps, space=photo.space, w_avg_samples=photo.w_avg_samples, raw=photo.raw,
                        seed=photo.seed)  # fmt: skip
    share = 0.6  # of the progress bar: the projection is most of the work

    def on_step(step: int, image: Tensor) -> None:
        preview = image_grid(torch.cat([target, image.float()]), cols=2, pad=0)
        report(share * (step + 1) / photo.steps, f"projecting: step {step + 1} of {photo.steps}", preview)

    report(0.0, f"projecting into {photo.space.upper()} (w_avg of {photo.w_avg_samples} samples first)")
    projection = project(base, target, c, perceptual, cfg, show_progress=False, on_step=on_step)
    psnr = 10 * math.log10(4 / max(float((projection.image - target).square().mean()), 1e-12))
    crop = save_image(face.crop, out / "photo_crop.png")
    reconstruction = save_image(projection.image[0], out / "reconstruction.png")
    w_npz = out / "projected_w.npz"
    with atomic_path(w_npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, w=projection.ws.detach().cpu().numpy().astype(np.float32))

    latent = Latent("stylised", projection.ws.detach(), photo.seed)
    views, sheet_views = _views(stylised, latent, render, out, lambda k, n: report(
        share + 0.1 * k / n, f"stylised views: {k} of {n}"))  # fmt: skip
    views_sheet = save_image(image_grid(torch.cat(sheet_views), cols=len(sheet_views)), out / "stylised_views.png")
    styled = _image(render_view(stylised, latent, c, not render.raw), not render.raw)
    panels = [face.crop, to_uint8(projection.image[0]), to_uint8(styled[0])]
    side = face.crop.shape[0]
    sheet = save_image(np.concatenate([_resized(p, side) for p in panels], axis=1), out / "sheet.png")
    frames = _turntable([stylised], latent, render,
                        lambda k, n: report(share + 0.1 + 0.2 * k / n, f"turntable: frame {k} of {n}"))
    turntable = _save_turntable(frames, out / "stylised_turntable", render.fps)
    report(0.9, f"mesh at {render.mesh_resolution}^3")
    mesh, notes = _meshes(base, stylised, [latent], render, out, pair=False)
    return PhotoResult(crop, reconstruction, views, views_sheet, sheet, turntable, w_npz,
                       mesh[0] if mesh else None, psnr, projection.perceptual, notes)  # fmt: skip


def _views(G: Generator, latent: Latent, render: RenderSection, out: Path,
           step: Callable[[int, int], None]) -> tuple[list[Path], list[Tensor]]:
    """One PNG per yaw of render (degrees) at its pitch; returns the paths and the images."""
    pitch = math.radians(render.pitch)
    paths, images = [], []
    for k, yaw in enumerate(math.radians(y) for y in render.yaws):
        image = _image(render_view(G, latent, cameras(yaw, pitch), not render.raw), not render.raw)
        paths.append(save_image(image[0], out / f"{view_name(latent, yaw, pitch)}.png"))
        images.append(image.cpu())
        step(k + 1, len(render.yaws))
    return paths, images


def _turntable(generators: Sequence[Generator], latent: Latent, render: RenderSection,
               step: Callable[[int, int], None]) -> np.ndarray:
    """Frames (N, H, W, 3) of a full turn of ``latent`` through each generator, side by side in every frame."""
    cams = turntable_cameras(render.turntable_frames, math.radians(render.pitch))
    frames = []
    for k, cam in enumerate(cams):
        row = [_image(render_view(G, latent, cam[None], not render.raw), not render.raw)[0] for G in generators]
        frames.append(to_uint8(torch.cat(row, dim=-1)))
        step(k + 1, len(cams))
    return np.stack(frames)


def _save_turntable(frames: np.ndarray, stem: Path, fps: float) -> list[Path]:
    """MP4 (when ffmpeg is there; listed first, the page plays it) and GIF."""
    return sorted(save_turntable(frames, stem, fps), key=lambda p: p.suffix != ".mp4")


def _meshes(base: Generator, stylised: Generator, latents: Sequence[Latent], render: RenderSection, out: Path,
            pair: bool) -> tuple[list[Path], list[str]]:
    """GLB meshes: with ``pair``, each latent's base and stylised heads side by side (NAME_pair.glb, listed
    first) plus each alone; else the stylised head alone. A head without a surface is noted, not fatal."""
    from headstyle.mesh import EmptySurfaceError, MeshSettings, export_meshes

    settings = MeshSettings(resolution=render.mesh_resolution, faces=render.mesh_faces, texture=render.mesh_texture)
    box_warp = base.box_warp
    written, notes = [], []
    for latent in latents:
        try:
            if pair:
                paths = export_meshes(base, [latent], out, ["glb"], box_warp, settings, stylised, show_progress=False)
                written += sorted(paths, key=lambda p: not p.stem.endswith("_pair"))
            else:
                written += export_meshes(stylised, [latent], out, ["glb"], box_warp, settings, show_progress=False)
        except EmptySurfaceError as exc:
            notes.append(f"no mesh for {latent.name}: {exc}")
    return written, notes


# ---------------------------------------------------------------------------------------------- generate


@dataclass
class GenerateResult:
    """Files of generated heads: the sheet (per seed a row of base views over a row of stylised views), the
    turntable (per seed a row, base | stylised), GLB meshes (the first seed's pair first)."""

    sheet: Path
    turntable: list[Path]
    meshes: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def downloads(self) -> list[Path]:
        return [*self.meshes, self.sheet, *self.turntable]


def generate(
    base: Generator,
    stylised: Generator,
    seeds: Sequence[int],
    truncation: float,
    render: RenderSection,
    out: Path,
    report: Report = no_report,
) -> GenerateResult:
    """Heads of ``seeds`` (the base mapping, truncated by psi) through the base and the stylised generator."""
    if not (math.isfinite(truncation) and -2 <= truncation <= 2):
        raise AppError(f"truncation psi must lie in [-2, 2], got {truncation}")
    latents = latents_from_seeds(base, seeds, truncation)
    n = len(latents)
    rows, turns = [], []
    for i, latent in enumerate(latents):
        def step(k: int, m: int, i: int = i, seed: int = latent.seed) -> None:
            report(0.7 * (i + k / m) / n, f"seed {seed}: views and turntable")

        for G, name in ((base, "base"), (stylised, "stylised")):
            rows.append(torch.cat(_views(G, latent, render, out / "views" / name, lambda k, m: None)[1]))
        turns.append(_turntable([base, stylised], latent, render, step))
    sheet = save_image(image_grid(torch.cat(rows), cols=len(render.yaws)), out / "base_vs_stylised.png")
    turntable = _save_turntable(np.concatenate(turns, axis=1), out / "turntable", render.fps)
    report(0.7, f"meshes at {render.mesh_resolution}^3")
    meshes, notes = _meshes(base, stylised, latents, render, out / "meshes", pair=True)
    return GenerateResult(sheet, turntable, meshes, notes)


# ---------------------------------------------------------------------------------------------- style image


def mask_from_editor(value: dict | None, size: int) -> Tensor | None:
    """A style mask (size, size) in [0, 1] from Gradio's image editor: where the person painted (the alpha of
    any layer; the background, e.g. the head shown to paint on, is not part of it); None when nothing is painted."""
    layers = [np.asarray(layer) for layer in (value or {}).get("layers") or [] if layer is not None]
    alphas = [layer[..., 3] for layer in layers if layer.ndim == 3 and layer.shape[-1] == 4]
    if not alphas or max(int(a.max()) for a in alphas) == 0:
        return None
    mask = np.max(np.stack(alphas), axis=0)
    resized = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255)


@dataclass
class StyleResult:
    """Files of Style Fusion Attention views: per seed a sheet (renders over stylised views) and a
    turntable of the stylised views; every PNG."""

    sheets: list[Path]
    turntable: list[Path]
    files: list[Path]

    @property
    def downloads(self) -> list[Path]:
        return self.files


def style_views(
    G: Generator,
    prior,
    seeds: Sequence[int],
    truncation: float,
    style: np.ndarray,
    style_2: np.ndarray | None,
    mask: Tensor | None,
    tau: float,
    alpha: float,
    strength: float,
    steps: int,
    render: RenderSection,
    out: Path,
    report: Report = no_report,
    unets: tuple[nn.Module | None, nn.Module | None] = (None, None),
) -> StyleResult:
    """Stylise rendered views of each seed's head from a style picture (headstyle.attention.views): the
    render is the content, its depth drives the depth ControlNet when the prior has one; ``unets``: the
    (content, style) appearance modules of a trained Style Appearance Module (None: the prior's UNet)."""
    from headstyle.attention.config import SamplingConfig, StyleFusionConfig, StyleViewsConfig, ViewsConfig
    from headstyle.attention.views import stylize_views

    if style is None:
        raise AppError("no style picture: drop one into 'Style picture'")
    try:
        fusion = StyleFusionConfig(tau=tau, alpha=alpha)
        sampling = SamplingConfig(strength=strength, steps=int(steps))
        views = ViewsConfig(seeds=tuple(seeds), yaws=render.yaws, pitch=render.pitch, truncation_psi=truncation,
                            out=str(out), fps=render.fps, render_sr=not render.raw)  # fmt: skip
    except ValueError as exc:
        raise AppError(str(exc)) from None
    save_image(np.asarray(style)[..., :3], out / "style.png")
    if style_2 is not None:
        save_image(np.asarray(style_2)[..., :3], out / "style_2.png")
    if mask is not None:
        save_image((mask * 255).round().to(torch.uint8).numpy(), out / "mask.png")
    config = StyleViewsConfig(views=views, fusion=fusion, sampling=sampling)
    style_2_tensor = None if style_2 is None else image_tensor(style_2)
    files: list[Path] = []
    for i, latent in enumerate(latents_from_seeds(G, seeds, truncation)):
        report(i / len(seeds), f"stylising {len(render.yaws)} views of seed {latent.seed}")
        files += stylize_views(G, prior, [latent], image_tensor(style), config, style_2_tensor, mask,
                               show_progress=False, content_unet=unets[0], style_unet=unets[1])  # fmt: skip
    sheets = [p for p in files if p.name.endswith("_style_views.png")]
    turntable = sorted((p for p in files if "_style_turntable" in p.name), key=lambda p: p.suffix != ".mp4")
    return StyleResult(sheets, turntable, files)


@torch.no_grad()
def front_view(G: Generator, seed: int, truncation: float, render: RenderSection, size: int = 256) -> np.ndarray:
    """The base head of ``seed`` from the front, upscaled to ``size`` px: a canvas to paint a style mask on."""
    latent = latents_from_seeds(G, [seed], truncation)[0]
    image = _image(render_view(G, latent, cameras(0.0, math.radians(render.pitch)), not render.raw), not render.raw)
    return np.asarray(Image.fromarray(to_uint8(image[0])).resize((size, size), Image.Resampling.BICUBIC))
