"""Noise strategies for distillation: fresh, fixed per identity, and MV-NRS.

- ``random_noise``: eps ~ N(0, I) from an explicit generator (the LD script's choice).
- ``identity_noise``: one fixed eps per identity id (seeded by (seed, identity)).
- MV-NRS (Portrait Diffusion, eqs. 10-16): an anchor noise per view, chained from a driving view
  v_i to the next view v_{i+1} by lifting the anchor to 3D with v_i's rendered depth and
  splatting it into v_{i+1} (``warp_noise``, eq. 11; voids get fresh N(0, I)); each iteration a
  candidate eps_rs = sqrt(1 - s^2) eps_anchor + s n is drawn (``resample_noise``, eq. 10) and kept
  only if its gradient is better aligned (cosine) with the driving view's gradient than the
  anchor's (``retain_better_aligned``, eqs. 14-15). Both gradients can come from ONE prior call:
  pass the candidate and the anchor as two DistillTargets of the same objective call.

One MV-NRS iteration over a chain of views v_0..v_{K-1} (trainer side; anchors from
``init_anchor_noise`` at the first iteration):
    for i in 1..K-1:
        cand = resample_noise(anchor[i], s, gen)
        r_cand, r_anchor = objective(prior, [target(view i, cand), target(view i, anchor[i])])
        driving = splat_to_view(applied[i - 1], depth[i - 1], cam[i - 1], cam[i])[0]   # voids 0
        kept = retain_better_aligned(driving, cand, r_cand.grad, anchor[i], r_anchor.grad)
        anchor[i], applied[i] = kept.noise, kept.grad
v_0 has no driving view and keeps its anchor. Unlike the paper, the anchor's gradient is
recomputed on the current render instead of reusing the previous iteration's target image.

Noise lives on the latent grid (e.g. 64x64 latents of a 512 px image, 32x32 per view of a 2x2 grid)
and is warped between views with headstyle.geometry.splat_to_view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.geometry import DepthKind, splat_to_view


def random_noise(
    shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """eps ~ N(0, I) in float32, drawn on the generator's device and moved to ``device``."""
    gen_device = generator.device if generator is not None else "cpu"
    eps = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return eps if device is None else eps.to(device)


def identity_noise(
    shape: tuple[int, ...], identity: int, seed: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """A fixed eps for one identity: the same (identity, seed) always gives the same noise."""
    mixed = (seed * 0x9E3779B97F4A7C15 + int(identity) * 0xBF58476D1CE4E5B9) % (2**63)
    return random_noise(shape, torch.Generator().manual_seed(mixed), device)


def resample_noise(anchor: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """MV-NRS eq. 10: eps_rs = sqrt(1 - sigma^2) eps_anchor + sigma n, n ~ N(0, I) (unit variance kept)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"resampling sigma must lie in [0, 1], got {sigma}")
    n = random_noise(tuple(anchor.shape), generator, anchor.device)
    return (1.0 - sigma**2) ** 0.5 * anchor.float() + sigma * n


def warp_noise(
    noise: Tensor,
    depth: Tensor,
    cam_src: Tensor,
    cam_dst: Tensor,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    depth_kind: DepthKind = "ray",
) -> tuple[Tensor, Tensor]:
    """MV-NRS eq. 11: the source view's noise splatted into the destination view, voids filled with
    fresh N(0, I). Returns (noise_dst, void (N, 1, h, w) bool)."""
    warped, void = splat_to_view(noise, depth, cam_src, cam_dst, mask, depth_kind)
    fresh = random_noise(tuple(noise.shape), generator, noise.device)
    return torch.where(void, fresh, warped), void


def init_anchor_noise(
    shape: tuple[int, ...],
    depths: list[Tensor],
    cams: list[Tensor],
    generator: torch.Generator | None = None,
    masks: list[Tensor] | None = None,
    depth_kind: DepthKind = "ray",
) -> list[Tensor]:
    """Anchor noise for a chain of views v_0..v_{K-1}: v_0 fresh, v_{i+1} warped from v_i (eq. 11)."""
    if len(depths) != len(cams):
        raise ValueError(f"need one depth map per camera, got {len(depths)} depths for {len(cams)} cameras")
    anchors = [random_noise(shape, generator, depths[0].device)]
    for i in range(len(cams) - 1):
        m = None if masks is None else masks[i]
        anchors.append(warp_noise(anchors[-1], depths[i], cams[i], cams[i + 1], generator, m, depth_kind)[0])
    return anchors


def cosine_alignment(grad: Tensor, reference: Tensor) -> Tensor:
    """Per-sample cosine similarity (N,) of two gradients (eq. 14); 0 where either is zero."""
    a, b = grad.float().flatten(1), reference.float().flatten(1)
    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


@dataclass
class Retention:
    """MV-NRS eq. 15 outcome per sample: the kept noise and gradient, and the decision."""

    noise: Tensor
    grad: Tensor
    keep_candidate: Tensor
    score_candidate: Tensor
    score_anchor: Tensor


def retain_better_aligned(
    driving_grad: Tensor, candidate_noise: Tensor, candidate_grad: Tensor, anchor_noise: Tensor, anchor_grad: Tensor
) -> Retention:
    """Keep the resampled candidate where cos(candidate_grad, driving) > cos(anchor_grad, driving).

    ``driving_grad`` must be comparable with the view's gradients: the driving view's latent
    gradient warped into this view (``splat_to_view``, voids 0), or parameter-space gradients
    flattened to (N, D) like the paper's back-propagated ones.
    """
    s_cand = cosine_alignment(candidate_grad, driving_grad)
    s_anchor = cosine_alignment(anchor_grad, driving_grad)
    keep = s_cand > s_anchor

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(keep.reshape(-1, *([1] * (a.dim() - 1))), a.float(), b.float())

    return Retention(
        noise=pick(candidate_noise, anchor_noise),
        grad=pick(candidate_grad, anchor_grad),
        keep_candidate=keep,
        score_candidate=s_cand,
        score_anchor=s_anchor,
    )
