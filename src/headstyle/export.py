"""Writing renders to disk: PNGs, image grids, depth maps, turntable GIF/MP4; every write is atomic.

Images are tensors in [-1, 1] (as the generator returns them), shaped (3, H, W) or (N, 3, H, W);
they become uint8 with PanoHead's rounding (x * 127.5 + 128, clamped, truncated).
"""

from __future__ import annotations

import math
import os
import stat
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from headstyle.cameras import cameras, conditioning_camera, turntable_cameras
from headstyle.generator.base import Generator, RenderOutput
from headstyle.progress import progress_bar

VIDEO_SUFFIXES = (".gif", ".mp4")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) and move it onto ``path`` on success.

    Readers never see a half-written file; on an exception the temporary file is removed. The
    result has the usual permissions (0666 less the umask, e.g. 0644), whatever the writer used.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        # Created empty first, so the kernel applies the umask (reading the umask itself is not thread-safe).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(tmp.stat().st_mode)
        yield tmp
        # Some writers replace the file with a private one (safetensors' save_file writes 0600).
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through atomic_path: readers never see a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


@dataclass
class Latent:
    """One head to render: a name for its files, its ws (1, num_ws, w_dim) and the renderer's RNG seed."""

    name: str
    ws: Tensor
    seed: int


def z_from_seed(seed: int, z_dim: int = 512) -> Tensor:
    """PanoHead's gen_samples latent: np.random.RandomState(seed).randn(1, z_dim)."""
    return torch.from_numpy(np.random.RandomState(seed).randn(1, z_dim)).float()


@torch.no_grad()
def latents_from_seeds(
    G: Generator, seeds: Sequence[int], truncation_psi: float = 0.7, truncation_cutoff: int | None = 14
) -> list[Latent]:
    """ws for each seed, mapped with the conditioning camera (yaw 0, pitch 0.2) as PanoHead's scripts do."""
    device = next(G.parameters()).device
    c = conditioning_camera().to(device)
    return [
        Latent(
            f"seed{seed:04d}",
            G.mapping(z_from_seed(seed, G.z_dim).to(device), c, truncation_psi, truncation_cutoff),
            seed,
        )
        for seed in seeds
    ]


class CodeFileError(ValueError):
    """A W+ code file that cannot be used; the message names the file, the problem and the fix."""


# 64 MiB of float32 is ~2,300 W+ codes of (14, 512); a larger 'w' is not a file of codes.
MAX_CODE_BYTES = 64 << 20
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _read_w(path: Path) -> np.ndarray:
    """The array 'w' of an npz, its .npy header checked before any of its data is read.

    An npz is a zip of .npy files: the header declares dtype and shape, so a tiny (or highly
    compressed) file could otherwise make numpy allocate whatever it declares.
    """
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise CodeFileError(f"{path}: expected an npz archive holding 'w', found a bare .npy array; "
                                "save it with np.savez(path, w=w)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if "w.npy" not in names:
            found = ", ".join(n.removesuffix(".npy") for n in names[:10]) or "nothing"
            raise CodeFileError(f"{path}: no array 'w' in the npz (found: {found})")
        with zf.open("w.npy") as member:
            version = np.lib.format.read_magic(member)
            if version not in _NPY_HEADER_READERS:
                raise CodeFileError(f"{path}: 'w' is stored in .npy format version {version}, which is not read here")
            shape, _, dtype = _NPY_HEADER_READERS[version](member)
        if dtype.hasobject:
            raise CodeFileError(f"{path}: 'w' holds Python objects, which would need unpickling; save float W+ codes")
        declared = math.prod(shape) * dtype.itemsize
        if declared > MAX_CODE_BYTES:
            raise CodeFileError(
                f"{path}: 'w' declares shape {shape} of {dtype} ({declared} bytes), more than the "
                f"{MAX_CODE_BYTES >> 20} MiB a file of W+ codes may hold; split it into smaller files"
            )
        with zf.open("w.npy") as member:
            return np.lib.format.read_array(member, allow_pickle=False)


def latents_from_npz(
    path: str | os.PathLike, num_ws: int, w_dim: int = 512, device: str | torch.device = "cpu"
) -> list[Latent]:
    """W+ codes from an npz with key "w", shape (N, num_ws, w_dim) (PanoHead's projector writes (1, 14, 512)).

    A code with a single w ((N, 1, w_dim), or one w as (1, w_dim)) is broadcast to every layer.
    A 2-D (n, w_dim) array with n > 1 is refused: it could be one W+ code saved without its batch
    axis or n single-w codes, and read the wrong way it would render n heads instead of one. A W+
    code with a different number of ws is refused rather than cut or padded: its ws belong to
    another synthesis network's layers (e.g. 14 for the released model, 8 for the reduced fixture).
    Raises CodeFileError; nothing in the file is unpickled and at most MAX_CODE_BYTES are read.
    """
    path = Path(path)
    try:
        w = _read_w(path)
    except CodeFileError:
        raise
    except Exception as exc:  # zip, zlib and .npy parsing of untrusted bytes fail in many library-specific ways
        raise CodeFileError(f"{path}: not a readable npz file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if w.ndim not in (2, 3) or w.shape[-1] != w_dim or w.shape[0] == 0 or not np.issubdtype(w.dtype, np.floating):
        raise CodeFileError(f"{path}: 'w' must be float (N, {num_ws}, {w_dim}), got {w.dtype} {w.shape}")
    if w.ndim == 2 and len(w) > 1:
        n = len(w)
        raise CodeFileError(
            f"{path}: 'w' of shape {w.shape} is either one W+ code without its batch axis or {n} single-w codes; "
            f"save one code as (1, {n}, {w_dim}) (w[None]) or {n} codes as ({n}, 1, {w_dim}) (w[:, None])"
        )
    if w.ndim == 2:
        w = w[:, None]
    if w.shape[1] == 1:
        w = np.repeat(w, num_ws, axis=1)
    if w.shape[1] != num_ws:
        raise CodeFileError(
            f"{path}: 'w' has {w.shape[1]} ws but this generator takes {num_ws} "
            "(W+ codes do not transfer between generators of different resolution)"
        )
    with np.errstate(over="ignore"):
        w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise CodeFileError(f"{path}: 'w' contains NaN, Inf or values beyond float32's range")
    ws = torch.from_numpy(w).to(device)
    return [Latent(f"{path.stem}{i:02d}" if len(ws) > 1 else path.stem, ws[i : i + 1], i) for i in range(len(ws))]


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
) -> list[Path]:
    """Write, per latent, a PNG per yaw (radians) at ``pitch``, a sheet of those views, optional depth
    PNGs, and a turntable GIF (+ MP4 with ffmpeg) of ``turntable`` frames. Returns the paths written.

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
                r = render_view(G, latent, cameras(yaw, pitch), render_sr)
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
                for c in turntable_cameras(turntable, pitch):
                    r = render_view(G, latent, c[None], render_sr)
                    frames.append(to_uint8((r.image if render_sr else r.image_raw)[0]))
                    advance()
                written += save_turntable(np.stack(frames), out / f"{latent.name}_turntable", fps)
    return written
