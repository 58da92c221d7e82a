"""PanoHead's volume renderer: rays, tri-grid sampling, importance sampling and the ray marcher.

A weight-free re-implementation of EG3D's RaySampler / ImportanceRenderer / MipRayMarcher2 as
PanoHead (commit 17ad915) uses them, numerically faithful to the original on CPU in float32:

    rays (ray_sampler) -> stratified depths -> tri-grid features (sample_from_trigrid) -> decoder
      -> crop -> ray_march (coarse) -> importance depths (sample_pdf) -> decoder -> crop
      -> merge + sort coarse/fine samples -> ray_march (final)

The renderer is stochastic even in eval mode: it draws a stratified jitter and the importance
sampling uniforms, in that order. ``RenderDraws`` lets a caller inject both; otherwise they come
from ``generator`` or the global torch RNG, so ``torch.manual_seed(s)`` reproduces the original.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Decoder = Callable[[Tensor, Tensor], Mapping[str, Tensor]]

# EG3D's plane_axes are permutation matrices, so `coords @ inv(axes)` is an exact reordering of
# (x, y, z). Per plane: the coordinate components that become the grid's (x, y, z), i.e. the
# sampling positions along the tri-grid's (W, H, D) axes.
TRIGRID_AXES = ((0, 1, 2), (0, 2, 1), (1, 2, 0))


@dataclass
class RenderDraws:
    """The renderer's two random draws, both U[0, 1).

    stratified_jitter: (N, M, D, 1) offsets of the coarse samples, in units of one depth bin.
    importance_u:      (N * M, D_importance) inverse-CDF uniforms of the fine samples.
    """

    stratified_jitter: Tensor
    importance_u: Tensor


def ray_sampler(cam2world: Tensor, intrinsics: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Camera rays through pixel centres (EG3D's RaySampler, OpenCV camera axes).

    cam2world (N, 4, 4), normalised intrinsics (N, 3, 3) -> origins (N, M, 3), unit directions
    (N, M, 3), M = resolution**2 in row-major pixel order (ray m = row * resolution + column).
    Pixel centres u, v lie in [0, 1] and are lifted as ((u - cx) / fx, (v - cy) / fy, 1)
    (plus the skew term of the original).
    """
    if cam2world.ndim != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"cam2world must be (N, 4, 4), got {tuple(cam2world.shape)}")
    if intrinsics.shape != (cam2world.shape[0], 3, 3):
        raise ValueError(f"intrinsics must be (N, 3, 3) with N = {cam2world.shape[0]}, got {tuple(intrinsics.shape)}")
    n, device = cam2world.shape[0], cam2world.device
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, sk = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]

    pixel = torch.arange(resolution, dtype=torch.float32, device=device) * (1.0 / resolution) + (0.5 / resolution)
    y_cam = pixel[:, None].expand(resolution, resolution).reshape(1, -1)
    x_cam = pixel[None, :].expand(resolution, resolution).reshape(1, -1)
    z_cam = torch.ones_like(x_cam)
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx * z_cam
    y_lift = (y_cam - cy) / fy * z_cam
    cam_points = torch.stack((x_lift, y_lift, z_cam.expand_as(x_lift), torch.ones_like(x_lift)), dim=1)

    origins = cam2world[:, :3, 3]
    # Homogeneous point minus camera centre (not R @ p) keeps the original's rounding.
    world_points = torch.bmm(cam2world, cam_points)[:, :3].transpose(1, 2)
    directions = F.normalize(world_points - origins[:, None, :], dim=2)
    return origins[:, None, :].expand(n, resolution * resolution, 3).contiguous(), directions


