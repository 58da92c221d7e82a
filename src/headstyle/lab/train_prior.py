"""Train the lab's learned prior: a tiny Stable-Diffusion-1.5-shaped latent diffusion model of the head world.

Stages (each a run of training/runner.py in DIR/runs/<stage>: checkpointed every few minutes, continued exactly):

- data: ground-truth renders of ``identities`` prior identities (seed IDENTITY_SEED, disjoint from
  the lab's held-out set) at stratified 360-degree cameras, unstyled and in every style, with
  their depth controls (32 px, per raw view) and Canny controls (of the 64 px single view);
  cached as uint8 safetensors in DIR/data, one file per domain.
- vae: an AutoencoderKL with 4 latent channels and downsampling factor 4 (64 px -> 16x16x4): a 2x2
  grid of 32 px raw renders then keeps 8x8 latents per view (factor 8 would leave 4x4, too coarse
  for eyes and lips); scaling_factor = 1 / std of the latents over the data, as SD computed its 0.18215.
- decoder: the VAE's decoder fine-tuned with the encoder frozen (as SD's ft-MSE VAE): the latents,
  and so the UNet stage, do not change, so it may run beside the UNet stage.
- unet: first the tokenizer (own byte-level BPE with the lab prompts' words whole) and a FROZEN
  random CLIPTextModel: the prompts are a finite set, a random transformer already gives every
  prompt its own embedding, and freezing it lets the embeddings be computed once (the UNet's
  cross-attention learns to read them, as SD's UNet learned to read a frozen CLIP); ``train_text``
  trains it with the UNet instead (config full-text: measured, the frozen one left some prompts
  nearly interchangeable, since a random encoder has no semantics to keep). Then a
  UNet2DConditionModel: epsilon prediction, SD's scaled-linear betas, prompts dropped to "" with
  probability ``prompt_dropout`` (so classifier-free guidance is real); half the batch single
  views (the SR image: raw x2 bilinear), half 2x2 grids of four raw views of one identity.
- controlnet: ControlNetModel.from_unet for "depth" (on grids, the trainer's grid control) and
  "canny" (on single views), trained on (control, image) pairs with the UNet frozen.

DIR/model is then an SD folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/, controlnet-depth/, controlnet-canny/) that DiffusersPrior.from_pretrained loads.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle import settings
from headstyle.distill.shaping import tile_2x2
from headstyle.input_files import read_json_object
from headstyle.io import atomic_dir, atomic_path, atomic_write_text
from headstyle.lab.generator import LabGenerator
from headstyle.lab.prior import check_disjoint, held_out_z, stratified_360_cameras
from headstyle.lab.world import STYLES, sample_z, style_prompt
from headstyle.priors.controls import canny_control, depth_control
from headstyle.priors.sd_folder import write_clip_tokenizer, write_model_index
from headstyle.progress import progress_bar
from headstyle.training import checkpointing, runner
from headstyle.training.gradients import GradientStep
from headstyle.training.signals import STOP

# The prior's identities: a new seed, disjoint from HELD_OUT_SEED (checked) and the exemplar prior's.
IDENTITY_SEED = 3_000
TRUNCATION_PSI = 0.75  # as the lab trainer and evaluation map identities
DOMAINS: tuple[str | None, ...] = (None, *STYLES)
STAGES = ("data", "vae", "decoder", "unet", "controlnet")
# What each stage reads: the decoder fine-tune leaves the encoder (and so every latent) unchanged,
# so it may run beside the UNet stage.
NEEDS = {"data": (), "vae": ("data",), "decoder": ("vae",), "unet": ("vae",), "controlnet": ("unet",)}
CONTROLNETS = ("depth", "canny")  # depth: on 2x2 grids (the grid branch); canny: on single views
# What a damaged run folder's refusal suggests.
RUN_HINT = "the run folder was changed by hand: start again in a new --out"
# A run's random streams: cfg.seed + the offset of each (the data's cameras, a model's initial weights, a stage's
# training draws, the VAE's latent-scale estimate); a ControlNet's init and training streams add its index.
STREAM_OFFSETS = {"cameras": 1, "init.text": 10, "init.vae": 11, "init.unet": 12, "init.controlnet": 13,
                  "train.vae": 21, "vae.scale": 22, "train.decoder": 23, "train.unet": 31, "train.controlnet": 41}
# Several phrasings per domain; the first is the lab's prompt (world.style_prompt).
PHRASINGS: dict[str | None, tuple[str, ...]] = {
    None: (style_prompt(None), "a head", "a photo of a person"),
    "statue": (style_prompt("statue"), "a statue", "a stone sculpture of a head"),
    "zombie": (style_prompt("zombie"), "a zombie head", "a photo of a zombie"),
    "toon": (style_prompt("toon"), "a cartoon head", "a toon character with big eyes"),
    "gold": (style_prompt("gold"), "a gold statue", "a head made of gold"),
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class TrainPriorConfig:
    """Sizes, steps and seeds of every stage (see CONFIGS)."""

    identities: int = 240
    views: int = 8
    resolution: int = 32  # raw renders; single views are x2 (64 px), grids 2x2 raw (64 px)
    seed: int = 0
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 1500  # decoder fine-tune, encoder frozen (as SD's ft-MSE VAE)
    decoder_lr: float = 1e-3
    text_width: int = 64
    text_layers: int = 2
    train_text: bool = False  # train the text encoder with the UNet (else it stays frozen at its random init)
    # The pooled prompt added to the timestep embedding (diffusers' addition_embed_type="text", as DeepFloyd IF's
    # UNet): every ResNet block then sees the prompt, not only the cross-attention layers.
    text_pool: bool = False
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_steps: int = 1800
    unet_horizon: int = 2400  # the cosine schedule's length; training stops at unet_steps (lr then 0.25 x peak)
    unet_batch: int = 16
    unet_lr: float = 1e-3
    prompt_dropout: float = 0.15
    grid_share: float = 0.5
    controlnet_channels: tuple[int, ...] = (16, 32, 32)
    controlnet_steps: int = 200
    controlnet_batch: int = 16
    controlnet_lr: float = 5e-4
    warmup: int = 100
    checkpoint_seconds: float = 180.0
    log_every: int = 10
    render_chunk: int = 64
    scale_samples: int = 512  # images whose latents set the VAE's scaling factor

    @classmethod
    def read(cls, out: Path) -> TrainPriorConfig:
        """The config a run saved in out/config.json (JSON lists back to tuples); ValueError in one line when that
        is not a JSON object of this config's fields."""
        values = read_json_object(out / "config.json", ValueError, RUN_HINT)
        if unknown := sorted(set(values) - {f.name for f in fields(cls)}):
            raise ValueError(f"{out / 'config.json'}: unknown field {unknown[0]!r}; {RUN_HINT}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


CONFIGS: dict[str, TrainPriorConfig] = {
    "full": TrainPriorConfig(),
    # The frozen random text encoder left "a zombie", "a golden sculpture of a head" and the unstyled prompt
    # nearly interchangeable for the UNet after 1800 steps: train it with the UNet, to the schedule's end.
    "full-text": TrainPriorConfig(train_text=True, unet_steps=2400),
    # Against full-text's unstyled-for-zombie confusion (classifier 0.82 of single views, 4 draws): the pooled
    # prompt in the timestep embedding of every ResNet block did not help (0.83 after 2400 steps, the same
    # confusion); 2.5x the UNet steps did (0.70 at step 2453, 0.975 at 3800, 0.988 at 6000). The shipped prior.
    "full-long": TrainPriorConfig(train_text=True, unet_steps=6000, unet_horizon=8000, controlnet_steps=400),
    "full-pooled": TrainPriorConfig(train_text=True, text_pool=True, unet_steps=2400),
    # Tests: a few steps of every stage on tiny models.
    "tiny": TrainPriorConfig(
        identities=2,
        views=4,
        resolution=16,
        vae_channels=(8, 8, 8),
        vae_steps=6,
        decoder_steps=4,
        vae_batch=4,
        text_width=16,
        text_layers=1,
        unet_channels=(8, 16, 16),
        unet_steps=6,
        unet_horizon=6,
        unet_batch=4,
        controlnet_channels=(8, 8, 8),
        controlnet_steps=4,
        controlnet_batch=4,
        warmup=2,
        log_every=2,
        render_chunk=16,
        scale_samples=16,
    ),
}


def stream(cfg: TrainPriorConfig, name: str) -> int:
    """The seed of the run's random stream ``name`` (STREAM_OFFSETS)."""
    return cfg.seed + STREAM_OFFSETS[name]


def domain_name(domain: str | None) -> str:
    return "unstyled" if domain is None else domain


def prompt_table() -> list[str]:
    """Every prompt the model is trained on: "" (the unconditional prompt) first, then each domain's phrasings."""
    return ["", *(p for d in DOMAINS for p in PHRASINGS[d])]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class LabData:
    """The cached renders: per domain (DOMAINS order) raw views (D, N, 3, r, r) and depth controls
    (D, N, 1, r, r) as uint8 levels, Canny edges of the single view (D, N, 1, 2r, 2r) as uint8 0/1;
    N = identities * views (identity-major)."""

    raw: Tensor
    depth: Tensor
    canny: Tensor
    views: int

    @property
    def identities(self) -> int:
        return self.raw.shape[1] // self.views


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] -> uint8 (rounded)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def single_view(raw: Tensor) -> Tensor:
    """The lab generator's SR image of raw renders: bilinear x2 (headstyle.lab.generator.Upsample)."""
    return F.interpolate(raw, scale_factor=2, mode="bilinear", align_corners=False)


