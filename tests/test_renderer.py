"""PanoHead volume renderer: parity with the original's recorded rays/depths/renders, and invariants."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from headstyle.cameras import intrinsics_from_fov, look_at_pose
from headstyle.generator.renderer import (
    ImportanceRenderer,
    RenderDraws,
    crop_mask,
    ray_march,
    ray_sampler,
    sample_from_trigrid,
    sample_pdf,
    sample_stratified,
)
from headstyle.generator.triplane import OSGDecoder

# run -> (camera label in io.safetensors, torch seed of its synthesis call)
RUNS = {
    "case0": ("case0.c", 1000),
    "case1": ("case1.c", 1001),
    "case2": ("case2.c", 1002),
    "case0_mirror": ("case0_mirror.c", 1010),
    "case1_mirror": ("case1_mirror.c", 1011),
    "case0_forward": ("case0.c_with_delta", 1020),
}
# These runs render case0's ws, so their tri-grid is case0's (the only one stored in full).
CASE0_PLANES_RUNS = ("case0", "case0_mirror", "case0_forward")


@pytest.fixture(scope="module")
def io(parity_dir):
    return load_file(parity_dir / "io.safetensors")


@pytest.fixture(scope="module")
def rendering_kwargs(parity_dir):
    return json.loads((parity_dir / "config.json").read_text())["reduced"]["G_kwargs"]["rendering_kwargs"]


@pytest.fixture(scope="module")
def decoder(parity_dir):
    """The generator's OSGDecoder holding the fixture's decoder.* weights."""
    params = load_file(parity_dir / "params.safetensors")
    osg = OSGDecoder()
    osg.load_state_dict({k.removeprefix("decoder."): v for k, v in params.items() if k.startswith("decoder.")})
    return osg.eval()


def rays_of(io, run, resolution=32):
    c = io[RUNS[run][0]]
    return ray_sampler(c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3), resolution)


def _voxel_centre(index, size):
    """Normalised grid coordinate of a voxel centre (grid_sample, align_corners=False)."""
    return (2 * index + 1) / size - 1


def case0_trigrid(io):
    return io["case0.planes"].view(1, 3, 32, 3, 32, 32)


def draws_of(io, run):
    return RenderDraws(io[f"{run}.rand.stratified_jitter"], io[f"{run}.rand.importance_u"])


@pytest.mark.parametrize("run", list(RUNS))
def test_rays_and_coarse_depths_match_fixture(io, rendering_kwargs, run):
    origins, directions = rays_of(io, run)
    torch.testing.assert_close(origins, io[f"{run}.ray_origins"], atol=1e-6, rtol=0)
    torch.testing.assert_close(directions, io[f"{run}.ray_directions"], atol=1e-6, rtol=0)
    depths = sample_stratified(
        io[f"{run}.rand.stratified_jitter"], rendering_kwargs["ray_start"], rendering_kwargs["ray_end"]
    )
    torch.testing.assert_close(depths, io[f"{run}.depths_coarse"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("run", CASE0_PLANES_RUNS)
def test_renderer_matches_fixture_with_injected_draws(io, rendering_kwargs, decoder, run):
    origins, directions = rays_of(io, run)
    record = {}
    rgb, depth, weights_sum = ImportanceRenderer()(
        case0_trigrid(io), decoder, origins, directions, rendering_kwargs, draws=draws_of(io, run), record=record
    )
    torch.testing.assert_close(record["depths_coarse"], io[f"{run}.depths_coarse"], atol=1e-6, rtol=0)
    torch.testing.assert_close(record["depths_fine"], io[f"{run}.depths_fine"], atol=1e-5, rtol=0)
    if run == "case0":
        torch.testing.assert_close(record["sigma_coarse_precrop"], io["case0.sigma_coarse_precrop"], atol=5e-4, rtol=0)
        torch.testing.assert_close(record["sigma_fine_precrop"], io["case0.sigma_fine_precrop"], atol=5e-4, rtol=0)
    torch.testing.assert_close(rgb, io[f"{run}.renderer.rgb_final"], atol=1e-4, rtol=0)
    torch.testing.assert_close(depth, io[f"{run}.renderer.depth_final"], atol=1e-4, rtol=0)
    torch.testing.assert_close(weights_sum, io[f"{run}.renderer.weights_sum"], atol=1e-4, rtol=0)
    # The fixture's opacity covers roughly 0 to 0.92: the comparison is not between empty renders.
    assert weights_sum.max() > 0.5 > weights_sum.min()


def test_seeded_draws_follow_the_original_rng_order(io, rendering_kwargs, decoder):
    """torch.manual_seed(1000) reproduces case0's recorded draws; a torch.Generator gives the same stream."""
    origins, directions = rays_of(io, "case0")
    planes = case0_trigrid(io)
    injected = ImportanceRenderer()(planes, decoder, origins, directions, rendering_kwargs, draws=draws_of(io, "case0"))

    torch.manual_seed(1000)
    seeded = ImportanceRenderer()(planes, decoder, origins, directions, rendering_kwargs)
    state_after = torch.get_rng_state()
    torch.manual_seed(1000)
    torch.rand(io["case0.rand.stratified_jitter"].shape)
    torch.rand(io["case0.rand.importance_u"].shape)
    assert torch.equal(state_after, torch.get_rng_state()), "the renderer must draw exactly the two tensors"

    own = ImportanceRenderer()(
        planes, decoder, origins, directions, rendering_kwargs, generator=torch.Generator().manual_seed(1000)
    )
    for a, b, c in zip(injected, seeded, own, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_renderer_has_no_state():
    assert ImportanceRenderer().state_dict() == {}


def test_trigrid_axes_and_channel_layout():
    """A voxel centre of plane p returns exactly that voxel's C features, for every plane and axis."""
    n_planes, c, d, h, w = 3, 5, 3, 4, 6
    planes = torch.randn(1, n_planes, c, d, h, w)
    # World point (box_warp 2 makes world = normalised coordinates); plane p reads (x,y,z) as:
    # p0 (W=x, H=y, D=z), p1 (W=x, H=z, D=y), p2 (W=y, H=z, D=x).
    wi, hi, di = 4, 1, 2
    gx, gy, gz = _voxel_centre(wi, w), _voxel_centre(hi, h), _voxel_centre(di, d)
    points = torch.tensor([[[gx, gy, gz], [gx, gz, gy], [gz, gx, gy]]])
    features = sample_from_trigrid(planes, points, box_warp=2.0)
    assert features.shape == (1, 3, 3, c)
    for p in range(n_planes):
        torch.testing.assert_close(features[0, p, p], planes[0, p, :, di, hi, wi], atol=1e-6, rtol=0)
    # The backbone's 288 channels: channel k of plane p is feature k // 3 at depth k % 3.
    raw = torch.arange(288.0).view(1, 288, 1, 1).expand(1, 288, 2, 2)
    trigrid = raw.reshape(1, 3, 32, 3, 2, 2)
    assert trigrid[0, 1, 7, 2, 0, 0] == 96 + 7 * 3 + 2


def test_crop_mask_limits_x_and_z_only():
    points = torch.tensor([[[0.39, 5.0, -0.39], [0.41, 0.0, 0.0], [0.0, -3.0, -0.41], [0.0, 0.0, 0.0]]])
    assert crop_mask(points, 0.1, 1.0).squeeze(-1).tolist() == [[False, True, True, False]]


def test_sample_pdf_inverts_a_uniform_cdf():
    bins = torch.tensor([[0.0, 1.0, 2.0, 3.0, 99.0]])  # the last edge is unused, as in PanoHead
    u = torch.tensor([[0.0, 0.1, 0.5, 0.9, 0.999]])
    samples = sample_pdf(bins, torch.ones(1, 3), u)
    torch.testing.assert_close(samples, 3 * u, atol=1e-5, rtol=0)
    # All mass in the middle bin: every sample lands in [1, 2].
    samples = sample_pdf(
        bins, torch.tensor([[0.0, 1.0, 0.0]]), torch.rand(1, 100, generator=torch.Generator().manual_seed(0))
    )
    assert samples.min() >= 1.0 - 1e-4 and samples.max() <= 2.0 + 1e-4


def test_ray_march_opaque_slab_closed_form():
    """Empty space, then an opaque slab from sample k on: all weight on the interval (k-1, k)."""
    depths = torch.linspace(2.0, 3.0, 11).view(1, 1, 11, 1).repeat(2, 3, 1, 1)
    k = 6
    densities = torch.full_like(depths, -1e3)
    densities[:, :, k:] = 1e4
    colors = torch.arange(11.0).view(1, 1, 11, 1).expand(2, 3, 11, 4)
    rgb, depth, weights = ray_march(colors, densities, depths, {"clamp_mode": "softplus"})
    expected = torch.zeros(2, 3, 10, 1)
    expected[:, :, k - 1] = 1.0
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(depth, torch.full((2, 3, 1), (2.5 + 2.6) / 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb, torch.full((2, 3, 4), (k - 1 + k) / 2), atol=1e-5, rtol=0)


def test_ray_march_matches_volume_rendering_sum():
    """Constant density s: weights are alpha (1 - alpha + 1e-10)^i with alpha = 1 - exp(-softplus(s - 1) delta)."""
    depths = torch.linspace(0.0, 1.0, 21).view(1, 1, 21, 1)
    densities = torch.full_like(depths, 3.0)
    _, _, weights = ray_march(torch.zeros(1, 1, 21, 2), densities, depths, {"clamp_mode": "softplus"})
    alpha = 1 - math.exp(-math.log1p(math.exp(2.0)) * 0.05)
    expected = torch.tensor([alpha * (1 - alpha + 1e-10) ** i for i in range(20)]).view(1, 1, 20, 1)
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


def test_empty_field_has_no_weight_and_depth_clamps_across_the_batch(rendering_kwargs):
    origins, directions = ray_sampler(
        look_at_pose(torch.tensor([0.0, 1.0]), 0.2), intrinsics_from_fov().expand(2, 3, 3), 8
    )

    def empty(sampled_features, _directions):
        n, _, m, _ = sampled_features.shape
        return {"sigma": torch.full((n, m, 1), -1e3), "rgb": torch.ones(n, m, 4)}

    record = {}
    planes = torch.zeros(2, 3, 4, 3, 8, 8)
    rgb, depth, weights_sum = ImportanceRenderer()(
        planes, empty, origins, directions, rendering_kwargs, generator=torch.Generator().manual_seed(0), record=record
    )
    assert weights_sum.abs().max() < 1e-6 and rgb.abs().max() < 1e-6
    # No weight gives 0/0, sent to the largest sample depth of the WHOLE batch (the original's clamp).
    batch_max = torch.cat([record["depths_coarse"], record["depths_fine"]], -2).max()
    assert torch.equal(depth, torch.full_like(depth, batch_max.item()))


def test_renderer_finds_a_plane_surface(rendering_kwargs):
    """A tri-grid encoding f(x, y, z) = z with density where f < z0 renders the depth of the plane z = z0."""
    z0, resolution = 0.1, 8
    d_, h_ = 3, 32
    # World z of the voxel centres along D and along H (box_warp 1: world = normalised / 2).
    along_d = torch.tensor([_voxel_centre(i, d_) for i in range(d_)]) / 2
    along_h = torch.tensor([_voxel_centre(i, h_) for i in range(h_)]) / 2
    planes = torch.zeros(1, 3, 1, d_, h_, h_)
    planes[0, 0, 0] = along_d.view(d_, 1, 1)  # plane 0 reads z along D
    planes[0, 1:, 0] = along_h.view(1, h_, 1)  # planes 1 and 2 read z along H

    def slab(sampled_features, _directions):
        f = sampled_features.mean(1)
        return {"sigma": torch.where(f < z0, 1e3, -1e3), "rgb": f}

    kwargs = {**rendering_kwargs, "depth_resolution": 48, "depth_resolution_importance": 48}
    cam2world = look_at_pose(0.0, 0.0, lookat=(0.0, 0.0, 0.0))
    origins, directions = ray_sampler(cam2world, intrinsics_from_fov().expand(1, 3, 3), resolution)
    rgb, depth, weights_sum = ImportanceRenderer()(
        planes, slab, origins, directions, kwargs, generator=torch.Generator().manual_seed(0)
    )
    t_plane = (z0 - origins[..., 2:]) / directions[..., 2:]
    hit = (origins + t_plane * directions)[..., [0, 2]].abs().amax(-1, keepdim=True) < 0.35
    assert hit.sum() > resolution**2 // 2
    spacing = (kwargs["ray_end"] - kwargs["ray_start"]) / (kwargs["depth_resolution"] - 1)
    assert (depth - t_plane)[hit].abs().max() < spacing / 2
    assert (weights_sum[hit] > 0.999).all()
    torch.testing.assert_close(rgb[hit], torch.full_like(rgb[hit], z0), atol=spacing, rtol=0)


def test_ray_march_and_trigrid_sampling_gradients():
    """Analytic gradients (what fine-tuning the generator backpropagates) match finite differences."""
    g = torch.Generator().manual_seed(0)
    depths = torch.sort(torch.rand(1, 2, 6, 1, generator=g, dtype=torch.float64), dim=-2).values
    colors = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    densities = torch.randn(1, 2, 6, 1, generator=g, dtype=torch.float64, requires_grad=True)
    kwargs = {"clamp_mode": "softplus"}
    assert torch.autograd.gradcheck(lambda c, s: ray_march(c, s, depths, kwargs), (colors, densities))
    planes = torch.randn(1, 3, 2, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(1, 5, 3, generator=g, dtype=torch.float64) - 0.5) * 0.9
    assert torch.autograd.gradcheck(lambda p: sample_from_trigrid(p, points, box_warp=1.0), (planes,))
