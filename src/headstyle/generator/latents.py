"""Latent codes to render: ws from seeds (PanoHead's gen_samples convention) or from W+ npz files.

A W+ npz is untrusted input: its .npy header is checked before any data is read, nothing is
unpickled, and the codes must fit the generator they are rendered with.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from headstyle.cameras import conditioning_camera
from headstyle.generator.base import Generator


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
# Every code is a head rendered at each view (and turntable frame); PanoHead's projector writes one per file.
MAX_CODES = 1000
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _unreadable(path: Path, exc: Exception) -> CodeFileError:
    # zip, zlib and .npy parsing of untrusted bytes fail in many library-specific ways
    return CodeFileError(f"{path}: not a readable npz file ({type(exc).__name__}: {str(exc)[:200]})")


def check_code_file(path: str | os.PathLike) -> None:
    """CodeFileError unless the npz's 'w' header declares float codes within MAX_CODE_BYTES and MAX_CODES; reads
    no data, so a command checks its --w-npz before any model loads."""
    path = Path(path)
    try:
        _check_header(path)
    except CodeFileError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _check_header(path: Path) -> None:
    """The npz's 'w' header checked: an npz is a zip of .npy files whose header declares dtype and shape, so a
    tiny (or highly compressed) file could otherwise make numpy allocate whatever it declares."""
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
        if len(shape) == 3 and shape[0] > MAX_CODES:
            raise CodeFileError(
                f"{path}: 'w' holds {shape[0]} codes, more than the {MAX_CODES} a file may hold (every code is a "
                "head rendered at each view); split it into smaller files"
            )


def _read_w(path: Path) -> np.ndarray:
    """The array 'w' of an npz, its .npy header checked (_check_header) before any of its data is read."""
    _check_header(path)
    with zipfile.ZipFile(path) as zf, zf.open("w.npy") as member:
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
    except Exception as exc:
        raise _unreadable(path, exc) from None
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
