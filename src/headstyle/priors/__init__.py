"""Score priors behind one seam (base.ScorePrior): Stable Diffusion + ControlNets, and analytic priors.

The diffusers-backed prior is imported lazily so that analytic-prior users do not pay for diffusers.
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
    "PromptEmbeds",
    "ScorePrior",
    "add_noise",
    "ddim_timesteps",
    "sd_alphas_cumprod",
]


def __getattr__(name: str):
    if name == "DiffusersPrior":
        from headstyle.priors.diffusers_prior import DiffusersPrior

        return DiffusersPrior
    raise AttributeError(f"module 'headstyle.priors' has no attribute {name!r}")