@torch.no_grad()
def render_domain(z: Tensor, cams: Tensor, domain: str | None, resolution: int, chunk: int) -> Iterator[dict]:
    """Render identities z (M, P) at cams (M * V, 25) in ``domain``, chunk by chunk: uint8 raw, depth, canny."""
    views = len(cams) // len(z)
    ws = TRUNCATION_PSI * z.repeat_interleave(views, dim=0).unsqueeze(1)
    oracle = LabGenerator(resolution=resolution, sr_factor=1, num_ws=1, style=domain, residual=False)
    for i in range(0, len(ws), chunk):
        out = oracle.synthesis(ws[i : i + chunk], cams[i : i + chunk], render_sr=False)
        raw = out.image_raw.clamp(-1, 1)
        yield {
            "raw": to_uint8((raw + 1) / 2),
            "depth": to_uint8(depth_control(out.depth, out.mask)[:, :1]),
            "canny": canny_control(single_view(raw))[:, :1].to(torch.uint8),
        }


def prior_identities(cfg: TrainPriorConfig) -> Tensor:
    """The prior's identities z (M, P); raises LeakError if any is a held-out identity."""
    z = sample_z(cfg.identities, IDENTITY_SEED + cfg.seed)
    check_disjoint(z, held_out_z(16))
    return z


