"""The lab prior's models (an SD-1.5-shaped VAE, UNet, ControlNets and CLIP text encoder, built from the recipe)
and their losses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.io import atomic_dir
from headstyle.lab.prior.recipe import CONTROLNETS, SCHEDULER_CONFIG, TrainPriorConfig, prompt_table, stream
from headstyle.priors.sd_folder import write_clip_tokenizer


def build_vae(cfg: TrainPriorConfig, image_size: int) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(cfg, "init.vae"))
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=cfg.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=min(8, cfg.vae_channels[0]),
            sample_size=image_size,
        )


def build_unet(cfg: TrainPriorConfig, latent_size: int) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(cfg, "init.unet"))
        return UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=cfg.unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cfg.text_width,
            attention_head_dim=8,
            norm_num_groups=min(8, cfg.unet_channels[0]),
            addition_embed_type="text" if cfg.text_pool else None,
            addition_embed_type_num_heads=8,
        )


def build_controlnet(cfg: TrainPriorConfig, unet: nn.Module, name: str) -> nn.Module:
    """ControlNetModel.from_unet (encoder copied from the trained UNet, zero convolutions at zero)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(cfg, "init.controlnet") + CONTROLNETS.index(name))
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cfg.controlnet_channels)
        if cfg.text_pool:
            # from_unet leaves the pooling's head count at ControlNetModel's default: give it the UNet's, so
            # the copied pooled-prompt embedding computes what the UNet's does.
            weights, heads = net.state_dict(), unet.config.addition_embed_type_num_heads
            net = ControlNetModel.from_config(net.config, addition_embed_type_num_heads=heads)
            net.load_state_dict(weights)
        return net


def prompt_words() -> list[str]:
    """The words of every phrasing, in first-seen order (commas split off, as CLIP's pre-tokeniser does)."""
    words = (w for p in prompt_table() for w in p.replace(",", " ").split())
    return list(dict.fromkeys(words))


def build_text(folder: Path, cfg: TrainPriorConfig) -> None:
    """Write tokenizer/ and a frozen random text_encoder/ into the model folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with atomic_dir(folder / "tokenizer") as tmp:
        vocab_size = write_clip_tokenizer(tmp, prompt_words())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(cfg, "init.text"))
        encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.text_width,
                intermediate_size=2 * cfg.text_width,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    with atomic_dir(folder / "text_encoder") as tmp:
        encoder.save_pretrained(tmp)


@torch.no_grad()
def embed_prompts(folder: Path, prompts: list[str]) -> Tensor:
    """Last hidden states (P, 77, D) of the saved tokenizer + text encoder (what DiffusersPrior feeds the UNet)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return enc(ids.input_ids)[0]


def ddim_scheduler() -> Any:
    """DDIM with Stable Diffusion 1.5's configuration."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def vae_loss(vae: nn.Module, images: Tensor, gen: torch.Generator, kl_weight: float) -> Tensor:
    """MSE of the reconstruction from a posterior sample + kl_weight * KL(q(z|x) || N(0, I)) (per latent element)."""
    post = vae.encode(images).latent_dist
    recon = vae.decode(post.sample(generator=gen)).sample
    kl = post.kl().mean() / post.mean[0].numel()
    return F.mse_loss(recon.float(), images.float()) + kl_weight * kl


@torch.no_grad()
def encode_latents(vae: nn.Module, images: Tensor, gen: torch.Generator) -> Tensor:
    """scaling_factor * a posterior sample (what SD trained its UNet on)."""
    return vae.encode(images).latent_dist.sample(generator=gen) * vae.config.scaling_factor


def eps_loss(
    unet: nn.Module,
    latents: Tensor,
    text: Tensor,
    alphas_cumprod: Tensor,
    gen: torch.Generator,
    residuals: Callable[[Tensor, Tensor], tuple[list[Tensor], Tensor]] | None = None,
) -> Tensor:
    """E_t,eps || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, text) ||^2, t ~ U{0..999}.

    residuals(x_t, t): ControlNet residuals added to the UNet (the controlnet stage).
    """
    t = torch.randint(len(alphas_cumprod), (latents.shape[0],), generator=gen)
    eps = torch.randn(latents.shape, generator=gen)
    abar = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * eps
    down, mid = residuals(x_t, t) if residuals is not None else (None, None)
    pred = unet(
        x_t, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    return F.mse_loss(pred.float(), eps)
