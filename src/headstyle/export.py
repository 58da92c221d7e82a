"""Writing renders to disk: PNGs, image grids, depth maps, turntable GIF/MP4; every write is atomic.

Images are tensors in [-1, 1] (as the generator returns them), shaped (3, H, W) or (N, 3, H, W);
they become uint8 with PanoHead's rounding (x * 127.5 + 128, clamped, truncated).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from headstyle.cameras import PIVOT, cameras, turntable_cameras
from headstyle.generator.base import Generator, RenderOutput
from headstyle.generator.latents import Latent
from headstyle.io import atomic_path
from headstyle.progress import progress_bar

VIDEO_SUFFIXES = (".gif", ".mp4")


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] images (3, H, W) or (N, 3, H, W) -> uint8 arrays (H, W, 3) or (N, H, W, 3)."""
    if images.ndim not in (3, 4) or images.shape[-3] not in (1, 3):
        raise ValueError(f"expected (3, H, W) or (N, 3, H, W) images, got {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float32)
    x = torch.nan_to_num(x, nan=0.0) * 127.5 + 128
    x = x.clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def _as_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, Tensor):
        image = to_uint8(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, C]) array or a [-1, 1] tensor, got {image.dtype} {image.shape}")
    return image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image


def save_image(image: Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write one image (a [-1, 1] (3, H, W) tensor or a uint8 (H, W[, 3]) array) as PNG/JPEG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_as_uint8(image)).save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
    return path


def image_grid(images: Tensor | np.ndarray, cols: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images ((N, 3, H, W) in [-1, 1], or uint8 (N, H, W, 3)) row-major into one uint8 sheet.

    ``cols`` defaults to ceil(sqrt(N)); cells are separated by ``pad`` pixels of ``pad_value``.
    """
    tiles = to_uint8(images) if isinstance(images, Tensor) else np.asarray(images)
    if tiles.ndim == 3:
        tiles = tiles[..., None]
    if tiles.ndim != 4 or tiles.dtype != np.uint8 or len(tiles) == 0:
        raise ValueError(f"expected a non-empty batch of images, got {tiles.dtype} {tiles.shape}")
    n, h, w, ch = tiles.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, ch), pad_value, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + h, x : x + w] = tile
    return sheet


def save_grid(images: Tensor | np.ndarray, path: str | os.PathLike, cols: int | None = None, pad: int = 2) -> Path:
    """Write ``image_grid(images, cols, pad)`` to ``path`` atomically."""
    return save_image(image_grid(images, cols=cols, pad=pad), path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG (tight layout, 100 dpi), written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def depth_to_uint8(depth: Tensor, mask: Tensor | None = None, threshold: float = 0.5) -> np.ndarray:
    """Depth (N, 1, H, W) or (1, H, W) -> grey uint8 (N, H, W) / (H, W): near = white, far = dark.

    Each image is normalised over its own foreground (mask > threshold, or every pixel without a
    mask); the background is black.
    """
    single = depth.ndim == 3
    d = depth.detach().to("cpu", torch.float32).reshape(-1, *depth.shape[-2:])
    fg = torch.ones_like(d, dtype=torch.bool) if mask is None else mask.detach().cpu().reshape(d.shape) > threshold
    fg = fg & torch.isfinite(d)
    out = torch.zeros_like(d)
    for i in range(len(d)):
        if fg[i].any():
            vals = d[i][fg[i]]
            near, far = vals.min(), vals.max()
            out[i] = torch.where(fg[i], 1 - (d[i] - near) / (far - near).clamp_min(1e-8), 0.0)
    grey = (out * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return grey[0] if single else grey


def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg can provide an ffmpeg binary for MP4 output."""
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe()).is_file()
    except (ImportError, RuntimeError):
        return False


