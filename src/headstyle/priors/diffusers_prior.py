"""Stable Diffusion 1.x-family score prior with ControlNets, through diffusers.

The default model is the likelihood-distillation script's (Realistic Vision v5.1 "noVAE", its own vae/ as
the script's pipeline encodes with); ControlNets are the caller's (the script's: lllyasviel's SD 1.5 canny
and depth, priors.defaults); every one may be a local folder. predict_noise evaluates the UNet once over
[uncond; cond] of all noise queries; each query's ControlNet runs on that query's samples only and its
residuals are placed at its rows (zeros elsewhere), so one call serves e.g. a canny-controlled view and a
depth-controlled 2x2 grid.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.input_files import read_json_object
from headstyle.priors.base import Control, NoiseQuery, PromptEmbeds, add_noise
from headstyle.priors.defaults import DEFAULT_CONTROLNETS, DEFAULT_MODEL, DEFAULT_VAE
from headstyle.weight_files import load_diffusers, load_transformers

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_vae(model: str | os.PathLike, vae: str | os.PathLike) -> str | os.PathLike | None:
    """The VAE a run loads: "" = the model's own vae/ (None for from_pretrained; the LD script's, pipe.vae);
    "auto" = the model's own when ``model`` is a local folder with a vae/, else sd-vae-ft-mse (the VAE the
    noVAE single-file checkpoints are meant to be paired with); anything else is a VAE folder or hub id."""
    if vae == "auto":
        return None if (Path(model) / "vae").is_dir() else DEFAULT_VAE
    return vae or None


class PriorLoadError(ValueError):
    """A model could not be loaded; the message says what to download and where to put it."""


def is_hub_offline() -> bool:
    """True when Hugging Face hub access is switched off (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _download_hint(repo_id: str, what: str, option: str) -> str:
    folder = f"checkpoints/{repo_id.split('/')[-1]}"
    why = "the hub is offline (HF_HUB_OFFLINE=1)" if is_hub_offline() else "it could not be fetched from the hub"
    return (
        f"{what} {repo_id!r} is not a local folder and {why}. Download it where there is network, e.g. "
        f"`hf download {repo_id} --local-dir {folder}`, copy that folder here and pass its path as {option}. "
        f"(If {repo_id!r} was meant as a local folder: it does not exist.)"
    )


def _resolve(source: str | os.PathLike, what: str, option: str) -> tuple[str, bool]:
    """(source as a string, is_local). Hub ids are 'owner/name'; anything else must be an existing folder."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PriorLoadError(
                f"{what} {text!r} is a file; a diffusers-format folder is needed (with config.json and "
                f"*.safetensors, as saved by save_pretrained). Single-file .ckpt/.safetensors checkpoints can "
                f"be converted with diffusers' conversion scripts; pass the resulting folder as {option}."
            )
        return str(path), True
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return text, False
    raise PriorLoadError(
        f"{what} folder {text!r} does not exist; pass an existing local folder or a hub id as {option}."
    )


def _hub_call(fn, source: str, is_local: bool, what: str, option: str, subfolder: str | None = None, **kw):
    """fn(source, subfolder=..., **kw) (a from_pretrained or load_config), with errors that say what to do."""
    if is_local:
        config_dir = Path(source) / subfolder if subfolder else Path(source)
        if not config_dir.is_dir() or not any(config_dir.iterdir()):
            raise PriorLoadError(
                f"{what}: {config_dir} is missing or empty; {option} must be a diffusers-format folder."
            )
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        return fn(source, **kwargs, **kw)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        if is_local:
            where = source + ("/" + subfolder if subfolder else "")
            raise PriorLoadError(f"could not load {what} from {where} ({type(err).__name__}: {err})") from err
        raise PriorLoadError(_download_hint(source, what, option)) from err


def _load_weights(load, cls, source: str, is_local: bool, what: str, option: str, subfolder: str | None = None, **kw):
    """A model's weights: from a local folder through ``load`` (headstyle.weight_files.load_diffusers or
    load_transformers: the config is checked against the stored weights before any weight exists, and a
    missing weight is refused, not initialised), from the hub as _hub_call does."""
    if not is_local:
        return _hub_call(cls.from_pretrained, source, is_local, what, option, subfolder, **kw)
    folder = Path(source) / subfolder if subfolder else Path(source)
    return load(cls, folder, PriorLoadError, f"{option} must be a diffusers-format folder with safetensors weights "
                f"({what})", **kw)  # fmt: skip


def _check_model_folder(folder: Path, vae_given: bool) -> None:
    index = folder / "model_index.json"
    if index.is_file():
        cls_name = str(read_json_object(index, PriorLoadError, "give a diffusers model folder").get("_class_name", ""))
        if "XL" in cls_name or "StableDiffusion3" in cls_name or "Flux" in cls_name:
            raise PriorLoadError(
                f"{folder} holds a {cls_name} model; this prior needs a Stable Diffusion 1.x-family model "
                f"(e.g. {DEFAULT_MODEL} or stable-diffusion-v1-5/stable-diffusion-v1-5)."
            )
    needed = ["unet", "text_encoder", "tokenizer", "scheduler"] + ([] if vae_given else ["vae"])
    missing = [n for n in needed if not (folder / n).is_dir()]
    if missing:
        hint = " (or pass a separate VAE, e.g. vae=" + repr(DEFAULT_VAE) + ")" if missing == ["vae"] else ""
        raise PriorLoadError(
            f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/ {hint}. "
            f"Download e.g. `hf download {DEFAULT_MODEL} --local-dir checkpoints/Realistic_Vision_V5.1_noVAE`."
        )


def _check_family(unet: Mapping, text_hidden: int, vae: Mapping, scheduler: Mapping, controlnets: Mapping, model: str):
    """Reject configs that do not fit together as an SD 1.x eps-prediction family (before loading weights)."""
    problems = []
    # "text" (DeepFloyd IF's pooled prompt in the timestep embedding) reads only the prompt's hidden states; the
    # other kinds need added_cond_kwargs (SDXL's pooled embeds and time ids, Kandinsky's image embeds).
    if unet.get("addition_embed_type") not in (None, "text"):
        problems.append(f"its UNet uses addition_embed_type={unet['addition_embed_type']!r} (an SDXL-style model)")
    if unet.get("in_channels", 4) != 4:
        problems.append(f"its UNet takes {unet['in_channels']} input channels (an inpainting/depth2img model)")
    if unet.get("cross_attention_dim") != text_hidden:
        problems.append(
            f"UNet cross_attention_dim {unet.get('cross_attention_dim')} != text encoder width {text_hidden}"
        )
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        problems.append(f"it predicts {scheduler['prediction_type']!r}, not epsilon (an SD 2.x v-model?)")
    if vae.get("latent_channels", 4) != unet.get("in_channels", 4):
        problems.append(f"the VAE has {vae.get('latent_channels')} latent channels, the UNet {unet.get('in_channels')}")
    if problems:
        raise PriorLoadError(
            f"{model} is not a Stable Diffusion 1.x-family text-to-image model: {'; '.join(problems)}. "
            f"Use e.g. {DEFAULT_MODEL} or stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    keys = ("block_out_channels", "cross_attention_dim", "layers_per_block")
    for name, cc in controlnets.items():
        if any(_norm(cc.get(k)) != _norm(unet.get(k)) for k in keys):
            mine = ", ".join(f"{k}={_norm(cc.get(k))}" for k in keys)
            base = ", ".join(f"{k}={_norm(unet.get(k))}" for k in keys)
            raise PriorLoadError(
                f"ControlNet {name!r} was made for another base model ({mine}; the UNet has {base}). "
                f"Use SD 1.5 ControlNets, e.g. {DEFAULT_CONTROLNETS.get(name, DEFAULT_CONTROLNETS['canny'])}."
            )


def _norm(v):
    return tuple(v) if isinstance(v, list | tuple) else v


def _resolve_precision(
    device: torch.device | str | None, dtype: torch.dtype | None, vae_dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """Defaults: CUDA if present; fp16 weights on CUDA, fp32 on CPU; an fp32 VAE under fp16 weights."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype, vae_dtype or (torch.float32 if dtype == torch.float16 else dtype)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen eval module on device in dtype (casting only when needed: diffusers warns on needless casts)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


