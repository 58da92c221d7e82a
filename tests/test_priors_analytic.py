import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import MultivariateNormal

from headstyle.priors.analytic import ExemplarPrior, GaussianPrior, sd_alphas_cumprod
from headstyle.priors.base import NoiseQuery, ScorePrior

SHAPE = (2, 3, 3)  # D = 18: small enough for dense reference covariances
D = math.prod(SHAPE)
TS = [1, 101, 281, 501, 901, 999]


def _gaussian(dtype=torch.float64) -> GaussianPrior:
    g = torch.Generator().manual_seed(0)
    means = {"pixar": torch.randn(SHAPE, generator=g), "joker": torch.randn(SHAPE, generator=g) + 1.0}
    factors = {"pixar": 0.7 * torch.randn(3, *SHAPE, generator=g), "joker": 0.5 * torch.randn(2, *SHAPE, generator=g)}
    return GaussianPrior(means, factors, iso_std={"pixar": 0.1, "joker": 0.3}, compute_dtype=dtype)


def _exemplar(bandwidth: float, dtype=torch.float64, **kw) -> ExemplarPrior:
    g = torch.Generator().manual_seed(1)
    sets = {"pixar": torch.randn(5, *SHAPE, generator=g), "joker": torch.randn(3, *SHAPE, generator=g) * 0.5 + 0.5}
    return ExemplarPrior(sets, bandwidth=bandwidth, compute_dtype=dtype, **kw)


PRIORS = [_gaussian, lambda: _exemplar(0.0), lambda: _exemplar(0.2)]
PRIOR_IDS = ["gauss", "exemplar", "exemplar-bandwidth"]


def _ref_gaussian_components(prior: GaussianPrior, abar: float) -> list[MultivariateNormal]:
    """Dense p_t components: N(sqrt(abar) mu, abar (U U^T + s^2 I) + (1 - abar) I)."""
    comps = []
    for k in range(len(prior.components)):
        u = prior.factors[k]
        sigma0 = u @ u.T + prior.iso_var[k] * torch.eye(D, dtype=torch.float64)
        cov = abar * sigma0 + (1 - abar) * torch.eye(D, dtype=torch.float64)
        comps.append(MultivariateNormal(math.sqrt(abar) * prior.means[k], covariance_matrix=cov))
    return comps


