"""Metrics: perfect values on identical inputs, worse ones on permuted identities, closed forms."""

import math

import pytest
import torch

from headstyle.cameras import cameras
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import sample_z
from headstyle.metrics.consistency import multiview_consistency, warp_error
from headstyle.metrics.diversity import diversity, mean_pairwise_distance
from headstyle.metrics.identity import identity_preservation
from headstyle.metrics.style import frechet_distance, style_distance, stylisation_score


@pytest.fixture(scope="module")
def renders():
    """4 lab identities x 3 views (yaw 0, 30, 60 degrees) at 16 px: images, depth, mask, cameras."""
    G = LabGenerator(resolution=16, sr_factor=1, residual=False)
    z = sample_z(4, 7)
    cams = cameras(torch.tensor([0.0, math.pi / 6, math.pi / 3]), torch.zeros(3))
    with torch.no_grad():
        out = G.synthesis(G.mapping(z.repeat_interleave(3, 0), cams.repeat(4, 1)), cams.repeat(4, 1))

    def per(x):
        return x.reshape(4, 3, *x.shape[1:])

    return per(out.image), per(out.depth), per(out.mask), cams


def test_identity_metrics_perfect_on_identical_and_worse_on_permuted(renders):
    img, depth, mask, _ = renders
    same = identity_preservation(img, depth, mask, img, depth, mask)
    assert same == {
        "depth_error": 0.0,
        "silhouette_iou": 1.0,
        "rgb_error": 0.0,
        "id_accuracy_geometry": 1.0,
        "id_accuracy_appearance": 1.0,
    }
    perm = torch.tensor([1, 2, 3, 0])  # a derangement: no identity keeps its ground truth
    shuffled = identity_preservation(img, depth, mask, img[perm], depth[perm], mask[perm])
    assert shuffled["depth_error"] > 1e-3 and shuffled["rgb_error"] > 1e-2
    assert shuffled["silhouette_iou"] < 1.0
    assert shuffled["id_accuracy_geometry"] == 0.0 and shuffled["id_accuracy_appearance"] == 0.0


def test_frechet_distance_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    mu = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    b = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * 2 + mu
    # N(0, I) vs N(mu, 4 I): |mu|^2 + tr(I + 4 I - 2 * 2 I) = 2 + 3 * (1 + 4 - 4) = 5
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_style_metric_is_identity_free(renders):
    img, _, mask, _ = renders
    assert style_distance(img, mask, img, mask) == pytest.approx(0.0, abs=1e-9)
    # Which identity is where does not change a set's style statistics.
    perm = torch.tensor([2, 0, 3, 1])
    assert style_distance(img[perm], mask[perm], img, mask) == pytest.approx(0.0, abs=1e-9)
    grey = img.mean(2, keepdim=True).expand_as(img)
    s = stylisation_score((img, mask), (grey, mask), (img, mask))
    assert s["stylisation"] == pytest.approx(1.0) and s["style_fd_before"] > 1e-3
    assert stylisation_score((grey, mask), (grey, mask), (img, mask))["stylisation"] == pytest.approx(0.0)


def test_diversity_is_one_without_collapse_and_zero_when_collapsed(renders):
    img, depth, _, _ = renders
    assert diversity(img, img, depth, depth) == {"diversity_rgb": 1.0, "diversity_depth": 1.0}
    collapsed = diversity(img, img[:1].expand_as(img), depth, depth[:1].expand_as(depth))
    assert collapsed == {"diversity_rgb": 0.0, "diversity_depth": 0.0}
    x = torch.tensor([[0.0], [1.0], [3.0]])
    assert mean_pairwise_distance(x) == pytest.approx((1 + 3 + 2) / 3)


def test_multiview_warp_exact_on_itself_small_across_views_larger_across_identities(renders):
    img, depth, mask, cams = renders
    flat = (img[:, 0], depth[:, 0], mask[:, 0], cams[:1].expand(4, -1))
    err, covis = warp_error(*flat, *flat)
    assert torch.equal(err, torch.zeros(4)) and torch.all(covis > 0.95)
    same = multiview_consistency(img, depth, mask, cams)
    assert same["mv_covisible"] > 0.3
    other_identity = torch.stack([img[:, 0], img[[1, 2, 3, 0], 1]], 1)
    swapped = multiview_consistency(other_identity, depth[:, :2], mask[:, :2], cams[:2])
    assert swapped["mv_warp_error"] > 2 * same["mv_warp_error"]
