import numpy as np
import pytest
import torch

from headstyle.distill.shaping import (
    flip_w,
    mirror_gradients,
    postprocess,
    rank_reweight,
    resize_mask,
    tile_2x2,
    untile_2x2,
)


def _score(n=3, c=4, h=8, w=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]).reshape(1, c, 1, 1) + 0.3


def test_rank_reweight_all_ones_without_restandardisation_is_identity():
    x = _score()
    out = rank_reweight(x, weights=(1.0, 1.0, 1.0, 1.0), restandardize=False)
    assert torch.allclose(out, x, atol=1e-5, rtol=1e-5)


def test_rank_reweight_single_weight_gives_rank_one_per_sample():
    x = _score()
    out = rank_reweight(x, weights=(1.0, 0.0, 0.0, 0.0), restandardize=False)
    s = torch.linalg.svdvals(out.reshape(3, 4, -1).double())
    assert (s[:, 1:] / s[:, :1]).max() < 1e-6
    assert (s[:, 0] > 1.0).all()


def test_rank_reweight_matches_numpy_svd_and_restores_channel_stats():
    x = _score()
    w = (1.0, 0.75, 0.5, 0.25)
    plain = rank_reweight(x, weights=w, restandardize=False)
    for b in range(x.shape[0]):
        u, s, vt = np.linalg.svd(x[b].reshape(4, -1).double().numpy(), full_matrices=False)
        ref = (u * (s * np.array(w))) @ vt
        assert np.allclose(plain[b].reshape(4, -1).numpy(), ref, atol=1e-5)
    # A shorter W keeps only the top components.
    top2 = rank_reweight(x, weights=(1.0, 0.5), restandardize=False)
    assert torch.linalg.matrix_rank(top2[0].reshape(4, -1), rtol=1e-5) == 2
    restored = rank_reweight(x, weights=w, restandardize=True)
    assert torch.allclose(restored.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(restored.std(dim=(2, 3)), x.std(dim=(2, 3)), rtol=1e-4)
    assert not torch.allclose(restored, x, atol=1e-2)


def test_rank_reweight_commutes_with_positive_scale_and_skips_nonfinite_samples():
    x = _score()
    # So re-weighting the weighted gradient equals the script's "re-weight, then * sqrt(abar)".
    c = torch.tensor([0.97, 0.5, 2.0]).reshape(3, 1, 1, 1)
    assert torch.allclose(rank_reweight(c * x), c * rank_reweight(x), atol=2e-4, rtol=1e-4)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    out = rank_reweight(bad)
    assert torch.equal(out[1].isnan(), bad[1].isnan()) and torch.equal(out[1].nan_to_num(), bad[1].nan_to_num())
    assert torch.allclose(out[0], rank_reweight(x)[0])
    with pytest.raises(ValueError, match="rank weights"):
        rank_reweight(x, weights=(1.0,) * 5)


def test_mirror_gradients_weights_and_flip():
    g = _score()
    base, mirrored = mirror_gradients(g)
    assert torch.equal(base, 0.75 * g)
    assert torch.equal(mirrored, 0.25 * g.flip(-1))
    assert torch.equal(flip_w(flip_w(g)), g)
    assert torch.equal(flip_w(g)[..., 0], g[..., -1])


def test_grid_tile_untile_round_trip_is_exact():
    views = [torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    grid = tile_2x2(views)
    assert grid.shape == (2, 3, 10, 12)
    assert torch.equal(grid[..., :5, :6], views[0]) and torch.equal(grid[..., :5, 6:], views[1])
    assert torch.equal(grid[..., 5:, :6], views[2]) and torch.equal(grid[..., 5:, 6:], views[3])
    back = untile_2x2(grid)
    assert all(torch.equal(a, b) for a, b in zip(back, views, strict=True))
    assert torch.equal(tile_2x2(untile_2x2(grid)), grid)
    with pytest.raises(ValueError, match="exactly 4"):
        tile_2x2(views[:3])
    with pytest.raises(ValueError, match="even"):
        untile_2x2(torch.zeros(1, 1, 5, 4))


def test_postprocess_follows_script_order_and_counts():
    g = torch.tensor([[[[500.0, -3000.0], [float("nan"), float("inf")]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.5]]]])
    out, stats = postprocess(g, mask=mask, scale=1000.0, clamp=1.0)
    # inf * 0.5 / 1000 is clamped to 1 (clamp before nan_to_num, as the script); NaN becomes 0.
    assert torch.equal(out, torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]]]))
    assert int(stats.nonfinite) == 2
    assert int(stats.clamped) == 2
    out2, stats2 = postprocess(g[..., :1, :], clamp=None)
    assert torch.equal(out2, torch.tensor([[[[0.5, -3.0]]]])) and int(stats2.clamped) == 0


def test_resize_mask_to_latent_grid():
    m = torch.zeros(2, 1, 64, 64)
    m[:, :, 16:48, 16:48] = 1.0
    r = resize_mask(m, (32, 32))
    assert r.shape == (2, 1, 32, 32)
    assert r[0, 0, 16, 16] == 1.0 and r[0, 0, 0, 0] == 0.0
    assert torch.allclose(resize_mask(torch.ones(1, 1, 16, 16), (8, 8)), torch.ones(1, 1, 8, 8))
    out, _ = postprocess(torch.full((1, 4, 32, 32), 1000.0), mask=m[:1])
    assert torch.equal(out[:, :1], r[:1])