def stage_data(out: Path, cfg: TrainPriorConfig, progress: bool) -> None:
    """Render every domain into out/data/<domain>.safetensors (a finished domain is skipped on resume)."""
    from safetensors.torch import save_file

    z = prior_identities(cfg)
    cam_gen = torch.Generator().manual_seed(IDENTITY_SEED + stream(cfg, "cameras"))
    cams = stratified_360_cameras(cfg.identities, cfg.views, cam_gen)
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [d for d in DOMAINS if not (folder / f"{domain_name(d)}.safetensors").is_file()]
    chunks = math.ceil(len(cams) / cfg.render_chunk)
    start = time.perf_counter()
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("data", total=chunks * len(todo))
        for domain in todo:
            parts: dict[str, list[Tensor]] = {"raw": [], "depth": [], "canny": []}
            for part in render_domain(z, cams, domain, cfg.resolution, cfg.render_chunk):
                for k, v in part.items():
                    parts[k].append(v)
                bar.update(task, advance=1, info=domain_name(domain))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tensors["z"], tensors["cams"] = z.contiguous(), cams.contiguous()
            with atomic_path(folder / f"{domain_name(domain)}.safetensors") as tmp:
                save_file(tensors, str(tmp))
            _add_seconds(out, "data", time.perf_counter() - start)
            start = time.perf_counter()
    _finish_stage(out, "data", {"renders": len(cams) * len(DOMAINS), "identities": cfg.identities})


