"""Stylisation: closeness of a set of renders to a style, independent of which identities they show.

Every foreground pixel (mask >= 0.5) of every image contributes one feature vector
phi = (r, g, b, |grad L|, L - mean_3x3(L)) with colours in [0, 1] and L the luminance: colour plus
local texture. A set of images is summarised by the mean and covariance of its pooled features,
so the identities (which pixel is where) do not matter, only the style's statistics.

- style_distance(A, B): the Frechet distance between the Gaussian fits of A's and B's features,
  ||mu_A - mu_B||^2 + tr(S_A + S_B - 2 (S_A^1/2 S_B S_A^1/2)^1/2); 0 for identical statistics.
- stylisation_score(pred, before, reference) = 1 - FD(pred, ref) / FD(before, ref): 1 when the
  stylised renders match the style's statistics, 0 when they are as far as the unstylised
  renders, negative when further.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.metrics.identity import FOREGROUND

LUMA = (0.299, 0.587, 0.114)


def pixel_features(images: Tensor, masks: Tensor) -> Tensor:
    """(..., 3, H, W) images in [-1, 1] and (..., 1, h, w) masks -> (P, 5) features of foreground pixels."""
    x = ((images.reshape(-1, *images.shape[-3:]).float() + 1) / 2).clamp(0, 1)
    m = masks.reshape(-1, *masks.shape[-3:]).float()
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m, size=x.shape[-2:], mode="nearest-exact")
    lum = (x * torch.tensor(LUMA, device=x.device).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    padded = F.pad(lum, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    contrast = lum - F.avg_pool2d(padded, 3, stride=1)
    feats = torch.cat([x, (gx**2 + gy**2).sqrt(), contrast], dim=1)
    keep = (m >= FOREGROUND).expand_as(lum)
    return feats.permute(0, 2, 3, 1)[keep.squeeze(1)]


def _sqrtm_psd(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FD between Gaussian fits of two (P, D) feature sets (float64 math)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    fd = (mu_a - mu_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross)
    return float(fd.clamp_min(0))


def style_distance(images_a: Tensor, masks_a: Tensor, images_b: Tensor, masks_b: Tensor) -> float:
    """Frechet distance between the pooled pixel features of two sets of renders (0 is identical)."""
    return frechet_distance(pixel_features(images_a, masks_a), pixel_features(images_b, masks_b))


def stylisation_score(
    pred: tuple[Tensor, Tensor], before: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]
) -> dict[str, float]:
    """style_fd of pred and of the unstylised renders to the reference style set, and the score
    1 - style_fd / style_fd_before (each argument is (images, masks))."""
    ref = pixel_features(*reference)
    fd = frechet_distance(pixel_features(*pred), ref)
    fd_before = frechet_distance(pixel_features(*before), ref)
    return {"style_fd": fd, "style_fd_before": fd_before, "stylisation": 1 - fd / max(fd_before, 1e-12)}
