"""Stylising rendered views of a head from a style image (the `headstyle style-views` command's library side).

Each view is rendered by the generator, encoded, noised to strength * T and denoised with DDIM
through the prior with Style Fusion Attention: the content reference is the head's front and back
renders (DiffStyle360's I_content / I_content_back, the same for every view) or the view itself, and
the view's own rendered depth drives the depth ControlNet, so every view keeps the generator's geometry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from headstyle.attention.config import REFERENCE_YAWS, SamplingConfig, StyleViewsConfig
from headstyle.attention.prior import StyleFusionPrior
from headstyle.cameras import cameras
from headstyle.distill.objectives import guided_eps
from headstyle.distill.shaping import resize_to
from headstyle.export import render_view, save_grid, save_image, save_turntable, to_uint8, view_name
from headstyle.generator.base import Generator, RenderOutput
from headstyle.generator.latents import Latent
from headstyle.priors import controls
from headstyle.priors.base import Control, NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.progress import progress_bar


@torch.no_grad()
def stylize_image(
    sfa: StyleFusionPrior,
    image: Tensor,
    control: Control | None,
    sampling: SamplingConfig,
    generator: torch.Generator,
    content: Tensor | None = None,
) -> Tensor:
    """img2img of (B, 3, S, S) images in [-1, 1] with DDIM through ``sfa``.

    content: latents (n, C, h, w) of the content reference shared by the batch (e.g. a head's front and
    back views, as DiffStyle360 pairs them); default the image itself (then B = 1).
    """
    prompt = sfa.embed_prompts(sampling.prompt, sampling.negative_prompt)
    timesteps = sfa.inference_timesteps(sampling.steps)
    timesteps = timesteps[sampling.steps - int(sampling.steps * sampling.strength) :]
    x0 = sfa.encode(image)
    if content is None and x0.shape[0] != 1:
        raise ValueError(f"{x0.shape[0]} images need a content reference: each would be the others' content")
    sfa.set_content(x0 if content is None else content)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x = sfa.add_noise(x0, eps, timesteps[:1])
    for t in timesteps:
        eps_u, eps_c = sfa.predict_noise([NoiseQuery(x, t.reshape(1), prompt, control)])[0]
        x = sfa.base.scheduler.step(guided_eps(eps_u, eps_c, sampling.guidance_scale), t, x).prev_sample
    sfa.set_content(None)
    return sfa.decode(x)


def as_views(x: Tensor, views: int) -> Tensor:
    """A style reference (n, ...) as the bank's ``views`` images: a single front view stands in for the back
    too (DiffStyle360 makes I_style_back with a back-view generation module, which headstyle does not have),
    so that the style bank holds as many images as the front/back content bank (the paper's pairing of
    K_hat with V_s needs that)."""
    if x.shape[0] == views:
        return x
    if x.shape[0] == 1:
        return x.expand(views, *x.shape[1:])
    raise ValueError(f"the style has {x.shape[0]} views where the content bank has {views}: give the style's "
                     "front (and back) with content front_back, one style image with content view")  # fmt: skip


def stylize_views(
    G: Generator,
    prior: DiffusersPrior,
    latents: Sequence[Latent],
    style_image: Tensor,
    config: StyleViewsConfig,
    style_image_2: Tensor | None = None,
    style_mask: Tensor | None = None,
    show_progress: bool = True,
    content_unet: nn.Module | None = None,
    style_unet: nn.Module | None = None,
    content_masks: Callable[[Tensor], Tensor] | None = None,
) -> list[Path]:
    """Write into config.views.out, per latent, a stylised PNG and its render per view, a sheet (renders over
    stylised views) and a turntable GIF (+ MP4 with ffmpeg) of the stylised views. Returns the paths.

    prior: a DiffusersPrior; its "depth" ControlNet, when loaded, gets the rendered depth.
    style_image: (n, 3, H, W) in [-1, 1], the style's front view and optionally its back (n = 2);
    style_image_2: a second style of the same n; style_mask: (H, W) or (n, H, W) in [0, 1], 1 = stylise.
    content_unet / style_unet: appearance modules (a trained Style Appearance Module, headstyle.sfa);
    default: the prior's own UNet writes both banks. content_masks: a content reference (1, 3, S, S) -> its
    own mask (H, W) (e.g. its parsed face regions; written as <view>_mask.png, or with config.views.content
    "front_back" as <seed>_content_mask.png); default style_mask.
    """
    v, sampling = config.views, config.sampling
    size = prior.image_size
    views = len(REFERENCE_YAWS) if v.content == "front_back" else 1
    style_latents = [None if s is None else as_views(prior.encode(resize_to(s, size)), views)
                     for s in (style_image, style_image_2)]  # fmt: skip
    if style_mask is not None and style_mask.dim() == 3:
        style_mask = as_views(style_mask, views)
    sfa = StyleFusionPrior(prior, style_latents[0], style_latents[1], config.fusion, style_mask, content_unet,
                           style_unet, seed=sampling.seed)
    generator = torch.Generator().manual_seed(sampling.seed)
    use_depth = "depth" in prior.control_names
    yaws, pitch = [math.radians(y) for y in v.yaws], math.radians(v.pitch)
    out = Path(v.out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task("stylising views", total=len(latents) * len(yaws))
        for latent in latents:
            renders, stylised = [], []
            content = None
            if v.content == "front_back":
                refs = torch.cat([_view_image(render_view(G, latent, cameras(yaw, 0.0), v.render_sr), v.render_sr, size)
                                  for yaw in REFERENCE_YAWS])  # fmt: skip
                content = prior.encode(refs.to(prior.device))
                if content_masks is not None:
                    sfa.content_mask = torch.stack([content_masks(r[None].to(prior.device)) for r in refs])
                    mask_images = sfa.content_mask.cpu()[:, None].expand(-1, 3, -1, -1) * 2 - 1
                    written.append(save_grid(mask_images, out / f"{latent.name}_content_mask.png", len(refs), pad=0))
            for yaw in yaws:
                r = render_view(G, latent, cameras(yaw, pitch), v.render_sr)
                image = _view_image(r, v.render_sr, size)
                control = None
                if use_depth:
                    depth = controls.depth_control(resize_to(r.depth, size), resize_to(r.mask, size))
                    control = Control("depth", depth, sampling.control_scale)
                stem = out / view_name(latent, yaw, pitch)
                if content_masks is not None and content is None:
                    sfa.content_mask = content_masks(image.to(prior.device))
                    written.append(save_image(sfa.content_mask.cpu().expand(3, -1, -1) * 2 - 1, f"{stem}_mask.png"))
                styled = stylize_image(sfa, image.to(prior.device), control, sampling, generator, content)
                written.append(save_image(styled[0], stem.with_suffix(".png")))
                written.append(save_image(image[0], f"{stem}_render.png"))
                renders.append(image.cpu())
                stylised.append(styled.cpu())
                bar.update(task, advance=1)
            sheet = torch.cat(renders + stylised)
            written.append(save_grid(sheet, out / f"{latent.name}_style_views.png", cols=len(yaws)))
            written += save_turntable(to_uint8(torch.cat(stylised)), out / f"{latent.name}_style_turntable", v.fps)
    return written


def _view_image(r: RenderOutput, render_sr: bool, size: int) -> Tensor:
    """The image of a render at the prior's size: the super-resolved one, or the raw neural render upsampled."""
    return resize_to(r.image if render_sr else r.image_raw, size)