def save_video(frames: Tensor | np.ndarray | Sequence[np.ndarray], path: str | os.PathLike, fps: float = 24) -> Path:
    """Write frames ((N, 3, H, W) in [-1, 1] or uint8 (N, H, W, 3)) as a looping GIF or an H.264 MP4."""
    import imageio.v3 as iio

    path = Path(path)
    arr = to_uint8(frames) if isinstance(frames, Tensor) else np.stack([np.asarray(f) for f in frames])
    if arr.ndim != 4 or arr.dtype != np.uint8 or len(arr) == 0:
        raise ValueError(f"expected a non-empty (N, H, W, 3) uint8 frame stack, got {arr.dtype} {arr.shape}")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            iio.imwrite(tmp, arr, extension=".gif", duration=1000.0 / fps, loop=0)
        elif suffix == ".mp4":
            if not ffmpeg_available():
                raise RuntimeError("MP4 output needs ffmpeg: pip install imageio-ffmpeg")
            # yuv420p (what players expect) needs even sizes; macro_block_size 2 pads only odd ones.
            iio.imwrite(tmp, arr, extension=".mp4", plugin="FFMPEG", fps=fps, codec="libx264",
                        pixelformat="yuv420p", macro_block_size=2, quality=8)
        else:
            raise ValueError(f"{path}: video suffix must be one of {VIDEO_SUFFIXES}")
    return path


def save_turntable(frames: Tensor | np.ndarray, stem: str | os.PathLike, fps: float = 24) -> list[Path]:
    """Write ``STEM.gif`` and, when ffmpeg is available, ``STEM.mp4``; returns the paths written."""
    stem = Path(stem)
    paths = [save_video(frames, stem.with_name(stem.name + ".gif"), fps)]
    if ffmpeg_available():
        paths.append(save_video(frames, stem.with_name(stem.name + ".mp4"), fps))
    return paths


# ---------------------------------------------------------------------------------------------
# Rendering a generator's heads to files (the `headstyle render` command's library side)


@torch.no_grad()
def render_view(G: Generator, latent: Latent, c: Tensor, render_sr: bool = True) -> RenderOutput:
    """Render one latent at one camera (1, 25) with the torch RNG seeded by latent.seed.

    Reseeding per view makes a render a pure function of (latent, camera), so a turntable does not
    flicker from fresh stratified jitter in every frame. The caller's RNG state is restored after.
    """
    device = latent.ws.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(latent.seed)
        return G.synthesis(latent.ws, c.to(device), noise_mode="const", render_sr=render_sr)


def view_name(latent: Latent, yaw: float, pitch: float) -> str:
    """File stem of a view, e.g. seed0000_yaw-030_pitch+10 (angles in whole degrees)."""
    return f"{latent.name}_yaw{round(math.degrees(yaw)):+04d}_pitch{round(math.degrees(pitch)):+03d}"


def export_renders(
    G: Generator,
    latents: Sequence[Latent],
    out: str | os.PathLike,
    yaws: Sequence[float],
    pitch: float = 0.0,
    turntable: int = 0,
    fps: float = 24,
    render_sr: bool = True,
    depth: bool = False,
    show_progress: bool = True,
    lookat: Sequence[float] = PIVOT,
) -> list[Path]:
    """Write, per latent, a PNG per yaw (radians) at ``pitch``, a sheet of those views, optional depth
    PNGs, and a turntable GIF (+ MP4 with ffmpeg) of ``turntable`` frames, every camera looking at ``lookat``.
    Returns the paths written.

    Images are the super-resolved ``image`` or, with render_sr=False, the raw neural render.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    total = len(latents) * (len(yaws) + turntable)
    with progress_bar(disable=not show_progress) as progress:
        task = progress.add_task("rendering", total=total)

        def advance() -> None:
            progress.update(task, advance=1)

        for latent in latents:
            views = []
            for yaw in yaws:
                r = render_view(G, latent, cameras(yaw, pitch, lookat), render_sr)
                img = r.image if render_sr else r.image_raw
                stem = out / view_name(latent, yaw, pitch)
                written.append(save_image(img[0], stem.with_suffix(".png")))
                if depth:
                    written.append(save_image(depth_to_uint8(r.depth[0], r.mask[0]), f"{stem}_depth.png"))
                views.append(img)
                advance()
            if len(views) > 1:
                written.append(save_grid(torch.cat(views), out / f"{latent.name}_views.png", cols=len(views)))
            if turntable:
                frames = []
                for c in turntable_cameras(turntable, pitch, lookat):
                    r = render_view(G, latent, c[None], render_sr)
                    frames.append(to_uint8((r.image if render_sr else r.image_raw)[0]))
                    advance()
                written += save_turntable(np.stack(frames), out / f"{latent.name}_turntable", fps)
    return written
