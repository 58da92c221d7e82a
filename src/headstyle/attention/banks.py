"""Reference banks: the appearance module's per-layer self-attention inputs for content and style images.

A write pass runs a UNet (the main one or a copy, the "appearance module") on a reference latent
at the current timestep and stores, for every self-attention layer, its post-norm1 hidden states
F (before W_K, W_V): the main UNet's Style Fusion Attention projects them with its own weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from headstyle.attention.layers import self_attention_layers, swapped_processors
from headstyle.priors.base import add_noise


@dataclass
class ReferenceBank:
    """Per-layer features (G, num_images * N_layer, C) of one reference set (content, or one style).

    G groups: 1 for a reference shared by the whole batch, or one per sample group; the
    num_images images of a group (e.g. front and back views) are concatenated on the token axis.
    latent_hw: the reference latent's (h, w), which fixes every layer's token grid.
    """

    features: dict[str, Tensor]
    num_images: int
    latent_hw: tuple[int, int]

    @property
    def groups(self) -> int:
        return next(iter(self.features.values())).shape[0]


class BankWriter(AttnProcessor2_0):
    """Stock SDPA self-attention that also records its input hidden states under its layer name
    (detached, unless ``keep_grad``: a trainable appearance module learns through its bank)."""

    def __init__(self, name: str, store: dict[str, Tensor], keep_grad: bool = False) -> None:
        super().__init__()
        self.name = name
        self.store = store
        self.keep_grad = keep_grad

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        self.store[self.name] = hidden_states if self.keep_grad else hidden_states.detach()
        return super().__call__(attn, hidden_states, *args, **kwargs)


def reference_latents(
    alphas_cumprod: Tensor, x0: Tensor, t: Tensor, noised: bool, generator: torch.Generator | None = None
) -> Tensor:
    """The latent the appearance module sees at timestep t: x0 noised to x_t (fresh eps), or x0 itself."""
    if not noised:
        return x0
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    return add_noise(alphas_cumprod, x0, eps, t.expand(x0.shape[0])).to(x0.dtype)


def write_bank(
    unet: nn.Module,
    latents: Tensor,
    t: Tensor | int,
    encoder_hidden_states: Tensor,
    layers: Iterable[str] | None = None,
    images_per_group: int | None = None,
    differentiable: bool = False,
) -> ReferenceBank:
    """One write pass of ``unet`` over reference latents (n, C, h, w) at timestep t.

    encoder_hidden_states (1 or n, L, D) is the text conditioning of the pass. images_per_group
    (default n: one group) splits the n images into groups of that many, one group per sample.
    Self-attention runs as stock SDPA during the pass; the UNet's own processors are restored after it.
    differentiable: run with autograd and keep the bank's graph, so a trainable appearance module (the
    Style Appearance Module, headstyle.sfa) gets gradients from the main UNet's loss.
    """
    n = latents.shape[0]
    per_group = n if images_per_group is None else images_per_group
    if per_group < 1 or n % per_group:
        raise ValueError(f"{n} reference latents cannot be split into groups of {per_group}")
    all_layers = self_attention_layers(unet)
    names = list(all_layers) if layers is None else list(layers)
    missing = [name for name in names if name not in all_layers]
    if missing:
        raise ValueError(f"the write UNet has no self-attention layers {missing}: it must match the main UNet")
    store: dict[str, Tensor] = {}
    dtype = next(unet.parameters()).dtype
    timesteps = torch.as_tensor(t, device=latents.device).reshape(-1).expand(n)
    context = encoder_hidden_states.to(dtype).expand(n, -1, -1)
    # Every self-attention layer gets a stock processor, so installed fusion processors stay out of the pass.
    chosen = set(names)
    def make(name: str) -> AttnProcessor2_0:
        return BankWriter(name, store, differentiable) if name in chosen else AttnProcessor2_0()

    with torch.set_grad_enabled(differentiable), swapped_processors(all_layers, make):
        unet(latents.to(dtype), timesteps, encoder_hidden_states=context)
    features = {
        name: store[name].reshape(n // per_group, per_group * store[name].shape[1], store[name].shape[2])
        for name in names
    }
    return ReferenceBank(features, per_group, (latents.shape[-2], latents.shape[-1]))
