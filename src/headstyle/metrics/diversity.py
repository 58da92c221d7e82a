"""Diversity / collapse: do different identities stay different after stylisation?

For a set of I identities rendered at V fixed cameras (images (I, V, 3, H, W) in [-1, 1]), the
mean pairwise distance is
    D(X) = 2 / (I (I - 1)) sum_{i < j} mean_v mean_pixels |x_iv - x_jv| / 2      (colour in [0, 1]),
and likewise with depth maps (masked background at the far plane, as rendered). The diversity
ratio is D(after) / D(before): 1.0 = the identities are as different as before (no collapse),
0 = every identity renders the same head (mode collapse).
"""

from __future__ import annotations

from torch import Tensor


def mean_pairwise_distance(x: Tensor) -> float:
    """D(X) for (I, V, C, H, W) renders (images in [-1, 1] are halved to colour units by the caller's choice)."""
    i = x.shape[0]
    if i < 2:
        raise ValueError(f"diversity needs at least 2 identities, got {i}")
    flat = x.float().reshape(i, -1)
    dist = (flat[:, None] - flat[None]).abs().mean(-1)
    return float(dist.sum() / (i * (i - 1)))


def diversity_ratio(before: Tensor, after: Tensor) -> float:
    """D(after) / D(before) for renders of the same identities at the same cameras."""
    return mean_pairwise_distance(after) / max(mean_pairwise_distance(before), 1e-12)


def diversity(
    before_images: Tensor, after_images: Tensor, before_depth: Tensor, after_depth: Tensor
) -> dict[str, float]:
    """Colour and geometry diversity ratios (see the module docstring)."""
    return {
        "diversity_rgb": diversity_ratio(before_images / 2, after_images / 2),
        "diversity_depth": diversity_ratio(before_depth, after_depth),
    }