def load_data(out: Path) -> LabData:
    """The cached renders of stage_data."""
    from safetensors.torch import load_file

    parts = [load_file(str(out / "data" / f"{domain_name(d)}.safetensors")) for d in DOMAINS]
    views = parts[0]["cams"].shape[0] // parts[0]["z"].shape[0]
    return LabData(*(torch.stack([p[k] for p in parts]) for k in ("raw", "depth", "canny")), views=views)


@dataclass
class Batch:
    """Training images in [-1, 1] (B, 3, 64, 64), their controls in [0, 1] (B, 3, 64, 64: depth for grids,
    Canny for single views), domain indices (B,) and which samples are 2x2 grids (B,)."""

    images: Tensor
    controls: Tensor
    domains: Tensor
    grid: Tensor


def sample_batch(data: LabData, n: int, grid_share: float, gen: torch.Generator) -> Batch:
    """n random samples: single views (raw x2 with their Canny) or 2x2 grids of four distinct raw views of one
    identity in one domain (with the tiled depth controls), each with probability ``grid_share``."""
    d_count, n_views = data.raw.shape[0], data.raw.shape[1]
    domains = torch.randint(d_count, (n,), generator=gen)
    grid = torch.rand(n, generator=gen) < grid_share
    index = torch.randint(n_views, (n,), generator=gen)
    picks = torch.stack([torch.randperm(data.views, generator=gen)[:4] for _ in range(n)])
    images, controls = [], []
    for k in range(n):
        d = int(domains[k])
        if grid[k]:
            rows = (int(index[k]) // data.views) * data.views + picks[k]
            raw = data.raw[d, rows].float() / 127.5 - 1
            images.append(tile_2x2(list(raw.unsqueeze(1))))
            controls.append(tile_2x2(list(data.depth[d, rows].float().unsqueeze(1) / 255)))
        else:
            raw = data.raw[d, index[k : k + 1]].float() / 127.5 - 1
            images.append(single_view(raw))
            controls.append(data.canny[d, index[k : k + 1]].float())
    return Batch(torch.cat(images), torch.cat(controls).expand(-1, 3, -1, -1), domains, grid)


def sample_prompts(domains: Tensor, dropout: float, gen: torch.Generator) -> Tensor:
    """Indices into prompt_table(): a random phrasing of each sample's domain, or "" (index 0) with prob. dropout."""
    per = len(PHRASINGS[None])
    phrase = torch.randint(per, domains.shape, generator=gen)
    drop = torch.rand(domains.shape, generator=gen) < dropout
    return torch.where(drop, torch.zeros_like(domains), 1 + domains * per + phrase)


# ---------------------------------------------------------------------------------------------- models


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


# ---------------------------------------------------------------------------------------------- losses


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


# ---------------------------------------------------------------------------------------------- stage loop


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to lr / 10 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Stage(runner.Task):
    """One stage's training (training/runner.py runs it): AdamW (no weight decay) on ``model``'s trainable
    parameters, loss_fn(gen) per step with the learning rate of lr_at over ``horizon`` steps; it logs the mean loss
    of the last ``window`` steps and keeps its elapsed training seconds."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Generator], Tensor], lr: float, warmup: int,
                 horizon: int, seed: int, window: int) -> None:  # fmt: skip
        self.model = model
        self.loss_fn = loss_fn
        self.lr, self.warmup, self.horizon, self.window = lr, warmup, horizon, window
        self.weights = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(list(self.weights.values()), lr=lr, weight_decay=0.0)
        self.update = GradientStep(list(self.weights.values()), self.optimizer)
        self.rng = torch.Generator().manual_seed(seed)
        self.rngs = {"stage": self.rng}
        self.losses: list[float] = []
        self.seconds = 0.0

    def step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        lr = lr_at(self.iteration, self.horizon, self.lr, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(self.rng)
        metrics = self.update(loss, self.iteration + 1)
        self.losses = [*self.losses[-(self.window - 1) :], loss.item()] if self.window > 1 else [loss.item()]
        self.seconds += time.perf_counter() - t0
        return {"loss": self.mean_loss, "lr": lr, "elapsed": round(self.seconds, 2), **metrics}

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))

    def shared_state(self) -> dict[str, Any]:
        return {**self.update.state(), "seconds": self.seconds, "losses": self.losses}

    def restore(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        self.update.load_state(ckpt.meta)
        self.seconds = float(ckpt.meta["seconds"])
        self.losses = [float(x) for x in ckpt.meta["losses"]]


def stage_folder(out: Path, name: str) -> Path:
    """The run folder of stage ``name``: its checkpoints, log.jsonl / log.csv and config."""
    return out / "runs" / name


def run_stage(
    out: Path,
    name: str,
    model: nn.Module,
    loss_fn: Callable[[torch.Generator], Tensor],
    steps: int,
    lr: float,
    cfg: TrainPriorConfig,
    progress: bool,
    seed: int,
    horizon: int | None = None,
) -> Stage:
    """``steps`` steps of Stage in out/runs/<name>, checkpointed every cfg.checkpoint_seconds, at the end and on a
    signal (which then ends the command) and continued exactly from its newest checkpoint. The learning rate follows
    lr_at over ``horizon`` steps (default: ``steps``)."""
    stage = Stage(model, loss_fn, lr, cfg.warmup, horizon or steps, seed, cfg.log_every)
    folder = stage_folder(out, name)
    config_text = settings.dumps({"stage": {"name": name, "steps": steps, "lr": lr, "seed": seed},
                                  "prior": asdict(cfg)})  # fmt: skip
    plan = runner.RunPlan(folder, steps, name, config_text, checkpoint_seconds=cfg.checkpoint_seconds, keep_last=1,
                          log_every=cfg.log_every)  # fmt: skip
    model.train()
    end = runner.run(stage, plan, resume=checkpointing.continue_or_clear(folder), progress=progress)
    model.eval()
    if end.interrupted:
        STOP.raise_if_requested(f"continue it with: headstyle lab train-prior --resume --out {out} (and its --config)")
    return stage


# ---------------------------------------------------------------------------------------------- stages


def stage_vae(out: Path, cfg: TrainPriorConfig, progress: bool) -> None:
    data = load_data(out)
    image_size = 2 * cfg.resolution
    vae = build_vae(cfg, image_size)

    def loss_fn(gen: torch.Generator) -> Tensor:
        return vae_loss(vae, sample_batch(data, cfg.vae_batch, cfg.grid_share, gen).images, gen, cfg.kl_weight)

    stage = run_stage(out, "vae", vae, loss_fn, cfg.vae_steps, cfg.vae_lr, cfg, progress, stream(cfg, "train.vae"))
    # SD's scaling factor: 1 / std of the latents (posterior samples) over the data.
    gen = torch.Generator().manual_seed(stream(cfg, "vae.scale"))
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(sample_batch(data, 32, cfg.grid_share, gen).images).latent_dist.sample(generator=gen)
                for _ in range(math.ceil(cfg.scale_samples / 32))
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    with atomic_dir(out / "model" / "vae") as tmp:
        vae.save_pretrained(tmp)
    _finish_stage(out, "vae", _summary(vae, stage))


def stage_decoder(out: Path, cfg: TrainPriorConfig, progress: bool) -> None:
    """Fine-tune the VAE's decoder with the encoder frozen (SD's ft-MSE VAE did the same): sharper, truer colours,
    and the latents the UNet learns from stay bit-identical."""
    from diffusers import AutoencoderKL

    data = load_data(out)
    vae = AutoencoderKL.from_pretrained(out / "model" / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)

    def loss_fn(gen: torch.Generator) -> Tensor:
        return vae_loss(vae, sample_batch(data, cfg.vae_batch, cfg.grid_share, gen).images, gen, 0.0)

    stage = run_stage(out, "decoder", vae, loss_fn, cfg.decoder_steps, cfg.decoder_lr, cfg, progress,
                      stream(cfg, "train.decoder"))
    with atomic_dir(out / "model" / "vae") as tmp:
        vae.save_pretrained(tmp)
    _finish_stage(out, "decoder", _summary(vae, stage))


def _load_vae(out: Path) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "model" / "vae").eval().requires_grad_(False)


def stage_unet(out: Path, cfg: TrainPriorConfig, progress: bool) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = out / "model"
    if not (folder / "text_encoder").is_dir():
        build_text(folder, cfg)
    data = load_data(out)
    vae = _load_vae(out)
    latent_size = 2 * cfg.resolution // 2 ** (len(cfg.vae_channels) - 1)
    unet = build_unet(cfg, latent_size)
    abar = ddim_scheduler().alphas_cumprod.float()
    if cfg.train_text:
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        ids = tok(prompt_table(), padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        model: nn.Module = nn.ModuleDict({"unet": unet, "text_encoder": encoder})

        def embed(prompts: Tensor) -> Tensor:
            return encoder(ids)[0][prompts]

    else:
        table, model = embed_prompts(folder, prompt_table()), unet

        def embed(prompts: Tensor) -> Tensor:
            return table[prompts]

    def loss_fn(gen: torch.Generator) -> Tensor:
        batch = sample_batch(data, cfg.unet_batch, cfg.grid_share, gen)
        prompts = sample_prompts(batch.domains, cfg.prompt_dropout, gen)
        return eps_loss(unet, encode_latents(vae, batch.images, gen), embed(prompts), abar, gen)

    stage = run_stage(
        out, "unet", model, loss_fn, cfg.unet_steps, cfg.unet_lr, cfg, progress, stream(cfg, "train.unet"),
        cfg.unet_horizon
    )
    if cfg.train_text:
        with atomic_dir(folder / "text_encoder") as tmp:
            encoder.save_pretrained(tmp)
    with atomic_dir(folder / "unet") as tmp:
        unet.save_pretrained(tmp)
    with atomic_dir(folder / "scheduler") as tmp:
        ddim_scheduler().save_pretrained(tmp)
    write_model_index(folder)
    _finish_stage(out, "unet", _summary(model, stage))


def stage_controlnet(out: Path, cfg: TrainPriorConfig, progress: bool, name: str) -> None:
    """Train ControlNet ``name`` on (control, image) pairs (depth: grids only; canny: single views only)."""
    from diffusers import UNet2DConditionModel

    folder = out / "model"
    text = embed_prompts(folder, prompt_table())
    data = load_data(out)
    vae = _load_vae(out)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    net = build_controlnet(cfg, unet, name)
    abar = ddim_scheduler().alphas_cumprod.float()
    grid_share = 1.0 if name == "depth" else 0.0

    def loss_fn(gen: torch.Generator) -> Tensor:
        batch = sample_batch(data, cfg.controlnet_batch, grid_share, gen)
        prompts = text[sample_prompts(batch.domains, cfg.prompt_dropout, gen)]

        def residuals(x_t: Tensor, t: Tensor) -> tuple[list[Tensor], Tensor]:
            down, mid = net(x_t, t, encoder_hidden_states=prompts, controlnet_cond=batch.controls, return_dict=False)
            return list(down), mid

        return eps_loss(unet, encode_latents(vae, batch.images, gen), prompts, abar, gen, residuals)

    seed = stream(cfg, "train.controlnet") + CONTROLNETS.index(name)
    stage = run_stage(
        out, f"controlnet-{name}", net, loss_fn, cfg.controlnet_steps, cfg.controlnet_lr, cfg, progress, seed
    )
    with atomic_dir(folder / f"controlnet-{name}") as tmp:
        net.save_pretrained(tmp)
    _finish_stage(out, f"controlnet-{name}", _summary(net, stage))


def stage_done(out: Path, stage: str) -> bool:
    """Whether a stage's outputs are complete (each is written last and atomically)."""
    model = out / "model"
    if stage == "data":
        return all((out / "data" / f"{domain_name(d)}.safetensors").is_file() for d in DOMAINS)
    if stage == "vae":
        return (model / "vae").is_dir()
    if stage == "decoder":
        return "finished" in read_stages(out).get("decoder", {})
    if stage == "unet":
        return (model / "unet").is_dir() and (model / "model_index.json").is_file()
    return all((model / f"controlnet-{n}").is_dir() for n in CONTROLNETS)