def sample_from_trigrid(planes: Tensor, coordinates: Tensor, box_warp: float) -> Tensor:
    """Features of PanoHead's 3-deep tri-grid at world points, one row per plane.

    planes (N, 3, C, D, H, W): the backbone's 288 channels viewed as (N, 3, 96, H, W), then each
    plane as (C = 32, D = 3) so channel = c * D + d. coordinates (N, M, 3) in world units; the
    cube [-box_warp/2, box_warp/2]^3 maps onto the grid. Trilinear, zero padding,
    align_corners=False. Returns (N, 3, M, C).
    """
    if planes.ndim != 6 or planes.shape[1] != len(TRIGRID_AXES):
        raise ValueError(f"planes must be (N, 3, C, D, H, W), got {tuple(planes.shape)}")
    if coordinates.ndim != 3 or coordinates.shape[-1] != 3 or coordinates.shape[0] != planes.shape[0]:
        raise ValueError(f"coordinates must be (N, M, 3) with N = {planes.shape[0]}, got {tuple(coordinates.shape)}")
    n, n_planes, c, d, h, w = planes.shape
    m = coordinates.shape[1]
    coordinates = (2 / box_warp) * coordinates
    grid = torch.stack([coordinates[..., list(axes)] for axes in TRIGRID_AXES], dim=1)
    features = F.grid_sample(
        planes.reshape(n * n_planes, c, d, h, w),
        grid.reshape(n * n_planes, 1, 1, m, 3).to(planes.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    return features.reshape(n, n_planes, c, m).transpose(2, 3)


def query_trigrid(
    planes: Tensor, decoder: Decoder, coordinates: Tensor, directions: Tensor, box_warp: float
) -> Mapping[str, Tensor]:
    """Decoder output {"sigma": (N, M, 1), "rgb": (N, M, C)} at world points (EG3D's run_model)."""
    return decoder(sample_from_trigrid(planes, coordinates, box_warp), directions)


def crop_mask(coordinates: Tensor, triplane_crop: float, box_warp: float) -> Tensor:
    """True where PanoHead zeroes the density: |x| or |z| beyond box_warp/2 - triplane_crop.

    coordinates (N, M, 3) -> (N, M, 1) bool. y is unbounded (the original's "allow_bottom" term
    is a subset of the kept region, so it changes nothing).
    """
    limit = box_warp / 2 - triplane_crop
    return ~(coordinates[..., [0, 2]].abs() <= limit).all(dim=-1, keepdim=True)


def sample_stratified(jitter: Tensor, ray_start: float, ray_end: float) -> Tensor:
    """Coarse depths linspace(ray_start, ray_end, D) + jitter * (ray_end - ray_start) / (D - 1).

    jitter (N, M, D, 1) in [0, 1) -> depths (N, M, D, 1).
    """
    if jitter.ndim != 4 or jitter.shape[-1] != 1:
        raise ValueError(f"stratified_jitter must be (N, M, D, 1), got {tuple(jitter.shape)}")
    n, m, depth_resolution, _ = jitter.shape
    depths = torch.linspace(ray_start, ray_end, depth_resolution, device=jitter.device, dtype=jitter.dtype)
    depth_delta = (ray_end - ray_start) / (depth_resolution - 1)
    return depths.reshape(1, 1, -1, 1).repeat(n, m, 1, 1) + jitter * depth_delta


def sample_pdf(bins: Tensor, weights: Tensor, u: Tensor, eps: float = 1e-5) -> Tensor:
    """Inverse-CDF samples of the piecewise-constant pdf ``weights`` over ``bins`` (NeRF, eq. 5).

    bins (R, B) bin edges, weights (R, B') with B' <= B - 1 (only the first B' + 1 edges are
    used, as in the original), u (R, K) uniforms -> (R, K) depths.
    """
    num_bins = weights.shape[1]
    weights = weights + eps
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    u = u.contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, num_bins)
    inds_sampled = torch.stack([below, above], -1).view(u.shape[0], -1)
    cdf_g = torch.gather(cdf, 1, inds_sampled).view(*u.shape, 2)
    bins_g = torch.gather(bins, 1, inds_sampled).view(*u.shape, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    # An empty bin is never sampled, so any non-zero denominator works there.
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


@torch.no_grad()
def sample_importance(depths: Tensor, weights: Tensor, u: Tensor) -> Tensor:
    """Fine depths (N, M, K, 1) from the coarse depths (N, M, D, 1) and marcher weights (N, M, D-1, 1).

    The weights are smoothed as in the original: max_pool1d(2, 1, pad 1), avg_pool1d(2, 1), + 0.01;
    the pdf lives on the midpoints of the coarse depths. u: (N * M, K) uniforms.
    """
    n, m, d, _ = depths.shape
    depths = depths.reshape(n * m, d)
    weights = weights.reshape(n * m, 1, -1).float()
    weights = F.avg_pool1d(F.max_pool1d(weights, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01
    depths_mid = 0.5 * (depths[:, :-1] + depths[:, 1:])
    return sample_pdf(depths_mid, weights[:, 1:-1], u).reshape(n, m, u.shape[1], 1)


def ray_march(
    colors: Tensor, densities: Tensor, depths: Tensor, rendering_kwargs: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """Alpha-composite samples sorted by depth along each ray (EG3D's MipRayMarcher2).

    colors (N, M, S, C), raw densities (N, M, S, 1), depths (N, M, S, 1). Adjacent samples are
    averaged (S - 1 intervals); sigma = softplus(density - 1), alpha = 1 - exp(-sigma * delta),
    w_i = alpha_i * prod_{j<i} (1 - alpha_j + 1e-10). Returns composited colors (N, M, C),
    depth (N, M, 1) = sum w z / sum w clamped to [min, max] of ``depths`` over the WHOLE batch
    (as the original does), and weights (N, M, S - 1, 1).
    """
    if rendering_kwargs.get("clamp_mode", "softplus") != "softplus":
        raise ValueError(f"clamp_mode {rendering_kwargs['clamp_mode']!r} is not supported: PanoHead uses 'softplus'")
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2

    alpha = 1 - torch.exp(-F.softplus(densities_mid - 1) * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2), -2)
    weights = alpha * transmittance[:, :, :-1]

    composite_rgb = torch.sum(weights * colors_mid, -2)
    composite_depth = torch.sum(weights * depths_mid, -2) / weights.sum(2)
    # Rays with no weight give 0/0: send them to the far end of the range.
    composite_depth = torch.nan_to_num(composite_depth, float("inf"))
    composite_depth = torch.clamp(composite_depth, torch.min(depths), torch.max(depths))
    return composite_rgb, composite_depth, weights


def _sort_samples(depths: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Sort samples along dim -2 by depth, carrying ``values`` (each (N, M, S, C)) along."""
    _, indices = torch.sort(depths, dim=-2)
    gathered = [torch.gather(depths, -2, indices)]
    gathered += [torch.gather(v, -2, indices.expand(-1, -1, -1, v.shape[-1])) for v in values]
    return tuple(gathered)


class ImportanceRenderer(nn.Module):
    """Two-pass (coarse + importance) volume renderer of a tri-grid; it holds no parameters.

    forward(planes (I, 3, C, D, H, W), decoder, ray_origins (N, M, 3), ray_directions (N, M, 3),
    rendering_kwargs) -> features (N, M, C), depth (N, M, 1), weights_sum (N, M, 1).
    N = K * I: rows k*K .. (k+1)*K - 1 of the rays are K cameras of tri-grid k (identity-major). Their
    points are folded into one grid_sample per tri-grid, so K cameras read one tri-grid without copies
    and its gradient is accumulated in place.

    decoder(sampled_features (N, 3, P, C), directions (N, P, 3)) -> {"sigma": (N, P, 1),
    "rgb": (N, P, C_out)} with P = M * samples per ray. rendering_kwargs keys used:
    ray_start, ray_end, depth_resolution, depth_resolution_importance, box_warp, clamp_mode.
    """

    def forward(
        self,
        planes: Tensor,
        decoder: Decoder,
        ray_origins: Tensor,
        ray_directions: Tensor,
        rendering_kwargs: Mapping[str, Any],
        draws: RenderDraws | None = None,
        generator: torch.Generator | None = None,
        triplane_crop: float = 0.1,
        record: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Render; ``draws`` injects the random tensors, ``record`` (a dict) receives detached
        depths_coarse, depths_fine, sigma_coarse_precrop, sigma_fine_precrop (sigma as (N, M*S, 1)).
        triplane_crop 0 disables the crop."""
        ray_start, ray_end = rendering_kwargs["ray_start"], rendering_kwargs["ray_end"]
        if isinstance(ray_start, str) or isinstance(ray_end, str):
            raise ValueError("ray_start/ray_end 'auto' is not supported: pass numbers (PanoHead uses 2.25, 3.3)")
        if rendering_kwargs.get("disparity_space_sampling", False):
            raise ValueError("disparity_space_sampling is not supported: set it to False as PanoHead does")
        if ray_origins.shape != ray_directions.shape or ray_origins.ndim != 3:
            raise ValueError(
                f"ray_origins and ray_directions must both be (N, M, 3), got {tuple(ray_origins.shape)} "
                f"and {tuple(ray_directions.shape)}"
            )
        n, m, _ = ray_origins.shape
        if n % planes.shape[0]:
            raise ValueError(f"{n} cameras for {planes.shape[0]} tri-grids: pass as many cameras for each tri-grid")
        depth_resolution = rendering_kwargs["depth_resolution"]
        n_importance = rendering_kwargs.get("depth_resolution_importance", 0)
        box_warp = rendering_kwargs["box_warp"]
        record = {} if record is None else record

        if draws is None:
            jitter = torch.rand(
                (n, m, depth_resolution, 1), generator=generator, dtype=ray_origins.dtype, device=ray_origins.device
            )
        else:
            jitter = draws.stratified_jitter.to(ray_origins)
        if jitter.shape != (n, m, depth_resolution, 1):
            raise ValueError(
                f"stratified_jitter must be (N, M, depth_resolution, 1) = ({n}, {m}, {depth_resolution}, 1), "
                f"got {tuple(jitter.shape)}"
            )
        depths_coarse = sample_stratified(jitter, ray_start, ray_end)
        colors_coarse, densities_coarse = self._pass(
            planes, decoder, ray_origins, ray_directions, depths_coarse, box_warp, triplane_crop, record, "coarse"
        )
        rgb, depth, weights = ray_march(colors_coarse, densities_coarse, depths_coarse, rendering_kwargs)
        if n_importance <= 0:
            return rgb, depth, weights.sum(2)

        if draws is None:
            u = torch.rand((n * m, n_importance), generator=generator, dtype=torch.float32, device=ray_origins.device)
        else:
            u = draws.importance_u.to(device=ray_origins.device, dtype=torch.float32)
        if u.shape != (n * m, n_importance):
            raise ValueError(
                f"importance_u must be (N * M, D_importance) = ({n * m}, {n_importance}), got {tuple(u.shape)}"
            )
        depths_fine = sample_importance(depths_coarse, weights, u)
        colors_fine, densities_fine = self._pass(
            planes, decoder, ray_origins, ray_directions, depths_fine, box_warp, triplane_crop, record, "fine"
        )
        all_depths, all_colors, all_densities = _sort_samples(
            torch.cat([depths_coarse, depths_fine], -2),
            torch.cat([colors_coarse, colors_fine], -2),
            torch.cat([densities_coarse, densities_fine], -2),
        )
        rgb, depth, weights = ray_march(all_colors, all_densities, all_depths, rendering_kwargs)
        return rgb, depth, weights.sum(2)

    @staticmethod
    def _pass(
        planes: Tensor,
        decoder: Decoder,
        ray_origins: Tensor,
        ray_directions: Tensor,
        depths: Tensor,
        box_warp: float,
        triplane_crop: float,
        record: dict[str, Tensor],
        name: str,
    ) -> tuple[Tensor, Tensor]:
        """Decode the samples at ``depths`` (N, M, S, 1): colors (N, M, S, C), cropped densities (N, M, S, 1)."""
        n, m, s, _ = depths.shape
        i = planes.shape[0]
        coordinates = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(n, -1, 3)
        directions = ray_directions.unsqueeze(-2).expand(-1, -1, s, -1).reshape(i, -1, 3)
        out = query_trigrid(planes, decoder, coordinates.reshape(i, -1, 3), directions, box_warp)
        sigma = out["sigma"].reshape(n, m * s, 1)
        record[f"depths_{name}"] = depths.detach()
        record[f"sigma_{name}_precrop"] = sigma.detach()
        if triplane_crop:
            sigma = torch.where(crop_mask(coordinates, triplane_crop, box_warp), torch.full_like(sigma, -1e3), sigma)
        return out["rgb"].reshape(n, m, s, -1), sigma.reshape(n, m, s, 1)
