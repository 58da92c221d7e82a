"""Objectives against closed forms on the analytic Gaussian prior.

Prior: p(x | photo) = N(mu_u, s^2 I) (the unconditional, uncond_weights puts all mass on it),
p(x | style) = N(mu_c, s^2 I). At timestep t, with k_t = 1 / (abar_t s^2 + sigma_t^2), the exact
noise prediction is eps_y(x_t) = sigma_t k_t (x_t - sqrt(abar_t) mu_y); the tests recompute it here.
"""

import pytest
import torch

from headstyle.distill.objectives import (
    DistillTarget,
    IDSParams,
    LDParams,
    NFSDParams,
    SDSParams,
    dds,
    guided_eps,
    ids,
    ld,
    nfsd,
    run_objective,
    sds,
    tweedie_x0,
)
from headstyle.distill.shaping import flip_w, postprocess, rank_reweight
from headstyle.priors.analytic import ExemplarPrior, GaussianPrior
from headstyle.priors.base import DelegatingPrior

SHAPE = (4, 8, 8)
S = 0.6
OMEGA = 7.5


def _means(symmetric: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {name: 0.5 * torch.randn(SHAPE, generator=g) for name in ("photo", "style", "neg")}
    if symmetric:
        out = {k: 0.5 * (v + flip_w(v)) for k, v in out.items()}
    return out


def _prior(symmetric: bool = False) -> GaussianPrior:
    return GaussianPrior(_means(symmetric), iso_std=S, uncond_weights={"photo": 1.0})


class _Counting(DelegatingPrior):
    """Delegates to a prior and counts predict_noise calls."""

    def __init__(self, prior):
        super().__init__(prior)
        self.calls = 0

    def predict_noise(self, queries):
        self.calls += 1
        return super().predict_noise(queries)


def _eps(prior, mu: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    abar = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sigma = (1 - abar).sqrt()
    return sigma * (x_t - abar.sqrt() * mu) / (abar * S**2 + sigma**2)


def _target(prior, n=3, seed=1, prompt="style", **kw) -> DistillTarget:
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(35, 50, (n,), generator=g)
    t = prior.inference_timesteps(50)[step]
    return DistillTarget(
        latents=torch.randn(n, *SHAPE, generator=g),
        prompt=prior.embed_prompts(prompt),
        t=kw.pop("t", t),
        noise=torch.randn(n, *SHAPE, generator=g),
        step_index=step,
        **kw,
    )


def _x_t(prior, tg: DistillTarget) -> torch.Tensor:
    return prior.add_noise(tg.latents, tg.noise, tg.t)


@pytest.mark.parametrize("weighting", ["script", "paper", "none"])
def test_ld_equals_closed_form(weighting):
    prior = _prior()
    mu = _means()
    tg = _target(prior)
    (res,) = ld(prior, [tg], guidance_scale=OMEGA, weighting=weighting)
    x_t = _x_t(prior, tg)
    ac = prior.alphas_cumprod
    w = {"script": ac[tg.step_index].sqrt(), "paper": ac[tg.t].sqrt(), "none": torch.ones(3)}[weighting]
    expected = (
        OMEGA * (_eps(prior, mu["style"], x_t, tg.t) - _eps(prior, mu["photo"], x_t, tg.t)) * w.reshape(-1, 1, 1, 1)
    )
    assert res.grad.dtype == torch.float32
    assert torch.allclose(res.grad, expected, atol=1e-5)
    assert torch.equal(res.diagnostics["t"], tg.t) and res.diagnostics["prior_calls"] == 1
    assert int(res.diagnostics["nonfinite"]) == 0
    assert torch.allclose(res.diagnostics["grad_norm"], expected.flatten(1).norm(dim=1), rtol=1e-5)
    if weighting == "script":
        assert ((w > 0.975) & (w < 0.984)).all()  # the script's step-index quirk: effectively constant


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d", "script"])
def test_sds_equals_closed_form(weighting):
    prior = _prior()
    mu = _means()
    tg = _target(prior, t=torch.tensor([50, 400, 900]))
    (res,) = sds(prior, [tg], guidance_scale=OMEGA, weighting=weighting)
    x_t = _x_t(prior, tg)
    e_u, e_c = _eps(prior, mu["photo"], x_t, tg.t), _eps(prior, mu["style"], x_t, tg.t)
    abar = prior.alphas_cumprod[tg.t].reshape(-1, 1, 1, 1)
    if weighting == "script":
        expected = (OMEGA * (e_c - e_u) - tg.noise) * (1 - prior.alphas_cumprod[tg.step_index]).sqrt().reshape(
            -1, 1, 1, 1
        )
    else:
        w = {"sds": 1 - abar, "uniform": torch.ones_like(abar), "fantasia3d": abar.sqrt() * (1 - abar)}[weighting]
        expected = w * (e_u + OMEGA * (e_c - e_u) - tg.noise)
    assert torch.allclose(res.grad, expected, atol=1e-5)


def test_ld_vs_sds_expectation_on_gaussian_prior():
    """With equal covariances s^2 I the exact relation is, for any x and t:
    LD_none(x, eps) = omega sigma_t sqrt(abar_t) k_t (mu_u - mu_c) -- independent of eps and of x;
    E_eps[SDS_uniform(x)] = sigma_t sqrt(abar_t) k_t (x - mu_cfg), mu_cfg = mu_u + omega (mu_c - mu_u),
    so SDS descends towards mu_cfg (the conditional posterior mean mu_c at omega = 1), and
    E_eps[SDS_uniform] - LD_none = sigma_t sqrt(abar_t) k_t (x - mu_u): SDS is LD plus a pull
    towards the unconditional mean, which LD lacks."""
    prior = _prior()
    mu = _means()
    n, t = 2048, torch.full((2048,), 401)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *SHAPE, generator=g).expand(n, *SHAPE)
    tg = DistillTarget(x, prior.embed_prompts("style"), t, torch.randn(n, *SHAPE, generator=g))
    other = DistillTarget(x + 1.0, tg.prompt, t, torch.randn(n, *SHAPE, generator=g))
    ld_a, ld_b = ld(prior, [tg, other], guidance_scale=OMEGA, weighting="none")
    (sds_res,) = sds(prior, [tg], guidance_scale=OMEGA, weighting="uniform")
    abar = prior.alphas_cumprod[401]
    sigma = (1 - abar).sqrt()
    c = sigma * abar.sqrt() / (abar * S**2 + sigma**2)
    ld_closed = OMEGA * c * (mu["photo"] - mu["style"])
    assert torch.allclose(ld_a.grad, ld_closed.expand_as(ld_a.grad), atol=1e-4)
    assert torch.allclose(ld_b.grad, ld_a.grad, atol=1e-4)  # other x, other eps: same LD
    mu_cfg = mu["photo"] + OMEGA * (mu["style"] - mu["photo"])
    mean_sds = sds_res.grad.mean(0)
    # Monte Carlo error per entry: (1 - sigma^2 k) / sqrt(n).
    tol = 5 * (1 - sigma**2 / (abar * S**2 + sigma**2)) / n**0.5
    assert (mean_sds - c * (x[0] - mu_cfg)).abs().max() < tol
    assert (mean_sds - ld_a.grad[0] - c * (x[0] - mu["photo"])).abs().max() < tol
    step = x[0] - 0.5 * mean_sds / c
    assert (step - mu_cfg).norm() < 0.6 * (x[0] - mu_cfg).norm()


def test_dds_equals_closed_form():
    prior = _prior()
    mu = _means()
    g = torch.Generator().manual_seed(7)
    src = torch.randn(2, *SHAPE, generator=g)
    tg = _target(prior, n=2, source_latents=src, source_prompt=prior.embed_prompts("photo"))
    (res,) = dds(prior, [tg], guidance_scale=OMEGA)
    x_t, s_t = _x_t(prior, tg), prior.add_noise(src, tg.noise, tg.t)
    e_u_trg = _eps(prior, mu["photo"], x_t, tg.t)
    e_u_src = _eps(prior, mu["photo"], s_t, tg.t)
    trg = guided_eps(e_u_trg, _eps(prior, mu["style"], x_t, tg.t), OMEGA)
    src_cfg = guided_eps(e_u_src, _eps(prior, mu["photo"], s_t, tg.t), OMEGA)
    assert torch.allclose(res.grad, trg - src_cfg, atol=1e-5)
    # Equal covariances: DDS is exactly sigma k sqrt(abar) (x - z_src) plus the guidance shift.
    with pytest.raises(ValueError, match="source_latents"):
        dds(prior, [_target(prior)])


def _ids_closed_form(prior, tg, mu, iterations, lam):
    """FPR on the equal-covariance Gaussian prior: z0(z) = a z + b, dz0/dz = a I (scalar), so
    dL/dz = -a r / ||r|| with r = z_src - z0."""
    t = tg.t
    abar = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sigma = (1 - abar).sqrt()
    k = 1 / (abar * S**2 + sigma**2)
    mu_src = mu["photo"]  # source prompt "photo": cfg mean is mu_u + omega (mu_photo - mu_u) = mu_photo
    z = prior.add_noise(tg.source_latents, tg.noise, t)
    a = (1 - sigma**2 * k) / abar.sqrt()
    dists = []
    for _ in range(iterations + 1):
        z0 = (z - sigma * sigma * k * (z - abar.sqrt() * mu_src)) / abar.sqrt()
        r = tg.source_latents - z0
        norm = r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        dists.append(norm.flatten())
        z = z + lam * a * r / norm
    z = z - lam * a * r / norm  # the last loop pass only measured the distance
    eps_star = (z - abar.sqrt() * tg.source_latents) / sigma
    x_t = prior.add_noise(tg.latents, eps_star, t)
    e_u = _eps(prior, mu["photo"], x_t, t)
    grad = guided_eps(e_u, _eps(prior, mu["style"], x_t, t), OMEGA) - _eps(prior, mu_src, z, t)
    return grad, eps_star, torch.stack(dists)


def test_ids_equals_closed_form_and_counts_calls():
    prior = _Counting(_prior())
    mu = _means()
    g = torch.Generator().manual_seed(8)
    tg = _target(prior, n=2, t=torch.tensor([301, 601]))
    tg.source_latents = tg.latents + 0.3 * torch.randn(2, *SHAPE, generator=g)
    tg.source_prompt = prior.embed_prompts("photo")
    (res,) = ids(prior, [tg], guidance_scale=OMEGA, fpr_iterations=3, fpr_lambda=2.0)
    grad, eps_star, dists = _ids_closed_form(prior, tg, mu, 3, 2.0)
    assert prior.calls == 4 and res.diagnostics["prior_calls"] == 4
    assert torch.allclose(res.diagnostics["guided_noise"], eps_star, atol=1e-4)
    assert torch.allclose(res.grad, grad, atol=1e-4)
    assert torch.allclose(res.diagnostics["fpr_distance"], dists, rtol=1e-4)
    # Zero iterations: IDS is DDS.
    (zero,) = ids(prior, [tg], guidance_scale=OMEGA, fpr_iterations=0)
    (plain,) = dds(prior, [tg], guidance_scale=OMEGA)
    assert torch.allclose(zero.grad, plain.grad, atol=1e-6)


@pytest.mark.parametrize("kind", ["gauss-lowrank", "exemplar"])
def test_ids_fpr_lowers_distance_at_every_iteration(kind):
    g = torch.Generator().manual_seed(9)
    if kind == "exemplar":
        sets = {"photo": torch.randn(6, *SHAPE, generator=g), "style": torch.randn(6, *SHAPE, generator=g)}
        prior = ExemplarPrior(sets, bandwidth=0.5)
    else:
        factors = {k: 0.5 * torch.randn(3, *SHAPE, generator=g) for k in ("photo", "style", "neg")}
        prior = GaussianPrior(_means(), factors, iso_std=S, uncond_weights={"photo": 1.0})
    tg = _target(prior, n=3, t=torch.tensor([201, 501, 801]))
    tg.source_latents = prior.sample("photo", 3, generator=g)
    tg.source_prompt = prior.embed_prompts("photo")
    (res,) = ids(prior, [tg], guidance_scale=OMEGA, fpr_iterations=4, fpr_lambda=0.5)
    d = res.diagnostics["fpr_distance"]
    assert d.shape == (5, 3)
    assert (d[1:] < d[:-1]).all(), d


class _NoGrad(_Counting):
    """A prior whose predict_noise disables autograd itself."""

    def predict_noise(self, queries):
        with torch.no_grad():
            return super().predict_noise(queries)


def test_ids_requires_a_differentiable_prior():
    prior = _NoGrad(_prior())
    tg = _target(prior, n=1, source_latents=torch.zeros(1, *SHAPE), source_prompt=prior.embed_prompts("photo"))
    with pytest.raises(RuntimeError, match="no_grad"):
        ids(prior, [tg], fpr_iterations=1)


def test_nfsd_equals_closed_form():
    prior = _prior()
    mu = _means()
    tg = _target(prior, t=torch.tensor([101, 199, 600]))
    neg = prior.embed_prompts("neg")
    (res,) = nfsd(prior, [tg], guidance_scale=OMEGA, negative_prompt=neg)
    (no_neg,) = nfsd(prior, [tg], guidance_scale=OMEGA)
    x_t = _x_t(prior, tg)
    e_u, e_c, e_n = (_eps(prior, mu[k], x_t, tg.t) for k in ("photo", "style", "neg"))
    w = 1 - prior.alphas_cumprod[tg.t].reshape(-1, 1, 1, 1)
    high = torch.tensor([0.0, 0.0, 1.0]).reshape(-1, 1, 1, 1)
    assert torch.allclose(res.grad, w * (OMEGA * (e_c - e_u) + e_u - high * e_n), atol=1e-5)
    assert torch.allclose(no_neg.grad, w * (OMEGA * (e_c - e_u) + e_u), atol=1e-5)


def test_all_targets_share_one_prior_call_and_match_separate_calls():
    prior = _Counting(_prior())
    a, b = _target(prior, n=1, seed=2), _target(prior, n=2, seed=3, prompt="neg")
    both = ld(prior, [a, b])
    assert prior.calls == 1
    sep = ld(prior, [a]) + ld(prior, [b])
    for x, y in zip(both, sep, strict=True):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)
    tg = _target(prior, source_latents=torch.zeros(3, *SHAPE), source_prompt=prior.embed_prompts("photo"))
    prior.calls = 0
    dds(prior, [tg, tg])
    sds(prior, [a, b])
    nfsd(prior, [a, b], negative_prompt=prior.embed_prompts("neg"))
    assert prior.calls == 3


