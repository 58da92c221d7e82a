"""A score prior conditioned on a style IMAGE: DiffusersPrior + Style Fusion Attention on its UNet.

StyleFusionPrior is a ScorePrior like the one it wraps (a DelegatingPrior: what it does not change is the
wrapped prior's), so objectives, the trainer and the style-views command can use it as a distillation or
denoising target. Each predict_noise call
first writes the reference banks (content and style images, noised to each sample's timestep or
clean) with the appearance UNet, then evaluates the wrapped prior with the fusion processors
installed on its UNet, and takes them off again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from headstyle.attention.banks import ReferenceBank, reference_latents, write_bank
from headstyle.attention.config import StyleFusionConfig
from headstyle.attention.install import install_style_fusion
from headstyle.attention.processors import StyleFusionState
from headstyle.input_files import InputError, read_image
from headstyle.priors.base import DelegatingPrior, NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior


def load_image(path: str | os.PathLike, size: int, mode: str = "RGB") -> Tensor:
    """An image file as a (1, C, size, size) float tensor: RGB in [-1, 1], or a mask ("L") in [0, 1]."""
    img = read_image(path, InputError, "give a PNG or JPEG image")
    arr = np.asarray(img.convert(mode).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    x = torch.from_numpy(arr / 255.0).reshape(size, size, -1).permute(2, 0, 1)[None]
    return x * 2 - 1 if mode == "RGB" else x


class StyleFusionPrior(DelegatingPrior):
    """eps predictions with Style Fusion Attention reading content and style reference banks.

    prior: the DiffusersPrior whose UNet gets the fusion processors (``base``).
    style_latents / style_latents_2: (n, C, h, w) latents of the style image(s)
    (n = 2 for front and back views); a second style is blended with config.alpha. The content
    reference is set with set_content. style_mask: (H, W) in [0, 1], 1 where to stylise, or (n, H, W),
    one per style image; content_mask: the content images' own (H, W) or (n_c, H, W) (default style_mask).
    content_unet / style_unet: the appearance modules (default: the prior's own UNet; a trained Style
    Appearance Module from headstyle.sfa as style_unet, or as both for a shared fine-tuned one).
    seed: the stream of the reference noise, so a run is reproducible.
    differentiable: write the banks with autograd, so a trainable appearance module learns from the loss.
    """

    base: DiffusersPrior

    def __init__(
        self,
        prior: DiffusersPrior,
        style_latents: Tensor,
        style_latents_2: Tensor | None = None,
        config: StyleFusionConfig | None = None,
        style_mask: Tensor | None = None,
        content_unet: nn.Module | None = None,
        style_unet: nn.Module | None = None,
        seed: int = 0,
        differentiable: bool = False,
        content_mask: Tensor | None = None,
    ) -> None:
        super().__init__(prior)
        self.config = config or StyleFusionConfig()
        self.styles = [style_latents] + ([] if style_latents_2 is None else [style_latents_2])
        if len(self.styles) == 2 and self.styles[0].shape != self.styles[1].shape:
            raise ValueError(
                f"the two style references must have the same shape, got {tuple(self.styles[0].shape)} "
                f"and {tuple(self.styles[1].shape)}"
            )
        self.style_mask = style_mask
        self.content_mask = content_mask
        self.content_unet = content_unet or prior.unet
        self.style_unet = style_unet or prior.unet
        self.content: Tensor | None = None
        self.content_per_group = 1
        self.generator = torch.Generator(device=style_latents.device).manual_seed(seed)
        self.differentiable = differentiable

    @property
    def takes_content(self) -> bool:
        """True: the content bank reads the reference given to set_content."""
        return True

    def set_content(self, latents: Tensor | None, images_per_group: int | None = None) -> None:
        """The content reference: (n, C, h, w) latents, one group of n images shared by every sample
        (default), or groups of images_per_group images, one group per sample in query order."""
        if latents is not None:
            per_group = latents.shape[0] if images_per_group is None else images_per_group
            if per_group < 1 or latents.shape[0] % per_group:
                raise ValueError(f"{latents.shape[0]} content latents cannot form groups of {per_group}")
            self.content_per_group = per_group
        self.content = latents

    def _bank(self, unet: nn.Module, x0: Tensor, per_group: int, t: Tensor, names: list[str]) -> ReferenceBank:
        """Write one bank at timesteps t: (1,) shared by all samples, or (S,) one per sample.

        With per-sample timesteps a shared reference is written once per sample, as S groups.
        """
        if t.numel() > 1 and x0.shape[0] == per_group:
            x0 = x0.repeat(t.numel(), 1, 1, 1)
        t_images = t.repeat_interleave(per_group) if t.numel() > 1 else t
        x_ref = reference_latents(
            self.alphas_cumprod, x0.float(), t_images, self.config.reference == "noised", self.generator
        )
        context = self.embed_prompts(self.config.reference_prompt).cond
        return write_bank(unet, x_ref, t_images, context, names, per_group, self.differentiable)

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]:
        """(eps_uncond, eps_cond) per query, the UNet's self-attention fusing the reference banks.

        Banks are written at the queries' timestep when all samples share one, else per sample.
        """
        return self._fused(queries, self.base.predict_noise)

    def predict_noise_cond(self, queries: list[NoiseQuery]) -> list[Tensor]:
        """eps_cond per query through the fused UNet, cond rows only (DiffusersPrior.predict_noise_cond)."""
        return self._fused(queries, self.base.predict_noise_cond)

    def _fused(self, queries: list[NoiseQuery], predict: Callable[[list[NoiseQuery]], list[Any]]) -> list[Any]:
        """``predict(queries)`` with the fusion processors installed and the banks written."""
        if not queries:
            return []
        t = torch.cat([q.t.reshape(-1).expand(q.x_t.shape[0]) for q in queries]).long().to(self.alphas_cumprod.device)
        if self.content is not None and self.content.shape[0] // self.content_per_group not in (1, t.numel()):
            raise ValueError(
                f"{self.content.shape[0] // self.content_per_group} content groups for {t.numel()} samples: "
                "give one shared content group or one per sample"
            )
        t_write = t[:1] if bool((t == t[0]).all()) else t
        cfg = self.config
        state = StyleFusionState(tau=cfg.tau, alpha=cfg.alpha, pairing=cfg.pairing, style_mask=self.style_mask,
                                  content_mask=self.content_mask)
        with install_style_fusion(self.base.unet, state, cfg.layers) as fusion:
            names = fusion.layer_names
            content = None
            if self.content is not None:
                content = self._bank(self.content_unet, self.content, self.content_per_group, t_write, names)
            styles = [self._bank(self.style_unet, s, s.shape[0], t_write, names) for s in self.styles]
            state.set_banks(content, styles)
            return predict(queries)
