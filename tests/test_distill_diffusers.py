"""Objectives on the tiny real diffusers models: one UNet call for all branches, IDS through the UNet."""

import pytest
import torch

from headstyle.distill.objectives import DistillTarget, dds, guided_eps, ids, ld
from headstyle.priors.base import Control, NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.testing import IMAGE_SIZE, LATENT_SIZE

LAT = (4, LATENT_SIZE, LATENT_SIZE)


@pytest.fixture(scope="module")
def prior(tiny_sd) -> DiffusersPrior:
    return DiffusersPrior.from_pretrained(
        tiny_sd.model, vae=None, controlnets=tiny_sd.controlnets, latent_sample="mean"
    )


@pytest.fixture
def count():
    """count(module) -> a one-item list holding the module's forward calls; hooks removed after the test."""
    handles = []

    def attach(module: torch.nn.Module) -> list[int]:
        calls = [0]
        handles.append(module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)))
        return calls

    yield attach
    for h in handles:
        h.remove()


def _targets(prior: DiffusersPrior, n: int = 2) -> tuple[DistillTarget, DistillTarget]:
    g = torch.Generator().manual_seed(0)
    emb = prior.embed_prompts("portrait of a werewolf")
    view = DistillTarget(
        latents=torch.randn(1, *LAT, generator=g),
        prompt=emb,
        t=torch.tensor([281]),
        noise=torch.randn(1, *LAT, generator=g),
        control=Control("canny", (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.8).float()),
        step_index=torch.tensor([35]),
        source_latents=torch.randn(1, *LAT, generator=g),
        source_prompt=prior.embed_prompts("portrait of a face"),
    )
    grid = DistillTarget(
        latents=torch.randn(n, *LAT, generator=g),
        prompt=emb,
        t=torch.tensor([201, 601][:n]),
        noise=torch.randn(n, *LAT, generator=g),
        control=Control("depth", torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)),
        step_index=torch.tensor([39, 19][:n]),
        source_latents=torch.randn(n, *LAT, generator=g),
        source_prompt=prior.embed_prompts("portrait of a face"),
    )
    return view, grid


def test_canny_view_and_depth_grid_share_one_unet_call(prior, count):
    unet, canny, depth = count(prior.unet), count(prior.controlnets["canny"]), count(prior.controlnets["depth"])
    view, grid = _targets(prior)
    results = ld(prior, [view, grid])
    assert (unet[0], canny[0], depth[0]) == (1, 1, 1)
    assert [r.diagnostics["prior_calls"] for r in results] == [1, 1]
    assert torch.allclose(results[1].diagnostics["weight"], prior.alphas_cumprod[grid.step_index].sqrt())
    # DDS: target and source rows of a branch share its ControlNet run (per-sample depth images).
    unet[0] = depth[0] = canny[0] = 0
    _, res_grid = dds(prior, [view, grid])
    assert (unet[0], canny[0], depth[0]) == (1, 1, 1)
    with torch.no_grad():
        src_t = prior.add_noise(grid.source_latents, grid.noise, grid.t)
        ((tu, tc), (su, sc)) = prior.predict_noise(
            [
                NoiseQuery(res_grid.x_t, grid.t, grid.prompt, grid.control),
                NoiseQuery(src_t, grid.t, grid.source_prompt, grid.control),
            ]
        )
    torch.testing.assert_close(res_grid.grad, guided_eps(tu, tc, 7.5) - guided_eps(su, sc, 7.5), rtol=0, atol=1e-5)


def test_ids_differentiates_through_unet_and_controlnet(prior, count):
    unet = count(prior.unet)
    view, _ = _targets(prior, n=1)
    (res,) = ids(prior, [view], fpr_iterations=2, fpr_lambda=0.02)
    assert unet[0] == 3 and res.diagnostics["prior_calls"] == 3
    d = res.diagnostics["fpr_distance"]
    # A small step along -dL/dz_t must lower L: the gradient through UNet and ControlNet is a descent direction.
    assert (d[1:] < d[:-1]).all(), d
    assert torch.isfinite(res.grad).all()
    assert not any(p.grad is not None for p in prior.unet.parameters())