def test_mirror_equivariance_on_flip_symmetric_prior():
    """flip_w is a symmetry of the prior, so the gradient for the mirrored render (flipped
    latents and noise) is the flipped gradient: the LD script's mirror injection is exact here."""
    prior = _prior(symmetric=True)
    tg = _target(prior)
    mirrored = DistillTarget(flip_w(tg.latents), tg.prompt, tg.t, flip_w(tg.noise), step_index=tg.step_index)
    for name, params in [("ld", LDParams()), ("sds", SDSParams(weighting="sds")), ("nfsd", NFSDParams())]:
        r, rm = run_objective(name, prior, [tg, mirrored], params, OMEGA)
        assert torch.equal(rm.grad, flip_w(r.grad))  # the isotropic prior acts elementwise: exact
        mask = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        shaped = postprocess(rank_reweight(r.grad), mask, scale=10.0)[0]
        shaped_m = postprocess(rank_reweight(rm.grad), flip_w(mask), scale=10.0)[0]
        assert torch.allclose(shaped_m, flip_w(shaped), atol=1e-5)
    # A prior that is not flip-symmetric breaks the relation (the test can fail).
    r, rm = ld(_prior(), [tg, mirrored])
    assert not torch.allclose(rm.grad, flip_w(r.grad), atol=1e-3)