def train_prior(out: Path, cfg: TrainPriorConfig, stage: str = "all", progress: bool = True) -> Path:
    """Run ``stage`` (or every unfinished stage in order for "all"); returns the model folder out/model."""
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "config.json"
    if config_file.is_file():
        if read_json_object(config_file, ValueError, RUN_HINT) != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{out} was started with another configuration ({config_file}); use a new --out")
    else:
        atomic_write_text(config_file, json.dumps(asdict(cfg), indent=2) + "\n")
    stages = STAGES if stage == "all" else (stage,)
    for s in stages:
        if stage == "all" and stage_done(out, s):
            continue
        missing = [n for n in NEEDS[s] if not stage_done(out, n)]
        if missing:
            raise ValueError(f"stage {s!r} needs the finished stage(s) {', '.join(missing)} in {out}")
        if s == "data":
            stage_data(out, cfg, progress)
        elif s == "vae":
            stage_vae(out, cfg, progress)
        elif s == "decoder":
            stage_decoder(out, cfg, progress)
        elif s == "unet":
            stage_unet(out, cfg, progress)
        else:
            for name in CONTROLNETS:
                if not (out / "model" / f"controlnet-{name}").is_dir():
                    stage_controlnet(out, cfg, progress, name)
    return out / "model"


# ---------------------------------------------------------------------------------------------- bookkeeping


