"""Gradient shaping: what happens to a latent gradient between the objective and the injection.

The LD script's order for one branch is
    score -> rank_reweight (single view only) -> * weight(t) -> mirror split
    -> postprocess (* mask, / 1000, clamp +-1, nan_to_num) -> inject.
``rank_reweight`` commutes with a positive per-sample scalar, so applying it to an objective's
already weighted gradient equals the script's "re-weight the score, then multiply by
sqrt(alphas_cumprod)".

All functions are pure, work in float32 and never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_RANK_WEIGHTS = (1.0, 0.75, 0.5, 0.25)


def rank_reweight(
    score: Tensor,
    weights: Sequence[float] = DEFAULT_RANK_WEIGHTS,
    restandardize: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """Per-sample SVD re-weighting of a (N, C, H, W) score viewed as (C, H*W) matrices.

    M = U diag(S) V^T; the result is U[:, :k] diag(S[:k] * W) V[:, :k]^T with k = len(W) <= C
    (components beyond k are dropped). With ``restandardize`` each channel of the result is
    normalised to zero mean / unit std and rescaled to the ORIGINAL score's per-channel mean and
    std (std + eps on both sides, as the LD script's instance norm). Samples containing
    non-finite values are returned unchanged (the script likewise skips a failed SVD).
    """
    if score.dim() != 4:
        raise ValueError(f"rank_reweight expects (N, C, H, W), got shape {tuple(score.shape)}")
    n, c, h, w = score.shape
    k = len(weights)
    if not 1 <= k <= min(c, h * w):
        raise ValueError(f"rank weights must have 1..{min(c, h * w)} entries for {c} channels, got {k}")
    x = score.float()
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    m = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).reshape(n, c, h * w)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    w_t = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
    rebuilt = (u[:, :, :k] * (s[:, :k] * w_t).unsqueeze(1)) @ vh[:, :k, :]
    out = rebuilt.reshape(n, c, h, w)
    if restandardize:
        out = match_channel_stats(out, x, eps)
    return torch.where(finite.reshape(n, 1, 1, 1), out, x)


def match_channel_stats(x: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN: give each channel of x the per-channel mean and std (unbiased, + eps) of reference."""
    mean_x, std_x = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True) + eps
    mean_r, std_r = reference.mean(dim=(2, 3), keepdim=True), reference.std(dim=(2, 3), keepdim=True) + eps
    return (x - mean_x) / std_x * std_r + mean_r


def flip_w(x: Tensor) -> Tensor:
    """Horizontal flip (last axis): the mirror camera's view of a latent, image or gradient."""
    return x.flip(-1)


def mirror_gradients(grad: Tensor, base_weight: float = 0.75, mirror_weight: float = 0.25) -> tuple[Tensor, Tensor]:
    """(base_weight * grad, mirror_weight * flip_w(grad)): the gradients injected into the latents
    of the view and of its mirror view (LD script: no extra prior call for the mirror)."""
    g = grad.float()
    return base_weight * g, mirror_weight * flip_w(g)


def tile_2x2(views: Sequence[Tensor]) -> Tensor:
    """Four (N, C, H, W) views -> one (N, C, 2H, 2W) grid laid out [[v0, v1], [v2, v3]]."""
    if len(views) != 4:
        raise ValueError(f"a 2x2 grid needs exactly 4 views, got {len(views)}")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1:
        raise ValueError(f"grid views must share one shape, got {sorted(shapes)}")
    return torch.cat([torch.cat(views[:2], dim=-1), torch.cat(views[2:], dim=-1)], dim=-2)


def untile_2x2(grid: Tensor) -> list[Tensor]:
    """Inverse of tile_2x2: (N, C, 2H, 2W) -> [v0, v1, v2, v3] (views of the grid, no copy)."""
    hh, ww = grid.shape[-2], grid.shape[-1]
    if hh % 2 or ww % 2:
        raise ValueError(f"grid height and width must be even, got {hh}x{ww}")
    top, bottom = grid.split(hh // 2, dim=-2)
    return [*top.split(ww // 2, dim=-1), *bottom.split(ww // 2, dim=-1)]


def resize_to(images: Tensor, size: int) -> Tensor:
    """Renders -> the prior's image size (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, 1, h, w) render mask -> (N, 1, *size), bilinear with align_corners=True (the LD script's resize)."""
    m = mask.float()
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m, size=size, mode="bilinear", align_corners=True)


@dataclass
class GradStats:
    """Counts from ``postprocess``: 0-dim long tensors (no host sync until logged)."""

    nonfinite: Tensor
    clamped: Tensor


def postprocess(
    grad: Tensor,
    mask: Tensor | None = None,
    scale: float = 1000.0,
    clamp: float | None = 1.0,
) -> tuple[Tensor, GradStats]:
    """The LD script's tail: grad * mask, / scale, clamp(-clamp, clamp), nan_to_num(0, 0, 0).

    ``mask`` (N, 1, h, w) is resized to the gradient's grid. The order is the script's, so an
    inf entry is clamped to +-clamp and a NaN becomes 0. ``nonfinite`` counts non-finite
    entries of the input gradient; ``clamped`` counts entries whose magnitude exceeded ``clamp``.
    """
    g = grad.float()
    nonfinite = (~torch.isfinite(g)).sum()
    if mask is not None:
        g = g * resize_mask(mask, tuple(g.shape[-2:])).to(g.device)
    g = g / scale
    if clamp is not None:
        clamped = (g.abs() > clamp).sum()
        g = g.clamp(-clamp, clamp)
    else:
        clamped = torch.zeros((), dtype=torch.long, device=g.device)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), GradStats(nonfinite=nonfinite, clamped=clamped)