def test_tweedie_target_is_the_posterior_mean_at_omega_one():
    prior = _prior()
    tg = _target(prior)
    (res,) = ld(prior, [tg], guidance_scale=1.0)
    x0 = tweedie_x0(prior.alphas_cumprod, res, guidance_scale=1.0)
    assert torch.allclose(x0, prior.x0_mean(res.x_t, res.t, tg.prompt.cond), atol=1e-4)


def test_registry_and_errors():
    prior = _prior()
    tg = _target(prior)
    by_name = run_objective("ld", prior, [tg], LDParams(weighting="paper"))[0].grad
    assert torch.equal(by_name, ld(prior, [tg], weighting="paper")[0].grad)
    with pytest.raises(ValueError, match="unknown objective"):
        run_objective("vsd", prior, [tg])
    with pytest.raises(ValueError, match="takes LDParams"):
        run_objective("ld", prior, [tg], IDSParams(fpr_iterations=3))
    with pytest.raises(ValueError, match="weighting"):
        SDSParams(weighting="dreamfusion")
    with pytest.raises(ValueError, match="step_index"):
        ld(prior, [DistillTarget(tg.latents, tg.prompt, tg.t, tg.noise)])
    with pytest.raises(ValueError, match="weighting"):
        sds(prior, [tg], weighting="dreamfusion")
    with pytest.raises(ValueError, match="noise"):
        ld(prior, [DistillTarget(tg.latents, tg.prompt, tg.t, tg.noise[:, :3], step_index=tg.step_index)])