def _ref_exemplar_components(prior: ExemplarPrior, abar: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt: the exemplar rows and the isotropic p_t variance."""
    var = abar * prior.bandwidth**2 + 1 - abar
    return [
        (prior.exemplars[prior.owner == k], torch.tensor(var, dtype=torch.float64))
        for k in range(len(prior.components))
    ]


def _ref_log_density(prior, x: torch.Tensor, abar: float, weights: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k p_t,k(x), built from torch.distributions (independent of the prior's code)."""
    terms = []
    for k, w in enumerate(weights.tolist()):
        if w == 0:
            continue
        if isinstance(prior, GaussianPrior):
            lp = _ref_gaussian_components(prior, abar)[k].log_prob(x)
        else:
            ex, var = _ref_exemplar_components(prior, abar)[k]
            normal = MultivariateNormal(math.sqrt(abar) * ex, covariance_matrix=var * torch.eye(D, dtype=torch.float64))
            lp = torch.logsumexp(normal.log_prob(x[:, None]), dim=1) - math.log(ex.shape[0])
        terms.append(math.log(w) + lp)
    return torch.logsumexp(torch.stack(terms, 1), dim=1)


@pytest.mark.parametrize("make", PRIORS, ids=PRIOR_IDS)
@pytest.mark.parametrize("prompt", ["pixar", "joker", ""])
def test_eps_is_minus_sigma_times_autograd_score_of_exact_density(make, prompt):
    prior = make()
    emb = prior.embed_prompts(prompt).cond
    g = torch.Generator().manual_seed(2)
    for t in TS:
        abar = float(prior.alphas_cumprod[t])
        x = (torch.randn(4, *SHAPE, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)
        ref = _ref_log_density(prior, x.reshape(4, -1), abar, prior.prompt_weights(prompt))
        torch.testing.assert_close(prior.log_density(x, torch.tensor(t), emb), ref, rtol=1e-9, atol=1e-8)
        (grad,) = torch.autograd.grad(ref.sum(), x)
        expected = -math.sqrt(1 - abar) * grad
        torch.testing.assert_close(prior.eps(x.detach(), torch.tensor([t] * 4), emb), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("make", PRIORS, ids=PRIOR_IDS)
def test_guidance_direction_points_from_uncond_to_cond_posterior_mean(make):
    """eps_c - eps_u = -(sqrt(abar)/sigma) (x0_c - x0_u), x0 from an independent Tweedie reference."""
    prior = make()
    emb = prior.embed_prompts("joker")
    g = torch.Generator().manual_seed(3)
    n_informative = 0
    for t in [21, 281, 601, 901]:
        abar = float(prior.alphas_cumprod[t])
        sigma = math.sqrt(1 - abar)
        x = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64)
        ((eps_u, eps_c),) = prior.predict_noise([NoiseQuery(x, torch.full((3,), t), emb)])
        x0 = {}
        for p in ["joker", ""]:
            xr = x.reshape(3, -1).clone().requires_grad_(True)
            (score,) = torch.autograd.grad(_ref_log_density(prior, xr, abar, prior.prompt_weights(p)).sum(), xr)
            x0[p] = ((xr + sigma**2 * score) / math.sqrt(abar)).detach().reshape(x.shape)
        tt = torch.tensor(t)
        diff = prior.eps(x, tt, emb.cond) - prior.eps(x, tt, emb.uncond)
        torch.testing.assert_close(diff, -(math.sqrt(abar) / sigma) * (x0["joker"] - x0[""]), rtol=1e-7, atol=1e-8)
        torch.testing.assert_close((eps_c - eps_u).double(), diff, rtol=1e-4, atol=1e-5)
        gap = (x0["joker"] - x0[""]).reshape(3, -1)
        informative = gap.norm(dim=1) > 1e-6  # where uncond's posterior already equals cond's, both sides are 0
        cos = torch.nn.functional.cosine_similarity(-diff.reshape(3, -1), gap)
        assert (cos[informative] > 1 - 1e-9).all()
        n_informative += int(informative.sum())
        torch.testing.assert_close(prior.x0_mean(x, torch.tensor(t), emb.cond), x0["joker"], rtol=1e-7, atol=1e-8)
    assert n_informative >= 6


def test_exemplar_denoiser_snaps_to_nearest_exemplar_at_low_noise():
    prior = _exemplar(0.0)
    e = prior.exemplars[prior.owner == 0][2].reshape(1, *SHAPE)
    t = torch.tensor([1])
    abar = prior.alphas_cumprod[1]
    x_t = abar.sqrt() * e + (1 - abar).sqrt() * 0.3 * torch.randn(1, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(prior.x0_mean(x_t, t, prior.embed_prompts("pixar").cond), e, rtol=0, atol=1e-6)
    # joker's exemplars are far away: the joker denoiser does not return pixar's exemplar
    assert (prior.x0_mean(x_t, t, prior.embed_prompts("joker").cond) - e).abs().max() > 0.1


@pytest.mark.parametrize("make", [_gaussian, lambda: _exemplar(0.1)], ids=["gauss", "ex"])
def test_predict_noise_batching_invariance_and_float32(make):
    prior = make()
    assert isinstance(prior, ScorePrior)
    g = torch.Generator().manual_seed(4)
    a = NoiseQuery(torch.randn(2, *SHAPE, generator=g), torch.tensor([281, 41]), prior.embed_prompts("pixar"))
    b = NoiseQuery(
        torch.randn(3, *SHAPE, generator=g), torch.tensor([1, 501, 981]), prior.embed_prompts("joker", "pixar")
    )
    batched = prior.predict_noise([a, b])
    for query, (eu, ec) in zip([a, b], batched, strict=True):
        assert eu.dtype == ec.dtype == torch.float32 and eu.shape == query.x_t.shape
        for i in range(query.x_t.shape[0]):
            ((su, sc),) = prior.predict_noise([NoiseQuery(query.x_t[i : i + 1], query.t[i : i + 1], query.prompt)])
            torch.testing.assert_close(eu[i : i + 1], su, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ec[i : i + 1], sc, rtol=1e-6, atol=1e-6)
    # negative prompt "pixar" really is the pixar conditional
    ((_, pix),) = prior.predict_noise([NoiseQuery(b.x_t, b.t, prior.embed_prompts("pixar"))])
    torch.testing.assert_close(batched[1][0], pix)


def test_float32_exemplar_prior_at_lab_scale_matches_float64():
    g = torch.Generator().manual_seed(5)
    sets = {"a": torch.rand(40, 3, 32, 32, generator=g) * 2 - 1, "b": torch.rand(30, 3, 32, 32, generator=g) * 2 - 1}
    p32 = ExemplarPrior(sets, bandwidth=0.05)
    p64 = ExemplarPrior(sets, bandwidth=0.05, compute_dtype=torch.float64)
    x = torch.randn(6, 3, 32, 32, generator=g)
    t = torch.tensor([1, 21, 141, 281, 601, 981])
    for emb in [p32.embed_prompts("a").cond, p32.embed_prompts("").cond]:
        torch.testing.assert_close(p32.eps(x, t, emb).double(), p64.eps(x.double(), t, emb), rtol=1e-4, atol=1e-4)


def test_schedule_matches_diffusers_sd15_ddim():
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.testing.assert_close(sd_alphas_cumprod(), sched.alphas_cumprod, rtol=0, atol=0)
    sched.set_timesteps(50)
    prior = _gaussian()
    assert torch.equal(prior.inference_timesteps(50), sched.timesteps)
    assert prior.inference_timesteps(50)[35:].tolist() == list(range(281, 0, -20))


def test_unconditional_exemplar_set_and_prompt_errors():
    unstyled = torch.zeros(4, *SHAPE, dtype=torch.float64)
    only = _exemplar(0.0, unconditional=unstyled, uncond_includes_prompts=False)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    t = torch.tensor([1, 1])
    # uncond = the unstyled set alone: at low noise the denoiser returns (close to) zero images
    torch.testing.assert_close(only.x0_mean(x, t, only.embed_prompts("pixar").uncond), torch.zeros_like(x))
    pooled = _exemplar(0.0, unconditional=unstyled)
    w = pooled.prompt_weights("")
    assert torch.allclose(w, torch.tensor([5, 3, 4], dtype=torch.float64) / 12)
    with pytest.raises(ValueError, match=r"unknown prompt 'zombie'.*'pixar', 'joker'"):
        pooled.embed_prompts("zombie")
    with pytest.raises(ValueError, match="x_t must be"):
        pooled.eps(torch.zeros(1, 3, 3, 3), t[:1], w.reshape(1, 1, -1))


def test_samples_follow_the_prompt_distribution():
    prior = _gaussian(torch.float32)
    g = torch.Generator().manual_seed(6)
    xs = prior.sample("joker", 4000, generator=g).reshape(4000, -1).double()
    k = prior.components.index("joker")
    cov = prior.factors[k].double() @ prior.factors[k].double().T + prior.iso_var[k].double() * torch.eye(D)
    torch.testing.assert_close(xs.mean(0), prior.means[k].double(), rtol=0, atol=0.08)
    torch.testing.assert_close(xs.T.cov(), cov, rtol=0, atol=0.12)
    ex = _exemplar(0.0, dtype=torch.float32)
    s = ex.sample("joker", 50, generator=g).reshape(50, -1)
    joker = ex.exemplars[ex.owner == 1]
    assert ((s[:, None] - joker[None]).abs().amax(2).min(1).values == 0).all()


@pytest.mark.parametrize("make", PRIORS, ids=PRIOR_IDS)
def test_predict_noise_is_differentiable_with_a_symmetric_jacobian(make):
    """eps = -sigma grad log p_t, so d eps / d x_t = -sigma Hessian: symmetric (objectives like IDS backprop it)."""
    prior = make()
    emb = prior.embed_prompts("pixar")
    x = torch.randn(1, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def eps_c(v: torch.Tensor) -> torch.Tensor:
        query = NoiseQuery(v.reshape(1, *SHAPE), torch.tensor([281]), emb)
        return prior.predict_noise([query])[0][1].double().reshape(-1)

    jac = torch.autograd.functional.jacobian(eps_c, x.reshape(-1))
    assert jac.abs().max() > 1e-3
    torch.testing.assert_close(jac, jac.T, rtol=1e-4, atol=1e-5)
