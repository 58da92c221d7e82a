"""Score-distillation objectives: pure functions from a prior and targets to latent gradients.

Interface. An objective is ``f(prior, targets, **hyper) -> list[DistillResult]``, one result per
``DistillTarget`` (one branch: a single view with its canny control, a 2x2 grid with its depth
control, a view and its resampled-noise twin, ...). All targets are evaluated by ONE
``prior.predict_noise`` call (IDS: one per fixed-point iteration plus one), one NoiseQuery per target,
so the branches of a training step share a single denoiser batch; DDS/IDS source rows and NFSD
negative-prompt rows ride in their target's query, so its ControlNet runs once. ``DistillResult.grad``
is d loss / d latents in fp32, before shaping (rank re-weighting, mirror, mask, / 1000, clamp: see
shaping.py) and injection (inject.py). Objectives never differentiate the generator: latents are detached on entry.

Guidance. Everywhere the classifier-free-guided prediction is the diffusers form
    eps_cfg = eps_u + omega (eps_c - eps_u)
(omega = 1 is the plain conditional prediction; DreamFusion/threestudio's e_c + omega' (e_c - e_u)
is this form with omega = omega' + 1).

Notation: x = latents, eps = the target's noise, abar_t = alphas_cumprod[t], sigma_t = sqrt(1 - abar_t),
x_t = sqrt(abar_t) x + sigma_t eps, s = DDIM step index.

- ``ld``   omega (eps_c - eps_u) * w, w = sqrt(alphas_cumprod[s]) ("script": the LD training
           script indexes alphas_cumprod by the step INDEX s in 35..49, so w ~ 0.98 is effectively
           constant), sqrt(abar_t) ("paper": the paper's formula) or 1 ("none"). No "- eps" and no
           eps_u term: the classifier score only, no pull towards the prior's mean face.
- ``sds``  w(t) (eps_cfg - eps) with w = 1 - abar_t ("sds"), 1 ("uniform"),
           sqrt(abar_t)(1 - abar_t) ("fantasia3d"); "script" is the LD script's SDS switch,
           (omega (eps_c - eps_u) - eps) sqrt(1 - alphas_cumprod[s]): it subtracts eps from the
           guidance difference, not from eps_cfg, and indexes by the step index like LD.
- ``dds``  eps_cfg(x_t^trg, y_trg) - eps_cfg(x_t^src, y_src), same eps and t (Hertz et al.).
- ``ids``  DDS with guided noise eps* from fixed-point regularisation (FPR) of the source x_t
           (see ``ids``); differentiates THROUGH the denoiser.
- ``nfsd`` (1 - abar_t)(delta_C + delta_D), delta_C = omega (eps_c - eps_u), delta_D = eps_u for
           t < 200 else eps_u - eps_neg (Katzir et al.); eps_neg from an optional negative prompt.

Each objective owns its hyper-parameters (``LDParams``, ``SDSParams``, ... : the config's
``objective.<field>``); ``OBJECTIVES`` registers function, parameters and whether the targets need
a source, and ``run_objective(name, prior, targets, params, guidance_scale)`` dispatches by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from headstyle.priors.base import Control, Layout, NoiseQuery, PromptEmbeds, ScorePrior, add_noise

LD_WEIGHTINGS = ("script", "paper", "none")
SDS_WEIGHTINGS = ("sds", "uniform", "fantasia3d", "script")


@dataclass
class DistillTarget:
    """One branch of a distillation step.

    latents: x (N, C, h, w), the render's latents (any dtype; detached and cast to fp32 here).
    prompt: text conditioning (batch 1 or N). t: (N,) long timesteps. noise: eps like latents.
    control: optional ControlNet input for this branch. layout: "view" or "grid" (2x2 views).
    step_index: (N,) long DDIM step indices (needed by the "script" weightings).
    source_latents / source_prompt: z_src and y_src for DDS and IDS (the frozen render and its
    description); the source branch uses the same control as the target.
    """

    latents: Tensor
    prompt: PromptEmbeds
    t: Tensor
    noise: Tensor
    control: Control | None = None
    step_index: Tensor | None = None
    source_latents: Tensor | None = None
    source_prompt: PromptEmbeds | None = None
    layout: Layout = "view"


@dataclass
class DistillResult:
    """grad: fp32 d loss / d latents (N, C, h, w). t, x_t, eps_uncond, eps_cond: the target branch's
    denoiser input and fp32 outputs (for a Tweedie target, see ``tweedie_x0``).

    diagnostics: "t" (N,), "grad_norm" (N,) per-sample L2 norm, "nonfinite" (0-dim count of
    non-finite grad entries), "prior_calls" (int, predict_noise calls of the whole objective call),
    plus "weight" (N,) for weighted objectives, and for IDS "fpr_distance" (iterations + 1, N)
    and "guided_noise" (eps*, shaped like latents). Counts stay tensors (no host sync until logged).
    """

    grad: Tensor
    t: Tensor
    x_t: Tensor
    eps_uncond: Tensor
    eps_cond: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


Objective = Callable[..., list[DistillResult]]


def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """eps_cfg = eps_u + omega (eps_c - eps_u): the diffusers-form classifier-free-guided prediction."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def predicted_x0(alphas_cumprod: Tensor, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Tweedie / DDIM x0_hat = (x_t - sigma_t eps) / sqrt(abar_t)."""
    abar = _gather(alphas_cumprod, t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def tweedie_x0(alphas_cumprod: Tensor, result: DistillResult, guidance_scale: float) -> Tensor:
    """x0_hat of a result's target branch with the full CFG eps (the LD script's Tweedie target)."""
    eps = guided_eps(result.eps_uncond, result.eps_cond, guidance_scale)
    return predicted_x0(alphas_cumprod, result.x_t, eps, result.t)


def _gather(alphas_cumprod: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[index] as (N, 1, ..., 1) fp32 on like's device."""
    values = alphas_cumprod.to(like.device).float()[index.to(like.device).long().reshape(-1)]
    return values.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Prepared:
    x: Tensor
    eps: Tensor
    t: Tensor
    target: DistillTarget


def _prepare(targets: list[DistillTarget], need_source: bool = False) -> list[_Prepared]:
    if not targets:
        raise ValueError("an objective needs at least one DistillTarget")
    out = []
    for i, tg in enumerate(targets):
        if tg.latents.dim() != 4:
            raise ValueError(f"target {i}: latents must be (N, C, h, w), got shape {tuple(tg.latents.shape)}")
        if tg.noise.shape != tg.latents.shape:
            raise ValueError(f"target {i}: noise {tuple(tg.noise.shape)} must match latents {tuple(tg.latents.shape)}")
        n = tg.latents.shape[0]
        t = tg.t.to(tg.latents.device).long().reshape(-1)
        if t.shape != (n,):
            raise ValueError(f"target {i}: t must hold one timestep per sample ({n}), got shape {tuple(tg.t.shape)}")
        if need_source:
            if tg.source_latents is None or tg.source_prompt is None:
                raise ValueError(f"target {i}: DDS/IDS need source_latents and source_prompt (the frozen render)")
            if tg.source_latents.shape != tg.latents.shape:
                raise ValueError(
                    f"target {i}: source latents {tuple(tg.source_latents.shape)} must match {tuple(tg.latents.shape)}"
                )
        x = tg.latents.detach().float()
        out.append(_Prepared(x=x, eps=tg.noise.detach().float().to(x.device), t=t, target=tg))
    return out


def _query(x_t: Tensor, p: _Prepared, prompt: PromptEmbeds) -> NoiseQuery:
    return NoiseQuery(
        x_t=x_t, t=p.t, prompt=prompt.repeat(x_t.shape[0]), control=p.target.control, layout=p.target.layout
    )


def _step_weight(prior: ScorePrior, p: _Prepared, what: str) -> Tensor:
    if p.target.step_index is None:
        raise ValueError(
            f"{what} needs DistillTarget.step_index (the DDIM step index from timesteps.sample_ddim_steps); "
            "use a t-based weighting instead when sampling t directly"
        )
    return _gather(prior.alphas_cumprod, p.target.step_index, p.x)


def _result(
    grad: Tensor, p: _Prepared, x_t: Tensor, pred: tuple[Tensor, Tensor], calls: int, **extra: Any
) -> DistillResult:
    grad = grad.float()
    diagnostics = {
        "t": p.t,
        "grad_norm": torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).flatten(1).norm(dim=1),
        "nonfinite": (~torch.isfinite(grad)).sum(),
        "prior_calls": calls,
        **extra,
    }
    return DistillResult(grad=grad, t=p.t, x_t=x_t, eps_uncond=pred[0], eps_cond=pred[1], diagnostics=diagnostics)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _noised_predictions(prior: ScorePrior, prep: list[_Prepared]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """x_t = add_noise(x, eps, t) per target and ONE no-grad prediction over all of them."""
    x_ts = [add_noise(prior.alphas_cumprod, p.x, p.eps, p.t) for p in prep]
    with torch.no_grad():
        preds = prior.predict_noise([_query(x_t, p, p.target.prompt) for x_t, p in zip(x_ts, prep, strict=True)])
    return x_ts, preds


def ld(
    prior: ScorePrior, targets: list[DistillTarget], *, guidance_scale: float = 7.5, weighting: str = "script"
) -> list[DistillResult]:
    """Likelihood distillation: grad = omega (eps_c - eps_u) * w (module docstring for w)."""
    _check_choice(weighting, LD_WEIGHTINGS, "LD weighting")
    prep = _prepare(targets)
    if weighting == "script":
        weights = [_step_weight(prior, p, "LD weighting 'script'").sqrt() for p in prep]
    elif weighting == "paper":
        weights = [_gather(prior.alphas_cumprod, p.t, p.x).sqrt() for p in prep]
    else:
        weights = [torch.ones_like(p.x[:, :1, :1, :1]) for p in prep]
    x_ts, preds = _noised_predictions(prior, prep)
    return [
        _result(guidance_scale * (e_c - e_u) * w, p, x_t, (e_u, e_c), 1, weight=w.flatten())
        for p, x_t, (e_u, e_c), w in zip(prep, x_ts, preds, weights, strict=True)
    ]


def sds(
    prior: ScorePrior, targets: list[DistillTarget], *, guidance_scale: float = 7.5, weighting: str = "sds"
) -> list[DistillResult]:
    """Score distillation sampling: grad = w(t) (eps_cfg - eps) (module docstring for w and "script")."""
    _check_choice(weighting, SDS_WEIGHTINGS, "SDS weighting")
    prep = _prepare(targets)
    if weighting == "script":
        weights = [(1 - _step_weight(prior, p, "SDS weighting 'script'")).sqrt() for p in prep]
    else:
        abars = [_gather(prior.alphas_cumprod, p.t, p.x) for p in prep]
        weights = [
            {"sds": 1 - a, "uniform": torch.ones_like(a), "fantasia3d": a.sqrt() * (1 - a)}[weighting] for a in abars
        ]
    x_ts, preds = _noised_predictions(prior, prep)
    results = []
    for p, x_t, (e_u, e_c), w in zip(prep, x_ts, preds, weights, strict=True):
        if weighting == "script":
            grad = (guidance_scale * (e_c - e_u) - p.eps) * w  # the script subtracts eps from the guidance delta
        else:
            grad = (guided_eps(e_u, e_c, guidance_scale) - p.eps) * w
        results.append(_result(grad, p, x_t, (e_u, e_c), 1, weight=w.flatten()))
    return results


def nfsd(
    prior: ScorePrior,
    targets: list[DistillTarget],
    *,
    guidance_scale: float = 7.5,
    negative_prompt: PromptEmbeds | None = None,
    t_threshold: int = 200,
) -> list[DistillResult]:
    """Noise-free score distillation: (1 - abar_t)(omega (eps_c - eps_u) + delta_D).

    delta_D = eps_u where t < t_threshold or no ``negative_prompt`` is given, else eps_u - eps_neg;
    eps_neg is the prediction for ``negative_prompt.cond`` (extra rows of the same call and ControlNet run).
    """
    prep = _prepare(targets)
    x_ts = [add_noise(prior.alphas_cumprod, p.x, p.eps, p.t) for p in prep]
    if negative_prompt is None:
        queries = [_query(x_t, p, p.target.prompt) for x_t, p in zip(x_ts, prep, strict=True)]
    else:
        # eps_neg as extra rows of each target's query: (uncond, negative) beside (uncond, cond).
        queries = [
            _pair_query(x_t, x_t, p, p.target.prompt, PromptEmbeds(p.target.prompt.uncond, negative_prompt.cond))
            for x_t, p in zip(x_ts, prep, strict=True)
        ]
    with torch.no_grad():
        preds = prior.predict_noise(queries)
    results = []
    for p, x_t, (rows_u, rows_c) in zip(prep, x_ts, preds, strict=True):
        n = x_t.shape[0]
        e_u, e_c = rows_u[:n], rows_c[:n]
        delta_d = e_u
        if negative_prompt is not None:
            high = (p.t >= t_threshold).float().reshape(-1, 1, 1, 1)
            delta_d = e_u - high * rows_c[n:]
        w = 1 - _gather(prior.alphas_cumprod, p.t, p.x)
        grad = w * (guidance_scale * (e_c - e_u) + delta_d)
        results.append(_result(grad, p, x_t, (e_u, e_c), 1, weight=w.flatten()))
    return results


def dds(prior: ScorePrior, targets: list[DistillTarget], *, guidance_scale: float = 7.5) -> list[DistillResult]:
    """Delta denoising score: eps_cfg(x_t^trg, y_trg) - eps_cfg(x_t^src, y_src), shared eps and t."""
    prep = _prepare(targets, need_source=True)
    x_ts = [add_noise(prior.alphas_cumprod, p.x, p.eps, p.t) for p in prep]
    src_ts = [add_noise(prior.alphas_cumprod, p.target.source_latents.detach().float(), p.eps, p.t) for p in prep]
    return _delta(prior, prep, x_ts, src_ts, guidance_scale, calls=1)[0]


def _delta(
    prior: ScorePrior,
    prep: list[_Prepared],
    x_ts: list[Tensor],
    src_ts: list[Tensor],
    guidance_scale: float,
    calls: int,
) -> tuple[list[DistillResult], list[Tensor]]:
    """One call over all targets, each a (target rows, source rows) query; grad = eps_cfg(trg) - eps_cfg(src).

    Returns the results and the source rows' eps_cfg."""
    with torch.no_grad():
        preds = prior.predict_noise(
            [
                _pair_query(x_t, s_t, p, p.target.prompt, p.target.source_prompt)
                for p, x_t, s_t in zip(prep, x_ts, src_ts, strict=True)
            ]
        )
    results, src_cfgs = [], []
    for p, x_t, (e_u, e_c) in zip(prep, x_ts, preds, strict=True):
        n = x_t.shape[0]
        trg = (e_u[:n], e_c[:n])
        src_cfg = guided_eps(e_u[n:], e_c[n:], guidance_scale)
        results.append(_result(guided_eps(*trg, guidance_scale) - src_cfg, p, x_t, trg, calls))
        src_cfgs.append(src_cfg)
    return results, src_cfgs


def _pair_query(x_a: Tensor, x_b: Tensor, p: _Prepared, prompt_a: PromptEmbeds, prompt_b: PromptEmbeds) -> NoiseQuery:
    """Rows (x_a, prompt_a) then (x_b, prompt_b) as ONE query, so the target's ControlNet runs once for both."""
    n = x_a.shape[0]
    a, b = prompt_a.repeat(n), prompt_b.repeat(n)
    prompt = PromptEmbeds(uncond=torch.cat([a.uncond, b.uncond]), cond=torch.cat([a.cond, b.cond]))
    control = p.target.control
    if control is not None and control.image.dim() == 4 and control.image.shape[0] == n > 1:
        control = Control(control.name, torch.cat([control.image, control.image]), control.scale)
    return NoiseQuery(
        x_t=torch.cat([x_a, x_b]), t=torch.cat([p.t, p.t]), prompt=prompt, control=control, layout=p.target.layout
    )


def ids(
    prior: ScorePrior,
    targets: list[DistillTarget],
    *,
    guidance_scale: float = 7.5,
    fpr_iterations: int = 3,
    fpr_lambda: float = 1.0,
) -> list[DistillResult]:
    """Identity-preserving distillation sampling (IDS, CVPR 2025).

    FPR, N = fpr_iterations times, starting from z_t = add_noise(z_src, eps, t):
        z0 = (z_t - sigma_t eps_cfg(z_t, y_src)) / sqrt(abar_t);  L = ||z_src - z0||_2 per sample;
        z_t <- (z_t - lambda dL/dz_t).detach()
    dL/dz_t back-propagates THROUGH the denoiser (and ControlNet): one predict_noise call with
    autograd on per iteration; its graph is freed by torch.autograd.grad before the next call,
    so peak memory is one forward graph (inputs only are differentiated; a frozen prior
    accumulates no parameter gradients). Then the guided noise eps* = (z_t* - sqrt(abar_t) z_src)
    / sigma_t gives z_t^trg = add_noise(z_trg, eps*, t), and one more no-grad call on
    (z_t^trg, y_trg) and (z_t*, y_src) (the source prediction is re-evaluated at z_t*) gives
    grad = eps_cfg(z_t^trg, y_trg) - eps_cfg(z_t*, y_src). N + 1 calls in all.
    diagnostics["fpr_distance"]: ||z_src - z0|| before each update and at z_t* ((N + 1, n)).

    The prior's predict_noise must not disable autograd itself (objectives choose no_grad).
    """
    if fpr_iterations < 0:
        raise ValueError(f"fpr_iterations must be >= 0, got {fpr_iterations}")
    prep = _prepare(targets, need_source=True)
    abar = [_gather(prior.alphas_cumprod, p.t, p.x) for p in prep]
    z_src = [p.target.source_latents.detach().float().to(p.x.device) for p in prep]
    z_t = [add_noise(prior.alphas_cumprod, z, p.eps, p.t) for z, p in zip(z_src, prep, strict=True)]
    distances: list[list[Tensor]] = [[] for _ in prep]
    for _ in range(fpr_iterations):
        z_req = [z.detach().requires_grad_(True) for z in z_t]
        with torch.enable_grad():
            preds = prior.predict_noise(
                [_query(z, p, p.target.source_prompt) for z, p in zip(z_req, prep, strict=True)]
            )
            if not any(e.requires_grad for pair in preds for e in pair):
                raise RuntimeError(
                    "IDS differentiates through the denoiser, but prior.predict_noise returned tensors without "
                    "autograd history: the prior must not wrap predict_noise in torch.no_grad()"
                )
            losses = []
            for i, (z, p) in enumerate(zip(z_req, prep, strict=True)):
                z0 = predicted_x0(prior.alphas_cumprod, z, guided_eps(*preds[i], guidance_scale), p.t)
                dist = (z_src[i] - z0).flatten(1).norm(dim=1)
                distances[i].append(dist.detach())
                losses.append(dist.sum())
            grads = torch.autograd.grad(torch.stack(losses).sum(), z_req)
        z_t = [(z - fpr_lambda * g).detach() for z, g in zip(z_req, grads, strict=True)]
    eps_star = [(z - a.sqrt() * zs) / (1 - a).sqrt() for z, a, zs in zip(z_t, abar, z_src, strict=True)]
    x_ts = [add_noise(prior.alphas_cumprod, p.x, e, p.t) for p, e in zip(prep, eps_star, strict=True)]
    results, src_cfgs = _delta(prior, prep, x_ts, z_t, guidance_scale, calls=fpr_iterations + 1)
    for i, (r, p) in enumerate(zip(results, prep, strict=True)):
        final = predicted_x0(prior.alphas_cumprod, z_t[i], src_cfgs[i], p.t)
        distances[i].append((z_src[i] - final).flatten(1).norm(dim=1))
        r.diagnostics["fpr_distance"] = torch.stack(distances[i])
        r.diagnostics["guided_noise"] = eps_star[i]
    return results


@dataclass(frozen=True)
class ObjectiveParams:
    """An objective's own hyper-parameters (the config's ``objective.<field>`` beside the shared ones)."""

    def kwargs(self, prior: ScorePrior) -> dict[str, Any]:
        """Keyword arguments of the objective function (prompts embedded by ``prior``)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LDParams(ObjectiveParams):
    """weighting: "script" (sqrt(alphas_cumprod[s]) at the DDIM step index), "paper" (sqrt(abar_t)) or "none"."""

    weighting: str = "script"

    def __post_init__(self) -> None:
        _check_choice(self.weighting, LD_WEIGHTINGS, "LD weighting")


@dataclass(frozen=True)
class SDSParams(ObjectiveParams):
    """weighting: "script" (the LD script's SDS switch), "sds" (1 - abar_t), "uniform" or "fantasia3d"."""

    weighting: str = "script"

    def __post_init__(self) -> None:
        _check_choice(self.weighting, SDS_WEIGHTINGS, "SDS weighting")


@dataclass(frozen=True)
class NFSDParams(ObjectiveParams):
    """negative_prompt: the text of eps_neg in delta_D ("" = none: delta_D = eps_u); t_threshold: below it
    delta_D = eps_u."""

    negative_prompt: str = ""
    t_threshold: int = 200

    def kwargs(self, prior: ScorePrior) -> dict[str, Any]:
        negative = prior.embed_prompts(self.negative_prompt) if self.negative_prompt else None
        return {"negative_prompt": negative, "t_threshold": self.t_threshold}


@dataclass(frozen=True)
class DDSParams(ObjectiveParams):
    """DDS has no hyper-parameters of its own (its source prompt is the run's prompt.source_prompt)."""


@dataclass(frozen=True)
class IDSParams(ObjectiveParams):
    """fpr_iterations: N fixed-point steps; fpr_lambda: their step size lambda."""

    fpr_iterations: int = 3
    fpr_lambda: float = 1.0

    def __post_init__(self) -> None:
        if self.fpr_iterations < 0:
            raise ValueError(f"fpr_iterations must be >= 0, got {self.fpr_iterations}")


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective function, the type of its hyper-parameters, and whether its targets need the frozen
    render as source (z_src, y_src: DDS and IDS)."""

    fn: Objective
    params: type[ObjectiveParams]
    needs_source: bool = False


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "ld": ObjectiveSpec(ld, LDParams),
    "sds": ObjectiveSpec(sds, SDSParams),
    "nfsd": ObjectiveSpec(nfsd, NFSDParams),
    "dds": ObjectiveSpec(dds, DDSParams, needs_source=True),
    "ids": ObjectiveSpec(ids, IDSParams, needs_source=True),
}


def get_objective(name: str) -> ObjectiveSpec:
    """The objective registered under ``name`` (ld, sds, nfsd, dds, ids)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}") from None


def run_objective(
    name: str,
    prior: ScorePrior,
    targets: list[DistillTarget],
    params: ObjectiveParams | None = None,
    guidance_scale: float = 7.5,
) -> list[DistillResult]:
    """Dispatch by name with the objective's own parameters (its defaults when None)."""
    spec = get_objective(name)
    params = spec.params() if params is None else params
    if type(params) is not spec.params:
        raise ValueError(f"objective {name!r} takes {spec.params.__name__}, got {type(params).__name__}")
    return spec.fn(prior, targets, guidance_scale=guidance_scale, **params.kwargs(prior))