def read_stages(out: Path) -> dict[str, dict]:
    path = out / "stages.json"
    return read_json_object(path, ValueError, RUN_HINT) if path.is_file() else {}


def _add_seconds(out: Path, stage: str, seconds: float) -> None:
    stages = read_stages(out)
    entry = stages.setdefault(stage, {"seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + seconds, 1)
    atomic_write_text(out / "stages.json", json.dumps(stages, indent=2) + "\n")


def _finish_stage(out: Path, stage: str, summary: dict) -> None:
    stages = read_stages(out)
    stages[stage] = {**stages.get(stage, {}), **summary, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(out / "stages.json", json.dumps(stages, indent=2) + "\n")


def _summary(model: nn.Module, stage: Stage) -> dict:
    return {
        "seconds": round(stage.seconds, 1),
        "steps": stage.iteration,
        "final_loss": stage.mean_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def snapshot(out: Path, dest: Path) -> Path:
    """An SD folder at ``dest`` from a run's finished stages and latest checkpoints (for looking at a prior while
    it trains): the UNet from its stage's newest checkpoint unless finished; ControlNets from theirs, or fresh (zero)
    ones."""
    from diffusers import UNet2DConditionModel

    cfg = TrainPriorConfig.read(out)
    model = out / "model"
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "text_encoder", "tokenizer"):
        shutil.copytree(model / sub, dest / sub, dirs_exist_ok=True)
    if (model / "unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(model / "unet")
    else:
        from transformers import CLIPTextModel

        unet = build_unet(cfg, 2 * cfg.resolution // 2 ** (len(cfg.vae_channels) - 1))
        if cfg.train_text:
            encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
            both = nn.ModuleDict({"unet": unet, "text_encoder": encoder})
            checkpointing.load_weights(both, stage_folder(out, "unet"))
            encoder.save_pretrained(dest / "text_encoder")
        else:
            checkpointing.load_weights(unet, stage_folder(out, "unet"))
    unet.save_pretrained(dest / "unet")
    ddim_scheduler().save_pretrained(dest / "scheduler")
    write_model_index(dest)
    for name in CONTROLNETS:
        net = build_controlnet(cfg, unet, name)
        if checkpointing.list_checkpoints(stage_folder(out, f"controlnet-{name}")):
            checkpointing.load_weights(net, stage_folder(out, f"controlnet-{name}"))
        net.save_pretrained(dest / f"controlnet-{name}")
    return dest


def copy_model(out: Path, dest: Path) -> Path:
    """Copy a finished run's model/ folder (the SD layout, fp32 safetensors) and stages.json to ``dest``, atomically."""
    with atomic_dir(dest) as tmp:
        shutil.copytree(out / "model", tmp, dirs_exist_ok=True)
        shutil.copy2(out / "stages.json", tmp / "stages.json")
    return dest
