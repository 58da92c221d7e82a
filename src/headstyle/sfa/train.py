"""Fine-tuning the Style Appearance Module on the paired dataset (DiffStyle360 Sec. 3.4, Supp. 7.1).

One iteration takes one sample of the dataset (a content identity and a cross-identity style
exemplar) and ``views`` of its V cameras (the paper's batch: 16 views of one generation):

  x0 = E(ground-truth stylised views);  t ~ U{0..T-1} (one for the batch);  eps ~ N(0, I)
  banks: content front/back through the FROZEN content appearance module, style exemplar front/back
         through the TRAINABLE Style Appearance Module, both at t (headstyle.attention.prior)
  loss = || eps - eps_theta(x_t, t | Style Fusion Attention(content bank, style bank)) ||^2   (fp32)

and one AdamW step on the module (the paper: lr 1e-5, 800 iterations). The main UNet, the VAE and
the ControlNet stay frozen, unless train.lora_rank > 0: then LoRA (peft) on the main UNet's attention
projections trains with the module (the content appearance module stays the frozen prior UNet).
Role "shared" trains one module that writes both banks (Table 2's "+ fine-tuning").
The paper's CFG 3.0 is a sampling setting (style-views' default guidance); the loss is on eps_cond with the
training prompt ("" by default: the style comes from the banks, not from text), so the UNet runs on the cond
rows only (predict_noise_cond).

State lives here only: module weights, AdamW, the sampling RNG and the iteration, all in the
checkpoints (headstyle.stylize.checkpointing: safetensors + JSON, checksummed), so a resumed run
continues bitwise. Several processes (accelerate launch) each draw their own samples and average
gradients with one all-reduce.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle import settings
from headstyle.attention.config import StyleFusionConfig
from headstyle.attention.prior import StyleFusionPrior
from headstyle.distill.shaping import resize_to
from headstyle.io import atomic_write_text
from headstyle.priors import controls
from headstyle.priors.base import Control, NoiseQuery
from headstyle.priors.defaults import DEFAULT_MODEL
from headstyle.progress import progress_bar
from headstyle.sfa.dataset import Sample, SFADataset
from headstyle.sfa.module import MAX_LORA_RANK, StyleAppearanceModule
from headstyle.stylize import checkpointing
from headstyle.stylize.outputs import MetricsLog
from headstyle.training.lock import folder_lock
from headstyle.training.signals import STOP

MODULE_DIR = "module"
# Validation noise is drawn from its own stream, so the validation loss of a sample is the same at every
# evaluation and in every run with the same seed.
VALIDATION_STREAM = 7_919


@dataclass
class DataSection:
    """path: the dataset folder (`headstyle sfa dataset`); held_out_per_style: its last samples per style
    validate (other identities, never trained on)."""

    path: str = ""
    held_out_per_style: int = 2

    def __post_init__(self) -> None:
        if self.held_out_per_style < 0:
            raise ValueError(f"held_out_per_style must be >= 0, got {self.held_out_per_style}")


@dataclass
class ModelSection:
    """The SD 1.5-family model whose UNet the banks feed (paths or hub ids); controlnet_depth "" = none;
    vae as style-views ("auto", "" or a path); device "" = cuda when available."""

    model: str = DEFAULT_MODEL
    vae: str = "auto"
    controlnet_depth: str = ""
    device: str = ""


@dataclass
class TrainSection:
    """role: "style" (a Style Appearance Module beside the frozen content module) or "shared" (one
    fine-tuned module for both banks). lora_rank: LoRA on the main UNet's attention trained with the
    module (0 = off, the main UNet stays frozen). AdamW lr / weight_decay, iterations, views per batch (at
    most the dataset's), the text prompt of the main UNet, the depth ControlNet's scale and the seed."""

    role: Literal["style", "shared"] = "style"
    lora_rank: int = 0
    iterations: int = 800
    lr: float = 1e-5
    weight_decay: float = 1e-2
    views: int = 16
    prompt: str = ""
    control_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"lora_rank must lie in [0, {MAX_LORA_RANK}] (0 = no LoRA), got {self.lora_rank}")
        if self.iterations < 0 or self.views < 1:
            raise ValueError(f"iterations must be >= 0 and views >= 1, got {self.iterations} and {self.views}")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"lr must be positive and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if problem := settings.seed_problem("seed", self.seed):
            raise ValueError(problem)


@dataclass
class RunSection:
    """out: the run folder; checkpoint, log and validation intervals (iterations); checkpoints kept."""

    out: str = ""
    checkpoint_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    validate_every: int = 100

    def __post_init__(self) -> None:
        if min(self.checkpoint_every, self.keep_last, self.log_every, self.validate_every) < 1:
            raise ValueError("checkpoint_every, keep_last, log_every and validate_every must be at least 1")


def _training_fusion() -> StyleFusionConfig:
    # Key scaling is an inference-time knob (Sec. 3.5): the module learns at tau = 1.
    return StyleFusionConfig(tau=1.0)


@dataclass
class SFATrainConfig:
    """A `headstyle sfa train` run (typed, TOML + --set)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    fusion: StyleFusionConfig = field(default_factory=_training_fusion)
    run: RunSection = field(default_factory=RunSection)


def dumps(cfg: SFATrainConfig) -> str:
    return settings.dumps({k: settings.plain(v) for k, v in vars(cfg).items()})


# ------------------------------------------------------------------------------------------------ the loss


@dataclass
class Batch:
    """One sample's tensors on the prior's device: content and style reference latents (2, C, h, w), the
    stylised views' latents x0 (B, C, h, w) and their depth control (or None)."""

    content: Tensor
    style: Tensor
    x0: Tensor
    control: Control | None


@torch.no_grad()
def encode_batch(prior, sample: Sample, views: Tensor, control_scale: float = 1.0) -> Batch:
    """Encode a sample's references and its views ``views`` (indices) at the prior's size; the depth
    ControlNet gets the stylised views' depth when the prior has one."""
    size = prior.image_size
    images = torch.cat([sample.content, sample.style, sample.targets[views]])
    latents = prior.encode(resize_to(images, size).to(prior.device))
    control = None
    if "depth" in prior.control_names:
        image = controls.depth_control(resize_to(sample.depth[views], size), resize_to(sample.mask[views], size))
        control = Control("depth", image, control_scale)
    return Batch(latents[:2], latents[2:4], latents[4:], control)


def diffusion_loss(
    prior,
    batch: Batch,
    t: Tensor,
    eps: Tensor,
    fusion: StyleFusionConfig,
    prompt,
    content_unet: torch.nn.Module | None = None,
    style_unet: torch.nn.Module | None = None,
    reference_seed: int = 0,
    differentiable: bool = False,
) -> Tensor:
    """Mean squared error (fp32) between eps and the fused UNet's eps_cond at x_t = sqrt(abar_t) x0 + ...

    content_unet / style_unet: the appearance modules (None = the prior's UNet: SFA without training).
    reference_seed: the noise of the references' write passes.
    """
    sfa = StyleFusionPrior(prior, batch.style, config=fusion, content_unet=content_unet, style_unet=style_unet,
                           seed=reference_seed, differentiable=differentiable)  # fmt: skip
    sfa.set_content(batch.content)
    x_t = prior.add_noise(batch.x0, eps, t.expand(batch.x0.shape[0]))
    eps_cond = sfa.predict_noise_cond([NoiseQuery(x_t, t.reshape(1), prompt, batch.control)])[0]
    return F.mse_loss(eps_cond.float(), eps.float())


# --------------------------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    """Where a run stopped, its last checkpoint, the module folder (None when a signal stopped it first) and the
    last held-out loss (None without); ``interrupted``: a SIGINT/SIGTERM stopped it before train.iterations."""

    iteration: int
    checkpoint: Path | None
    module: Path | None
    val_loss: float | None = None
    interrupted: bool = False


def _seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class SFATrainer:
    """Trains a Style Appearance Module on a dataset with a frozen DiffusersPrior (see the module docstring)."""

    def __init__(self, cfg: SFATrainConfig, prior, dataset: SFADataset, accelerator: Any = None) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=prior.device.type == "cpu")
        self.cfg = cfg
        self.prior = prior
        self.dataset = dataset
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.run_dir = Path(cfg.run.out)
        self.train_ids, self.val_ids = dataset.split(cfg.data.held_out_per_style)
        if not self.train_ids:
            raise ValueError(
                f"{dataset.root} holds {len(dataset)} samples, all held out for validation "
                f"({cfg.data.held_out_per_style} per style); write more samples or lower data.held_out_per_style"
            )
        self.views = min(cfg.train.views, dataset.settings.views)
        self.module = StyleAppearanceModule.from_unet(prior.unet, cfg.train.role, cfg.train.lora_rank, cfg.train.seed)
        self.module.to(prior.device).train()
        trainable = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.rng = torch.Generator().manual_seed(t.seed * 1_000_003 + self.rank)
        self.prompt = prior.embed_prompts(t.prompt)
        self.iteration = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


    def step(self) -> dict[str, float]:
        """One sample, ``views`` of its views, one t, one backward, one AdamW step; returns its metrics."""
        rng = self.rng
        n_train = len(self.train_ids)
        sample = self.dataset.load(self.train_ids[int(torch.randint(0, n_train, (1,), generator=rng))])
        views = torch.randperm(self.dataset.settings.views, generator=rng)[: self.views]
        t = torch.randint(0, len(self.prior.alphas_cumprod), (1,), generator=rng).to(self.prior.device)
        batch = encode_batch(self.prior, sample, views, self.cfg.train.control_scale)
        eps = torch.randn(batch.x0.shape, generator=rng).to(batch.x0.device)
        prior, content_unet, style_unet = self.module.fusion(self.prior)
        loss = diffusion_loss(prior, batch, t, eps, self.cfg.fusion, self.prompt, content_unet, style_unet,
                              _seed_from(rng), differentiable=True)  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._all_reduce_grads()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "t": int(t), "sample": sample.record.sample}

    def _all_reduce_grads(self) -> float:
        """Average gradients over processes (one all-reduce, as DDP); the global gradient norm."""
        live = [p for p in self.params if p.grad is not None]
        if not live:
            return 0.0
        flat = torch.cat([p.grad.reshape(-1) for p in live])
        if self.world_size > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in live:
                p.grad.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()
        return float(torch.linalg.vector_norm(flat))

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean diffusion loss over the held-out samples, each at fixed views, t and noise (the same at
        every call): comparable across iterations and runs."""
        prior, content_unet, style_unet = self.module.fusion(self.prior)
        return held_out_loss(prior, self.dataset, self.val_ids, self.cfg, (content_unet, style_unet))

    # -- state

    def save_checkpoint(self) -> Path:
        state = checkpointing.capture_rng({"sfa": self.rng})
        shared = {"param_names": self.param_names, "dataset_records": len(self.dataset), "role": self.module.role}
        return checkpointing.save_checkpoint(
            self.run_dir, self.iteration, dict(zip(self.param_names, self.params, strict=True)), self.optimizer,
            state, shared, dumps(self.cfg), rank=self.rank, world_size=self.world_size,
            barrier=self.accelerator.wait_for_everyone, keep_last=self.cfg.run.keep_last,
        )  # fmt: skip

    def load_checkpoint(self, path: str | Path) -> Path:
        ckpt = checkpointing.load_checkpoint(path, self.rank, self.world_size)
        if ckpt.meta["param_names"] != self.param_names or ckpt.meta["role"] != self.module.role:
            raise checkpointing.ResumeError(f"{ckpt.path} trained another module (role or base UNet differ)")
        if ckpt.meta["dataset_records"] != len(self.dataset):
            raise checkpointing.ResumeError(
                f"{ckpt.path} trained on {ckpt.meta['dataset_records']} samples, the dataset now holds "
                f"{len(self.dataset)}: an exact resume needs the same data (train anew on the grown dataset)"
            )
        with torch.no_grad():
            for name, p in zip(self.param_names, self.params, strict=True):
                p.copy_(ckpt.trainable[name])
        checkpointing.optimizer_from_files(self.optimizer, ckpt.optimizer_tensors, ckpt.meta["optimizer"])
        checkpointing.restore_rng(ckpt.rank_state, {"sfa": self.rng})
        self.iteration = ckpt.iteration
        return ckpt.path

    def save_module(self) -> Path:
        meta = {
            "base_model": self.cfg.model.model,
            "dataset": str(self.dataset.root),
            "styles": self.dataset.styles,
            "iterations": self.iteration,
            "fusion": settings.plain(self.cfg.fusion),
        }
        return self.module.save(self.run_dir / MODULE_DIR, meta)

    # -- the loop

    def train(self, resume: str | Path | None = None, progress: bool = True) -> TrainResult:
        """Run until train.iterations (from ``resume``, a run folder or checkpoint, if given) holding the run folder's
        lock; write the module. SIGINT/SIGTERM checkpoint and stop (no module)."""
        with folder_lock(self.run_dir) if self.is_main else contextlib.nullcontext():
            return self._train(resume, progress)

    def _train(self, resume: str | Path | None, progress: bool) -> TrainResult:
        cfg = self.cfg
        if resume is None and self.is_main:
            checkpointing.check_fresh_run_dir(self.run_dir)
        last = self.load_checkpoint(resume) if resume is not None else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.toml", dumps(cfg))
        log = MetricsLog(self.run_dir, self.iteration if last else None) if self.is_main else None
        val_loss = None
        interrupted = False
        with STOP.deferred(), progress_bar(disable=not (progress and self.is_main)) as bar:
            task = bar.add_task("sfa train", total=cfg.train.iterations, completed=self.iteration)
            while self.iteration < cfg.train.iterations:
                t0 = time.perf_counter()
                metrics: dict[str, float] = self.step()
                self.iteration += 1
                metrics["seconds"] = time.perf_counter() - t0
                end = self.iteration == cfg.train.iterations
                if self.val_ids and (self.iteration % cfg.run.validate_every == 0 or end):
                    metrics["val_loss"] = val_loss = self.validation_loss()
                if log is not None and (self.iteration % cfg.run.log_every == 0 or end or "val_loss" in metrics):
                    log.write({"iteration": self.iteration, **metrics})
                bar.update(task, advance=1, info=f"loss {metrics['loss']:.4f}")
                stopping = STOP.requested_on_any(self.world_size, self.accelerator.device)
                if stopping or self.iteration % cfg.run.checkpoint_every == 0 or end:
                    last = self.save_checkpoint()
                if stopping:
                    interrupted = not end
                    break
        if log is not None:
            log.close()
        module = self.save_module() if self.is_main and not interrupted else None
        self.accelerator.wait_for_everyone()
        return TrainResult(self.iteration, last, module, val_loss, interrupted)


@torch.no_grad()
def held_out_loss(
    prior,
    dataset: SFADataset,
    ids: list[int],
    cfg: SFATrainConfig,
    unets: tuple[torch.nn.Module | None, torch.nn.Module | None] = (None, None),
    draws: int = 4,
) -> float:
    """Mean diffusion loss of dataset samples ``ids``, ``draws`` (views, t, noise) per sample, fixed by
    cfg.train.seed and the sample, with appearance modules ``unets`` (None: the prior's own UNet)."""
    losses = []
    prompt = prior.embed_prompts(cfg.train.prompt)
    views = min(cfg.train.views, dataset.settings.views)
    for i in ids:
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + VALIDATION_STREAM * (i + 1))
        sample = dataset.load(i)
        for _ in range(draws):
            chosen = torch.randperm(dataset.settings.views, generator=gen)[:views]
            t = torch.randint(0, len(prior.alphas_cumprod), (1,), generator=gen).to(prior.device)
            batch = encode_batch(prior, sample, chosen, cfg.train.control_scale)
            eps = torch.randn(batch.x0.shape, generator=gen).to(batch.x0.device)
            loss = diffusion_loss(prior, batch, t, eps, cfg.fusion, prompt, unets[0], unets[1], _seed_from(gen))
            losses.append(float(loss))
    return sum(losses) / max(len(losses), 1)
