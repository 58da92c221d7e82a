import torch

from headstyle import cameras
from headstyle.distill.noise import (
    identity_noise,
    init_anchor_noise,
    random_noise,
    resample_noise,
    retain_better_aligned,
    warp_noise,
)
from headstyle.geometry import pixel_rays, project, splat_to_view

CENTRE = torch.tensor([0.0, 0.0, 0.0])
RADIUS = 0.35


def _sphere_depth(c: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray distance to a sphere (a stand-in head) and the hit mask, (N, 1, h, w) each."""
    origin, dirs, _ = pixel_rays(c, h, w)
    oc = origin.unsqueeze(1) - CENTRE
    b = (dirs * oc).sum(-1)
    disc = b**2 - ((oc**2).sum(-1) - RADIUS**2)
    hit = disc > 0
    depth = torch.where(hit, -b - disc.clamp_min(0).sqrt(), torch.full_like(b, 10.0))
    return depth.reshape(-1, 1, h, w), hit.float().reshape(-1, 1, h, w)


def test_pixel_rays_look_at_the_pivot_and_project_back():
    c = cameras.cameras(torch.tensor([0.0, 0.7]), torch.tensor([0.1, -0.2]))
    origin, dirs, _ = pixel_rays(c, 9, 9)
    to_pivot = torch.tensor(cameras.PIVOT) - origin
    assert torch.allclose(dirs[:, 4 * 9 + 4], to_pivot / to_pivot.norm(dim=-1, keepdim=True), atol=1e-5)
    points = origin.unsqueeze(1) + 2.5 * dirs
    pix, z, valid = project(points, c, 9, 9)
    assert valid.all() and torch.equal(pix, torch.arange(81).expand(2, 81))
    assert (z > 0).all()


def test_warp_to_the_same_view_is_the_identity_on_the_head():
    c = cameras.cameras(0.3, 0.1)
    depth, mask = _sphere_depth(c, 16, 16)
    noise = random_noise((1, 4, 16, 16), torch.Generator().manual_seed(0))
    warped, void = splat_to_view(noise, depth, c, c, mask=mask)
    assert torch.equal(~void, mask.bool())
    assert torch.equal(warped * mask, noise * mask)


def test_warped_noise_agrees_on_overlap_of_a_known_depth_map():
    h = w = 32
    c_a, c_b = cameras.cameras(0.0, 0.0), cameras.cameras(0.35, 0.1)
    depth_a, mask_a = _sphere_depth(c_a, h, w)
    depth_b, mask_b = _sphere_depth(c_b, h, w)
    noise_a = random_noise((1, 4, h, w), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    noise_b, void = warp_noise(noise_a, depth_a, c_a, c_b, generator=g, mask=mask_a)
    # Background of B receives head points only on the silhouette's pixel rim (pixels the sphere
    # covers partially while their centre ray misses it).
    rim = torch.nn.functional.max_pool2d(mask_b, 3, stride=1, padding=1)
    assert void[rim == 0].all()
    assert (~void).sum() > 0.6 * mask_b.sum()
    # Backward check: a filled pixel of B holds the noise of the pixel of A that sees the same
    # surface point (B's own depth lifted and projected into A), unless A does not see it.
    origin_b, dirs_b, _ = pixel_rays(c_b, h, w)
    points_b = origin_b.unsqueeze(1) + depth_b.reshape(1, -1, 1) * dirs_b
    pix_a, z_a, valid = project(points_b, c_a, h, w)
    seen_by_a = valid[0] & (z_a[0] <= depth_a.reshape(-1)[pix_a[0]] * 1.0 + 0.05)
    filled = (~void).reshape(-1) & seen_by_a
    expected = noise_a.reshape(4, -1)[:, pix_a[0]]
    agree = (noise_b.reshape(4, -1) == expected).all(0)[filled]
    assert agree.float().mean() > 0.85
    # The rest differ by the nearest-pixel rounding only: their value comes from a neighbour of
    # the back-projected pixel.
    row, col = pix_a[0] // w, pix_a[0] % w
    near = torch.zeros_like(agree)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            idx = (row + dr).clamp(0, h - 1) * w + (col + dc).clamp(0, w - 1)
            near |= (noise_b.reshape(4, -1) == noise_a.reshape(4, -1)[:, idx]).all(0)[filled]
    assert near.all()
    # Every filled value is a distinct entry of A's noise (so the warped map stays N(0, I)).
    vals = noise_b[0, 0].reshape(-1)[(~void).reshape(-1)]
    assert torch.isin(vals, noise_a[0, 0].reshape(-1)).all()
    assert vals.unique().numel() == vals.numel()
    assert not torch.isin(noise_b[0, 0][void[0, 0]], noise_a).any()
    # Planar (z) depth of the same surface warps identically to ray-distance depth.
    z_per_len = pixel_rays(c_a, h, w)[2].reshape(1, 1, h, w)
    warped_z, void_z = splat_to_view(noise_a, depth_a * z_per_len, c_a, c_b, mask=mask_a, depth_kind="z")
    # (equal up to points that float rounding moves across a pixel border)
    same = (void_z == void).squeeze(1) & (warped_z == torch.where(void, 0.0, noise_b)).all(1)
    assert same.float().mean() > 0.99


def test_anchor_chain_and_resampling_keep_unit_variance():
    h = w = 32
    cams = [cameras.cameras(y, 0.0) for y in (0.0, 0.3, 0.6)]
    depths, masks = zip(*(_sphere_depth(c, h, w) for c in cams), strict=True)
    g = torch.Generator().manual_seed(3)
    anchors = init_anchor_noise((16, 4, h, w), list(depths), cams, generator=g, masks=list(masks))
    assert len(anchors) == 3
    n = anchors[0].numel()
    tol_mean, tol_var = 5 / n**0.5, 5 * (2 / n) ** 0.5  # five standard errors
    for a in anchors:
        assert abs(a.mean().item()) < tol_mean and abs(a.var().item() - 1.0) < tol_var
    rs = resample_noise(anchors[2], 0.3, generator=g)
    assert abs(rs.var().item() - 1.0) < tol_var
    corr = (rs * anchors[2]).mean() / (rs.std() * anchors[2].std())
    assert abs(corr.item() - (1 - 0.09) ** 0.5) < tol_mean
    assert torch.equal(resample_noise(anchors[0], 0.0), anchors[0])


def test_identity_noise_is_fixed_per_identity():
    a = identity_noise((1, 4, 8, 8), identity=7, seed=1)
    assert torch.equal(a, identity_noise((1, 4, 8, 8), identity=7, seed=1))
    assert not torch.equal(a, identity_noise((1, 4, 8, 8), identity=8, seed=1))
    assert not torch.equal(a, identity_noise((1, 4, 8, 8), identity=7, seed=2))


def test_retention_keeps_the_better_aligned_candidate_per_sample():
    g = torch.Generator().manual_seed(4)
    driving = torch.randn(2, 4, 8, 8, generator=g)
    close = driving + 0.1 * torch.randn(2, 4, 8, 8, generator=g)
    far = torch.randn(2, 4, 8, 8, generator=g)
    cand_grad = torch.stack([close[0], far[1]])
    anchor_grad = torch.stack([far[0], close[1]])
    cand_noise, anchor_noise = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    r = retain_better_aligned(driving, cand_noise, cand_grad, anchor_noise, anchor_grad)
    assert r.keep_candidate.tolist() == [True, False]
    assert torch.equal(r.noise[0], cand_noise[0]) and torch.equal(r.noise[1], anchor_noise[1])
    assert torch.equal(r.grad[0], close[0]) and torch.equal(r.grad[1], close[1])
    assert (r.score_candidate[0] > 0.9) and (r.score_anchor[1] > 0.9)
    # Parameter-space gradients (N, D) work the same way.
    flat = retain_better_aligned(
        driving.flatten(1), cand_noise, cand_grad.flatten(1), anchor_noise, anchor_grad.flatten(1)
    )
    assert flat.keep_candidate.tolist() == [True, False] and flat.grad.shape == (2, 256)
