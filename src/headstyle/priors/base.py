"""The ScorePrior seam: noise schedule, latent codec and one batched eps prediction.

Every distillation objective asks a prior the same question: given x_t at timestep t, what
noise does it predict without (eps_uncond) and with (eps_cond) the prompt? The diffusers
prior and the analytic priors answer it through this one interface; a prior that wraps another
(Style Fusion Attention's) derives from DelegatingPrior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, cast, runtime_checkable

import torch
from torch import Tensor


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch: uncond (negative prompt) and cond, each (N, L, D)."""

    uncond: Tensor
    cond: Tensor

    def repeat(self, n: int) -> PromptEmbeds:
        """Broadcast batch-1 embeddings to n samples."""
        if self.cond.shape[0] == n:
            return self
        return PromptEmbeds(self.uncond.expand(n, *self.uncond.shape[1:]), self.cond.expand(n, *self.cond.shape[1:]))


@dataclass
class Control:
    """A ControlNet input for one noise query: which ControlNet, its image in [0, 1], its scale."""

    name: str
    image: Tensor
    scale: float = 1.0


# What a query's images are: single views, or 2x2 grids of four views (LD's grid denoising).
Layout = Literal["view", "grid"]


@dataclass
class NoiseQuery:
    """One group of x_t rows sharing a control, asked of the prior in one call: x_t (N, C, h, w), t (N,),
    prompts, optional control, and the layout of its images (a prior may model a grid as four views)."""

    x_t: Tensor
    t: Tensor
    prompt: PromptEmbeds
    control: Control | None = None
    layout: Layout = "view"


@runtime_checkable
class ScorePrior(Protocol):
    """What objectives and the trainer may ask of a prior.

    alphas_cumprod: (T,) float32 abar_t on the prior's device; device: where it computes.
    predict_noise evaluates the denoiser ONCE over all queries (uncond and cond stacked on the
    batch axis) and returns float32 (eps_uncond, eps_cond) per query, in query order.

    Declared capabilities: image_size, the side of the square images ``encode`` takes;
    control_names, the ControlNets a query may name; takes_content, whether the prior reads a
    per-sample content reference (then it is a ContentReferencePrior); predicts_cond_only, whether
    it predicts eps_cond alone at half the rows (then it is a CondOnlyPrior).
    """

    alphas_cumprod: Tensor
    latent_channels: int
    image_size: int
    control_names: frozenset[str]
    takes_content: bool
    predicts_cond_only: bool
    device: torch.device

    def inference_timesteps(self, num_inference_steps: int) -> Tensor: ...

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds: ...

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]: ...


@runtime_checkable
class ContentReferencePrior(ScorePrior, Protocol):
    """A prior whose predictions read a content reference (Style Fusion Attention's content bank)."""

    def set_content(self, latents: Tensor | None, images_per_group: int | None = None) -> None: ...


@runtime_checkable
class CondOnlyPrior(ScorePrior, Protocol):
    """A prior that also predicts eps_cond alone (one call over the cond rows only: half predict_noise's rows),
    for losses on the conditional prediction without guidance (a denoising loss)."""

    def predict_noise_cond(self, queries: list[NoiseQuery]) -> list[Tensor]: ...


class DelegatingPrior:
    """A ScorePrior answering every member of the seam (ScorePrior, ContentReferencePrior, CondOnlyPrior) from
    the prior it wraps, ``base``. Wrappers derive from it and override only what they change, so a member
    added to the seam is forwarded here once and no wrapper can miss it."""

    def __init__(self, base: ScorePrior) -> None:
        self.base = base

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.base.alphas_cumprod

    @property
    def latent_channels(self) -> int:
        return self.base.latent_channels

    @property
    def image_size(self) -> int:
        return self.base.image_size

    @property
    def control_names(self) -> frozenset[str]:
        return self.base.control_names

    @property
    def takes_content(self) -> bool:
        return self.base.takes_content

    @property
    def predicts_cond_only(self) -> bool:
        return self.base.predicts_cond_only

    @property
    def device(self) -> torch.device:
        return self.base.device

    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        return self.base.inference_timesteps(num_inference_steps)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.base.add_noise(x0, eps, t)

    def encode(self, images: Tensor) -> Tensor:
        return self.base.encode(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.base.decode(latents)

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        return self.base.embed_prompts(prompt, negative_prompt)

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]:
        return self.base.predict_noise(queries)

    def predict_noise_cond(self, queries: list[NoiseQuery]) -> list[Tensor]:
        """The base's eps_cond alone; only a base that declares predicts_cond_only has it."""
        if not self.base.predicts_cond_only:
            raise TypeError(f"{type(self.base).__name__} does not predict eps_cond alone (predicts_cond_only False)")
        return cast(CondOnlyPrior, self.base).predict_noise_cond(queries)

    def set_content(self, latents: Tensor | None, images_per_group: int | None = None) -> None:
        """The base's content reference; only a base that declares takes_content reads one."""
        if not self.base.takes_content:
            raise TypeError(f"{type(self.base).__name__} reads no content reference (takes_content False)")
        cast(ContentReferencePrior, self.base).set_content(latents, images_per_group)


def add_noise(alphas_cumprod: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in float32 (DDPM forward process)."""
    abar = alphas_cumprod.to(x0.device)[t.long()].float().reshape(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 1) -> Tensor:
    """DDIM "leading" spacing as SD 1.5's scheduler config uses: descending, e.g. 981, 961, ..., 1."""
    ratio = num_train_timesteps // num_inference_steps
    steps = torch.arange(num_inference_steps, dtype=torch.long).flip(0) * ratio + steps_offset
    return steps
