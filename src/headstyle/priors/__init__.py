"""Score priors behind one seam (base.ScorePrior): Stable Diffusion + ControlNets, and analytic priors.

A Stable Diffusion prior is named by a PriorSpec and loaded by load_prior (loading.py). The diffusers-backed
parts are imported lazily so that analytic-prior users do not pay for diffusers.
"""

from headstyle.priors.analytic import AnalyticPrior, ExemplarPrior, GaussianPrior, sd_alphas_cumprod
from headstyle.priors.base import (
    CondOnlyPrior,
    ContentReferencePrior,
    Control,
    DelegatingPrior,
    NoiseQuery,
    PromptEmbeds,
    ScorePrior,
    add_noise,
    ddim_timesteps,
)

__all__ = [
    "AnalyticPrior",
    "CondOnlyPrior",
    "ContentReferencePrior",
    "Control",
    "DelegatingPrior",
    "DiffusersPrior",
    "ExemplarPrior",
    "GaussianPrior",
    "NoiseQuery",
    "PriorSpec",
    "PromptEmbeds",
    "ScorePrior",
    "add_noise",
    "ddim_timesteps",
    "load_prior",
    "sd_alphas_cumprod",
]


def __getattr__(name: str):
    if name == "DiffusersPrior":
        from headstyle.priors.diffusers_prior import DiffusersPrior

        return DiffusersPrior
    if name in ("PriorSpec", "load_prior"):
        from headstyle.priors import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'headstyle.priors' has no attribute {name!r}")