class DiffusersPrior:
    """ScorePrior backed by a diffusers UNet2DConditionModel, AutoencoderKL, CLIP text encoder and ControlNets.

    dtype: weight dtype of UNet, ControlNets and text encoder; the VAE stays float32 when dtype is
    float16 (fp16 VAEs overflow to NaN). latent_sample: "sample" draws from the VAE posterior like
    the LD script, "mean" takes its mean. offload_text_encoder: keep the text encoder on the CPU
    between prompt embeddings (embeddings are cached per prompt).
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        controlnets: Mapping[str, torch.nn.Module] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        latent_sample: Literal["sample", "mean"] = "sample",
        channels_last: bool = False,
        offload_text_encoder: bool = True,
    ) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.device, self.dtype, self.vae_dtype = _resolve_precision(device, dtype, vae_dtype)
        if latent_sample not in ("sample", "mean"):
            raise ValueError(f"latent_sample must be 'sample' or 'mean', got {latent_sample!r}")
        self.latent_sample = latent_sample
        self.offload_text_encoder = offload_text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.unet = _place(unet, self.device, self.dtype)
        self.vae = _place(vae, self.device, self.vae_dtype)
        self.controlnets = {name: _place(cn, self.device, self.dtype) for name, cn in (controlnets or {}).items()}
        text_device = torch.device("cpu") if offload_text_encoder else self.device
        self.text_encoder = _place(text_encoder, text_device, self.dtype)
        for net in [self.unet, *self.controlnets.values()]:
            net.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA
            if channels_last:
                net.to(memory_format=torch.channels_last)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.latent_channels = int(unet.config.in_channels)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._embeds: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        vae: str | os.PathLike | None = None,
        controlnets: Mapping[str, str | os.PathLike] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype | None = None,
        **options,
    ) -> DiffusersPrior:
        """Load from hub ids or local folders (see module defaults).

        model: an SD 1.x diffusers folder/repo (unet/, text_encoder/, tokenizer/, scheduler/, vae/).
        vae: a separate AutoencoderKL folder/repo; None (the default) uses the model's own vae/.
        controlnets: name -> ControlNet folder/repo; None (the default) loads none. So a complete SD folder loads
        offline with nothing else given.
        The scheduler is a DDIMScheduler built from the model's scheduler config. device, dtype,
        vae_dtype and options (latent_sample, channels_last, offload_text_encoder): as DiffusersPrior().
        """
        from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoModel, CLIPTextConfig, CLIPTokenizer

        device, dtype, vae_dtype = _resolve_precision(device, dtype, vae_dtype)
        controlnets = controlnets or {}
        src, local = _resolve(model, "model", "model")
        if local:
            _check_model_folder(Path(src), vae_given=vae is not None)
        if vae is None:
            vsrc, vlocal, vsub, vopt = src, local, "vae", "model"
        else:
            vsrc, vlocal = _resolve(vae, "VAE", "vae")
            vsub = "vae" if vlocal and not (Path(vsrc) / "config.json").is_file() else None
            vopt = "vae"
        cn_src = {
            name: _resolve(path, f"ControlNet {name!r}", f"controlnets[{name!r}]") for name, path in controlnets.items()
        }

        # configs first: a wrong model family fails here with a clear message instead of deep inside a constructor
        _check_family(
            _hub_call(UNet2DConditionModel.load_config, src, local, "UNet", "model", "unet"),
            _hub_call(CLIPTextConfig.from_pretrained, src, local, "text encoder", "model", "text_encoder").hidden_size,
            _hub_call(AutoencoderKL.load_config, vsrc, vlocal, "VAE", vopt, vsub),
            _hub_call(DDIMScheduler.load_config, src, local, "scheduler", "model", "scheduler"),
            {
                name: _hub_call(ControlNetModel.load_config, c, cl, f"ControlNet {name!r}", f"controlnets[{name!r}]")
                for name, (c, cl) in cn_src.items()
            },
            os.fspath(model),
        )
        unet = _load_weights(load_diffusers, UNet2DConditionModel, src, local, "UNet", "model", "unet",
                             torch_dtype=dtype)  # fmt: skip
        text_encoder = _load_weights(load_transformers, AutoModel, src, local, "text encoder", "model", "text_encoder",
                                     dtype=dtype)  # fmt: skip
        tokenizer = _hub_call(CLIPTokenizer.from_pretrained, src, local, "tokenizer", "model", "tokenizer")
        scheduler = _hub_call(DDIMScheduler.from_pretrained, src, local, "scheduler", "model", "scheduler")
        vae_model = _load_weights(load_diffusers, AutoencoderKL, vsrc, vlocal, "VAE", vopt, vsub, torch_dtype=vae_dtype)
        nets = {
            name: _load_weights(load_diffusers, ControlNetModel, c, cl, f"ControlNet {name!r}",
                                f"controlnets[{name!r}]", torch_dtype=dtype)
            for name, (c, cl) in cn_src.items()
        }
        return cls(
            unet, vae_model, text_encoder, tokenizer, scheduler, nets,
            device=device, dtype=dtype, vae_dtype=vae_dtype, **options,
        )  # fmt: skip

    takes_content = False
    predicts_cond_only = True

    def with_unet(self, unet: torch.nn.Module) -> DiffusersPrior:
        """This prior with another UNet of the same architecture (e.g. one carrying a trained LoRA); the VAE,
        text encoder, ControlNets, scheduler and prompt cache are shared, this prior is left as it is."""
        if dict(unet.config) != dict(self.unet.config):
            raise ValueError("with_unet needs a UNet of the same architecture (its config differs)")
        other = copy.copy(self)
        other.unet = unet
        return other

    @property
    def control_names(self) -> frozenset[str]:
        return frozenset(self.controlnets)

    @property
    def image_size(self) -> int:
        """The resolution the UNet was trained at (512 for SD 1.5)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        """The DDIM timesteps of the model's scheduler config (SD 1.5: leading spacing, offset 1)."""
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps.to(self.device).long()

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return add_noise(self.alphas_cumprod, x0, eps, t)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] (N, 3, H, W) -> float32 latents scaling_factor * E(x); differentiable."""
        dist = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist
        z = dist.mean if self.latent_sample == "mean" else dist.sample(generator=generator)
        return z.float() * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float32 images in [-1, 1]; differentiable."""
        x = self.vae.decode(latents.to(self.device, self.vae_dtype) / self.scaling_factor).sample
        return x.float().clamp(-1, 1)

    @torch.no_grad()
    def _embed(self, text: str) -> Tensor:
        if text not in self._embeds:
            ids = self.tokenizer(
                [text],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            if self.offload_text_encoder:
                self.text_encoder.to(self.device)
            try:
                hidden = self.text_encoder(ids.to(self.text_encoder.device))[0]
            finally:
                if self.offload_text_encoder:
                    self.text_encoder.to("cpu")
            self._embeds[text] = hidden.to(self.device, self.dtype)
        return self._embeds[text]

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        """CLIP last hidden states (1, 77, D) of the negative prompt (uncond) and prompt (cond), cached."""
        return PromptEmbeds(uncond=self._embed(negative_prompt), cond=self._embed(prompt))

    def _control_image(self, control: Control, n: int, size: tuple[int, int]) -> Tensor:
        image = control.image.to(self.device, self.dtype)
        if image.dim() == 3:
            image = image[None]
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        if image.shape[1] != 3 or image.shape[0] not in (1, n):
            raise ValueError(f"control image must be (1 or {n}, 3 or 1, H, W) in [0, 1], got {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            image = image.to(self.dtype)
        return image.expand(n, -1, -1, -1)

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]:
        """(eps_uncond, eps_cond) float32 per query from ONE UNet call over [uncond; cond] of all queries.

        Not wrapped in no_grad: objectives that differentiate through the UNet (IDS) can; others
        should call it under torch.no_grad().
        """
        if not queries:
            return []
        sizes = [q.x_t.shape[0] for q in queries]
        eps = self._eps(queries, sizes, with_uncond=True)
        total = sum(sizes)
        return list(zip(eps[:total].split(sizes), eps[total:].split(sizes), strict=True))

    def predict_noise_cond(self, queries: list[NoiseQuery]) -> list[Tensor]:
        """eps_cond float32 per query from one UNet call over the cond rows only: for losses on the
        conditional prediction without guidance (a denoising loss), at half predict_noise's rows."""
        if not queries:
            return []
        sizes = [q.x_t.shape[0] for q in queries]
        return list(self._eps(queries, sizes, with_uncond=False).split(sizes))

    def _eps(self, queries: list[NoiseQuery], sizes: list[int], with_uncond: bool) -> Tensor:
        """The UNet's eps (float32) over [uncond; cond] of all queries, or over cond only."""
        halves = 2 if with_uncond else 1
        x = torch.cat([q.x_t.to(self.device, self.dtype) for q in queries])
        t = torch.cat([q.t.to(self.device).long().reshape(-1).expand(n) for q, n in zip(queries, sizes, strict=True)])
        prompts = [q.prompt.repeat(n) for q, n in zip(queries, sizes, strict=True)]
        text = [torch.cat([p.cond.to(self.device, self.dtype) for p in prompts])]
        if with_uncond:
            text.insert(0, torch.cat([p.uncond.to(self.device, self.dtype) for p in prompts]))
        down, mid = self._control_residuals(queries, sizes, halves)
        return self.unet(
            x.repeat(halves, 1, 1, 1),
            t.repeat(halves),
            encoder_hidden_states=torch.cat(text),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample.float()

    def _control_residuals(
        self, queries: list[NoiseQuery], sizes: list[int], halves: int
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        """Run each query's ControlNet on its own [uncond; cond] rows (halves 2) or cond rows (halves 1) and
        scatter into the UNet's batch."""
        if all(q.control is None for q in queries):
            return None, None
        total = sum(sizes)
        down: list[Tensor] | None = None
        mid: Tensor | None = None
        start = 0
        for q, n in zip(queries, sizes, strict=True):
            if q.control is not None:
                if q.control.name not in self.controlnets:
                    raise KeyError(
                        f"no ControlNet named {q.control.name!r} loaded (have: {sorted(self.controlnets)}); "
                        "pass it in controlnets= when loading the prior"
                    )
                net = self.controlnets[q.control.name]
                x = q.x_t.to(self.device, self.dtype)
                t = q.t.to(self.device).long().reshape(-1).expand(n)
                p = q.prompt.repeat(n)
                size = (x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor)
                image = self._control_image(q.control, n, size)
                text = [p.uncond, p.cond] if halves == 2 else [p.cond]
                res_down, res_mid = net(
                    x.repeat(halves, 1, 1, 1),
                    t.repeat(halves),
                    encoder_hidden_states=torch.cat(text).to(self.device, self.dtype),
                    controlnet_cond=image.repeat(halves, 1, 1, 1),
                    conditioning_scale=q.control.scale,
                    return_dict=False,
                )
                if down is None:
                    down = [r.new_zeros((halves * total, *r.shape[1:])) for r in res_down]
                    mid = res_mid.new_zeros((halves * total, *res_mid.shape[1:]))
                rows = torch.cat([torch.arange(h * total + start, h * total + start + n) for h in range(halves)])
                rows = rows.to(self.device)
                down = [d.index_copy(0, rows, r) for d, r in zip(down, res_down, strict=True)]
                mid = mid.index_copy(0, rows, res_mid)
            start += n
        return down, mid
