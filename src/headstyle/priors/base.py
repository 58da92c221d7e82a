"""The ScorePrior seam: noise schedule, latent codec and one batched eps prediction.

Every distillation objective asks a prior the same question: given x_t at timestep t, what
noise does it predict without (eps_uncond) and with (eps_cond) the prompt? The diffusers
prior and the analytic priors answer it through this one interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

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
    """A ControlNet input for one branch: which ControlNet, its image in [0, 1], its scale."""

    name: str
    image: Tensor
    scale: float = 1.0


# What a branch's images are: single views, or 2x2 grids of four views (LD's grid denoising).
Layout = Literal["view", "grid"]


@dataclass
class Branch:
    """One group of samples sharing a control: x_t (N, C, h, w), t (N,), prompts, optional control,
    and the layout of its images (a prior may model a grid as four views)."""

    x_t: Tensor
    t: Tensor
    prompt: PromptEmbeds
    control: Control | None = None
    layout: Layout = "view"


@runtime_checkable
class ScorePrior(Protocol):
    """What objectives and the trainer may ask of a prior.

    alphas_cumprod: (T,) float32 abar_t on the prior's device.
    predict_noise evaluates the denoiser ONCE over all branches (uncond and cond stacked on the
    batch axis) and returns float32 (eps_uncond, eps_cond) per branch, in branch order.

    Declared capabilities: image_size, the side of the square images ``encode`` takes;
    control_names, the ControlNets a branch may name; takes_content, whether the prior reads a
    per-sample content reference (then it is a ContentReferencePrior).
    """

    alphas_cumprod: Tensor
    latent_channels: int
    image_size: int
    control_names: frozenset[str]
    takes_content: bool

    def inference_timesteps(self, num_inference_steps: int) -> Tensor: ...

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds: ...

    def predict_noise(self, branches: list[Branch]) -> list[tuple[Tensor, Tensor]]: ...


@runtime_checkable
class ContentReferencePrior(ScorePrior, Protocol):
    """A prior whose predictions read a content reference (Style Fusion Attention's content bank)."""

    def set_content(self, latents: Tensor | None, images_per_group: int | None = None) -> None: ...


def add_noise(alphas_cumprod: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in float32 (DDPM forward process)."""
    abar = alphas_cumprod.to(x0.device)[t.long()].float().reshape(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0.float() + (1 - abar).sqrt() * eps.float()


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 1) -> Tensor:
    """DDIM "leading" spacing as SD 1.5's scheduler config uses: descending, e.g. 981, 961, ..., 1."""
    ratio = num_train_timesteps // num_inference_steps
    steps = torch.arange(num_inference_steps, dtype=torch.long).flip(0) * ratio + steps_offset
    return steps
