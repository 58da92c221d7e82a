"""Identity preservation against a ground truth: geometry (depth, silhouette) and appearance apart.

Inputs are renders of I identities at V fixed cameras: images (I, V, 3, H, W) in [-1, 1], ray
depths and masks (I, V, 1, h, w). "pred" comes from the stylised generator, "truth" from the
ground-truth stylised head of the SAME identity (the lab's oracle).

Definitions (per identity and view, then averaged):
- depth_error:  mean |d_pred - d_true| over pixels where both masks >= 0.5 (world units; 0 is perfect);
- silhouette_iou: |M_pred and M_true| / |M_pred or M_true| for masks thresholded at 0.5 (1 is perfect);
- rgb_error:    mean |x_pred - x_true| / 2 over the union of the masks (colour in [0, 1]; 0 is perfect);
- id_accuracy_geometry / id_accuracy_appearance: top-1 retrieval; identity i counts as preserved when
  the ground truth closest to pred_i (depth distance, resp. colour distance, averaged over views)
  is truth_i itself (1 is perfect; a permutation of the identities scores its fixed-point rate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FOREGROUND = 0.5


def _fit(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(I, V, C, h, w) resampled (nearest) to ``size`` so depth/mask and images share a grid."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    i, v = x.shape[:2]
    return F.interpolate(x.flatten(0, 1).float(), size=size, mode="nearest-exact").reshape(i, v, x.shape[2], *size)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of x over the last three axes where m, 0 where m is empty."""
    return (x * m).sum((-3, -2, -1)) / m.sum((-3, -2, -1)).clamp_min(1)


def depth_distance(depth_a: Tensor, mask_a: Tensor, depth_b: Tensor, mask_b: Tensor) -> Tensor:
    """Mean |d_a - d_b| over pixels foreground in both (broadcast over leading axes) -> (...,)."""
    both = ((mask_a >= FOREGROUND) & (mask_b >= FOREGROUND)).float()
    return _masked_mean((depth_a - depth_b).abs(), both)


def colour_distance(image_a: Tensor, mask_a: Tensor, image_b: Tensor, mask_b: Tensor) -> Tensor:
    """Mean |x_a - x_b| / 2 over the union of the foregrounds (colour in [0, 1] units) -> (...,)."""
    union = ((mask_a >= FOREGROUND) | (mask_b >= FOREGROUND)).float()
    return _masked_mean((image_a - image_b).abs().mean(-3, keepdim=True) / 2, union)


def silhouette_iou(mask_a: Tensor, mask_b: Tensor) -> Tensor:
    a, b = mask_a >= FOREGROUND, mask_b >= FOREGROUND
    inter = (a & b).float().sum((-3, -2, -1))
    union = (a | b).float().sum((-3, -2, -1))
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _retrieval_accuracy(dist: Tensor) -> float:
    """dist (I, I): pred i vs truth j. Fraction of i whose nearest truth is i (ties count as misses)."""
    own = dist.diagonal()
    others = dist + torch.diag(torch.full_like(own, float("inf")))
    return float((own < others.min(dim=1).values).float().mean())


def identity_preservation(
    pred_image: Tensor, pred_depth: Tensor, pred_mask: Tensor, true_image: Tensor, true_depth: Tensor, true_mask: Tensor
) -> dict[str, float]:
    """The metrics of the module docstring for I identities x V views (see there for shapes)."""
    size = tuple(pred_image.shape[-2:])
    pm, tm = _fit(pred_mask, size), _fit(true_mask, size)
    pd, td = _fit(pred_depth, size), _fit(true_depth, size)
    # Pairwise (pred i, truth j) distances averaged over views, for identity retrieval.
    geo = depth_distance(pd[:, None], pm[:, None], td[None], tm[None]).mean(-1)
    app = colour_distance(pred_image[:, None].float(), pm[:, None], true_image[None].float(), tm[None]).mean(-1)
    return {
        "depth_error": float(geo.diagonal().mean()),
        "silhouette_iou": float(silhouette_iou(pm, tm).mean()),
        "rgb_error": float(app.diagonal().mean()),
        "id_accuracy_geometry": _retrieval_accuracy(geo),
        "id_accuracy_appearance": _retrieval_accuracy(app),
    }
