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
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headstyle import settings
from headstyle.input_files import read_json_object
from headstyle.io import atomic_dir, atomic_path, atomic_write_text
from headstyle.lab.prior.data import load_data, prior_identities, render_domain, sample_batch, sample_prompts
from headstyle.lab.prior.models import (
    build_controlnet,
    build_text,
    build_unet,
    build_vae,
    ddim_scheduler,
    embed_prompts,
    encode_latents,
    eps_loss,
    vae_loss,
)
from headstyle.lab.prior.recipe import (
    CONTROLNETS,
    DOMAINS,
    IDENTITY_SEED,
    RUN_HINT,
    TrainPriorConfig,
    domain_name,
    prompt_table,
    stream,
)
from headstyle.lab.world.identities import stratified_360_cameras
from headstyle.priors.sd_folder import write_model_index
from headstyle.progress import progress_bar
from headstyle.training import checkpointing, runner
from headstyle.training.gradients import GradientStep
from headstyle.training.signals import STOP

STAGES = ("data", "vae", "decoder", "unet", "controlnet")
# What each stage reads: the decoder fine-tune leaves the encoder (and so every latent) unchanged,
# so it may run beside the UNet stage.
NEEDS = {"data": (), "vae": ("data",), "decoder": ("vae",), "unet": ("vae",), "controlnet": ("unet",)}












# ---------------------------------------------------------------------------------------------- data












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










# ---------------------------------------------------------------------------------------------- models
















# ---------------------------------------------------------------------------------------------- losses








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
