"""Tiny but real Stable Diffusion 1.5-family models for tests and benchmarks (no network needed).

build_tiny_sd(root) builds a UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer
(own byte-level BPE vocab.json/merges.txt), an SD 1.5 DDIMScheduler and two ControlNetModels
(canny, depth; made with ControlNetModel.from_unet so their blocks match the UNet), and saves them
with save_pretrained in the layout of a hub SD repo:

    root/tiny-sd/{model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/}
    root/tiny-vae/                 the same VAE alone (for the "noVAE model + separate VAE" path)
    root/controlnet-canny/, root/controlnet-depth/

Images are IMAGE_SIZE = 64 px; the 3-level VAE downsamples by 4 to LATENT_SIZE = 16 px latents
with 4 channels; ControlNet control images are 64 px. Weights are random but deterministic in the
seed; ControlNet zero-convolutions get small random weights so controls visibly change eps.
Loading goes through the same from_pretrained path as real checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from headstyle.io import atomic_dir
from headstyle.priors.sd_folder import write_clip_tokenizer, write_model_index

IMAGE_SIZE = 64
LATENT_SIZE = 16
CROSS_ATTENTION_DIM = 32
_MARKER = "headstyle_tiny_sd.json"
_WORDS = ["portrait", "of", "a", "the", "werewolf", "pixar", "joker", "zombie", "statue", "sketch", "style", "face"]


@dataclass(frozen=True)
class TinySD:
    """Paths of a saved tiny SD family: model folder, standalone VAE folder and ControlNet folders."""

    model: Path
    vae: Path
    controlnets: dict[str, Path]
    image_size: int = IMAGE_SIZE
    latent_size: int = LATENT_SIZE


def _randomise_zero_convs(controlnet: torch.nn.Module, std: float) -> None:
    """ControlNets start with zero convolutions (no effect); give them weights so tests can see controls."""
    zero_modules = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_modules.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for module in zero_modules:
            module.weight.normal_(0.0, std)
            module.bias.normal_(0.0, std)


def _build(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    model = folder / "tiny-sd"
    vocab_size = write_clip_tokenizer(model / "tokenizer", _WORDS)
    CLIPTokenizer.from_pretrained(model / "tokenizer")  # fail here, not in a test, if the files are unreadable

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CROSS_ATTENTION_DIM,
            attention_head_dim=2,
            norm_num_groups=4,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=IMAGE_SIZE,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=CROSS_ATTENTION_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                layer_norm_eps=1e-5,
            )
        )
        controlnets = {}
        for i, name in enumerate(("canny", "depth")):
            torch.manual_seed(seed + 3 + i)
            cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
            _randomise_zero_convs(cn, std=0.05)
            controlnets[name] = cn

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    unet.save_pretrained(model / "unet")
    vae.save_pretrained(model / "vae")
    vae.save_pretrained(folder / "tiny-vae")
    text_encoder.save_pretrained(model / "text_encoder")
    scheduler.save_pretrained(model / "scheduler")
    for name, cn in controlnets.items():
        cn.save_pretrained(folder / f"controlnet-{name}")
    write_model_index(model)
    (folder / _MARKER).write_text(json.dumps({"seed": seed}), encoding="utf-8")


def _built(folder: Path) -> bool:
    """Whether ``folder`` holds a complete tiny SD family (its marker is written last)."""
    return (folder / _MARKER).is_file()


def build_tiny_sd(root: str | os.PathLike, seed: int = 0) -> TinySD:
    """Build (or reuse, if already built with this seed) the tiny SD family under root/seed-<seed>.

    Safe to call from several tests: the folder is built in a temp dir beside it and moved into
    place atomically, so a half-written model is never seen.
    """
    root = Path(root)
    folder = root / f"seed-{seed}"
    if not _built(folder):
        with atomic_dir(folder, keep=_built) as tmp:  # another caller may finish first: its folder stays
            _build(tmp, seed)
    return TinySD(
        model=folder / "tiny-sd",
        vae=folder / "tiny-vae",
        controlnets={"canny": folder / "controlnet-canny", "depth": folder / "controlnet-depth"},
    )
