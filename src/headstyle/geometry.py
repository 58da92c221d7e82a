"""Camera geometry on PanoHead 25-vectors: pixel rays, projection and splatting between views.

Cameras are PanoHead 25-vectors (headstyle.cameras): cam2world 4x4 in OpenCV axes
(x right, y down, z forward) and NORMALISED intrinsics, so a pixel (row i, col j) of an h x w
grid has uv = ((j + 0.5) / w, (i + 0.5) / h) at ANY resolution and the camera needs no rescaling
for the latent grid. The rendered depth is PanoHead's composited depth: a distance along the
unit-length ray (``depth_kind="ray"``; "z" for planar depth). Noise lives on the latent grid
(e.g. 64x64 latents of a 512 px image, 32x32 per view of a 2x2 grid) while depth comes from the
renderer (64x64 neural resolution); depth and mask are resampled to the noise's grid with
``nearest-exact`` interpolation, which takes the depth sample at each latent pixel's centre
instead of averaging across silhouettes (averaging would create points floating between the
face and the background). Splatting is nearest-pixel with a z-buffer (the nearest point wins,
ties go to the lowest source index), so a warped noise map holds DISTINCT source entries plus fresh
entries: it is exactly N(0, I) per pixel, independent across pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DepthKind = Literal["ray", "z"]


def _unpack(cams: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if cams.dim() != 2 or cams.shape[1] != 25:
        raise ValueError(f"cameras must be (N, 25) PanoHead labels, got shape {tuple(cams.shape)}")
    pose = cams[:, :16].reshape(-1, 4, 4).float()
    intr = cams[:, 16:].reshape(-1, 3, 3).float()
    return pose[:, :3, :3], pose[:, :3, 3], intr


def pixel_rays(cams: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """World-space rays through the pixel centres of an h x w grid.

    Returns origins (N, 3), unit directions (N, h*w, 3) and each direction's camera z per unit
    length (N, h*w) (to convert planar depth into ray distance). Pixels are row-major.
    """
    rot, origin, intr = _unpack(cams)
    dev = cams.device
    v, u = torch.meshgrid(
        (torch.arange(h, device=dev) + 0.5) / h, (torch.arange(w, device=dev) + 0.5) / w, indexing="ij"
    )
    fx, fy, cx, cy = (intr[:, 0, 0, None], intr[:, 1, 1, None], intr[:, 0, 2, None], intr[:, 1, 2, None])
    x_cam = (u.reshape(1, -1) - cx) / fx
    y_cam = (v.reshape(1, -1) - cy) / fy
    d_cam = torch.stack([x_cam, y_cam, torch.ones_like(x_cam)], dim=-1)
    norm = d_cam.norm(dim=-1)
    dirs = torch.einsum("nij,npj->npi", rot, d_cam / norm.unsqueeze(-1))
    return origin, dirs, 1.0 / norm


def project(points: Tensor, cams: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """World points (N, P, 3) -> flat pixel index (N, P) into an h x w grid, camera z (N, P), valid (N, P)."""
    rot, origin, intr = _unpack(cams)
    p_cam = torch.einsum("nji,npj->npi", rot, points - origin.unsqueeze(1))
    z = p_cam[..., 2]
    safe_z = torch.where(z > 1e-6, z, torch.ones_like(z))
    u = intr[:, 0, 0, None] * p_cam[..., 0] / safe_z + intr[:, 0, 2, None]
    v = intr[:, 1, 1, None] * p_cam[..., 1] / safe_z + intr[:, 1, 2, None]
    col, row = torch.floor(u * w).long(), torch.floor(v * h).long()
    valid = (z > 1e-6) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row.clamp(0, h - 1) * w + col.clamp(0, w - 1), z, valid


def _to_grid(x: Tensor, h: int, w: int) -> Tensor:
    x = x.float()
    return x if tuple(x.shape[-2:]) == (h, w) else F.interpolate(x, size=(h, w), mode="nearest-exact")


def splat_to_view(
    values: Tensor,
    depth: Tensor,
    cam_src: Tensor,
    cam_dst: Tensor,
    mask: Tensor | None = None,
    depth_kind: DepthKind = "ray",
) -> tuple[Tensor, Tensor]:
    """Forward-warp a (N, C, h, w) map from the source view into the destination view.

    Each source pixel is lifted with ``depth`` (N, 1, H, W, resampled to h x w) along its ray
    (depth, mask and cameras of batch 1 are shared by all N maps)
    and splatted to the destination pixel it projects into; the nearest point wins. Pixels of
    ``mask`` (N, 1, H, W) below 0.5 (background) are not lifted. Returns the warped map (0 in
    voids) and the void mask (N, 1, h, w) bool, True where no point landed.
    """
    n, c, h, w = values.shape
    depth, cam_src, cam_dst = (a.expand(n, *a.shape[1:]) for a in (depth, cam_src, cam_dst))
    d = _to_grid(depth, h, w).reshape(n, h * w)
    origin, dirs, z_per_len = pixel_rays(cam_src, h, w)
    dist = d if depth_kind == "ray" else d / z_per_len
    points = origin.unsqueeze(1) + dist.unsqueeze(-1) * dirs
    pix, z, valid = project(points, cam_dst, h, w)
    valid = valid & torch.isfinite(z)
    if mask is not None:
        valid = valid & (_to_grid(mask.expand(n, *mask.shape[1:]), h, w).reshape(n, h * w) >= 0.5)
    p = h * w
    flat = (pix + torch.arange(n, device=pix.device).unsqueeze(1) * p)[valid]
    zv = z[valid]
    src = torch.arange(n * p, device=pix.device).reshape(n, p)[valid]
    zbuf = torch.full((n * p,), float("inf"), device=z.device).scatter_reduce(0, flat, zv, "amin")
    front = zv == zbuf[flat]
    winner = torch.full((n * p,), n * p, dtype=torch.long, device=z.device)
    winner = winner.scatter_reduce(0, flat[front], src[front], "amin")
    filled = winner < n * p
    src_values = values.float().permute(0, 2, 3, 1).reshape(n * p, c)
    out = torch.zeros(n * p, c, device=values.device)
    out[filled] = src_values[winner[filled]]
    warped = out.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
    return warped, (~filled).reshape(n, 1, h, w)
