"""Multi-view consistency: warp one rendered view into another with the rendered depth and cameras.

For a source view A and a target view B of the same head (PanoHead cameras (N, 25), images in
[-1, 1], ray depths and masks), every foreground pixel of A is lifted to 3D along its ray at A's
depth and splatted into B (nearest pixel, z-buffer: headstyle.geometry.splat_to_view).
A pixel of B is co-visible when a point landed on it, B's mask there is >= 0.5, and the landed
point's distance to B's camera agrees with B's depth within ``tolerance`` (world units; this
rejects points of A that B sees occluded). The photometric error is the mean |A_warped - B| / 2
over co-visible pixels (colour in [0, 1]; 0 = perfectly consistent). A view warped into itself
scores exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.geometry import pixel_rays, splat_to_view
from headstyle.metrics.identity import FOREGROUND


def _to(x: Tensor, size: tuple[int, int]) -> Tensor:
    return x.float() if tuple(x.shape[-2:]) == size else F.interpolate(x.float(), size=size, mode="nearest-exact")


def warp_error(
    image_a: Tensor,
    depth_a: Tensor,
    mask_a: Tensor,
    cam_a: Tensor,
    image_b: Tensor,
    depth_b: Tensor,
    mask_b: Tensor,
    cam_b: Tensor,
    tolerance: float = 0.03,
) -> tuple[Tensor, Tensor]:
    """Per-sample photometric error (N,) on co-visible pixels and the co-visible fraction of B's foreground (N,)."""
    n, _, h, w = image_a.shape
    d_a = _to(depth_a, (h, w))
    origin_a, dirs_a, _ = pixel_rays(cam_a, h, w)
    points = origin_a.unsqueeze(1) + d_a.reshape(n, h * w, 1) * dirs_a
    origin_b = cam_b[:, :16].reshape(-1, 4, 4)[:, :3, 3].float()
    dist_b = (points - origin_b.unsqueeze(1)).norm(dim=-1).reshape(n, 1, h, w)
    values = torch.cat([image_a.float(), dist_b], dim=1)
    warped, void = splat_to_view(values, d_a, cam_a, cam_b, mask=_to(mask_a, (h, w)))
    fg_b = _to(mask_b, (h, w)) >= FOREGROUND
    agree = (warped[:, 3:] - _to(depth_b, (h, w))).abs() < tolerance
    covis = (~void & fg_b & agree).float()
    err = ((warped[:, :3] - image_b.float()).abs().mean(1, keepdim=True) / 2 * covis).sum((1, 2, 3))
    count = covis.sum((1, 2, 3))
    return err / count.clamp_min(1), count / fg_b.float().sum((1, 2, 3)).clamp_min(1)


def multiview_consistency(
    images: Tensor, depth: Tensor, mask: Tensor, cams: Tensor, tolerance: float = 0.03
) -> dict[str, float]:
    """Mean warp error between consecutive views (v -> v + 1) of I identities x V cameras.

    images (I, V, 3, H, W), depth and mask (I, V, 1, h, w), cams (V, 25) shared by all identities.
    """
    i, v = images.shape[:2]
    if v < 2:
        raise ValueError("multi-view consistency needs at least 2 views per identity")
    src, dst = torch.arange(v - 1), torch.arange(1, v)

    def pick(x: Tensor, idx: Tensor) -> Tensor:
        return x[:, idx].flatten(0, 1)

    cam_a = cams[src].repeat(i, 1)
    cam_b = cams[dst].repeat(i, 1)
    err, covis = warp_error(
        pick(images, src), pick(depth, src), pick(mask, src), cam_a,
        pick(images, dst), pick(depth, dst), pick(mask, dst), cam_b, tolerance,
    )
    return {"mv_warp_error": float(err.mean()), "mv_covisible": float(covis.mean())}
