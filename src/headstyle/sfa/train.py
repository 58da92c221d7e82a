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
checkpoints (headstyle.training.checkpointing: safetensors + JSON, checksummed), so a resumed run
continues bitwise. Several processes (accelerate launch) each draw their own samples and average
gradients with one all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle import settings
from headstyle.attention.config import StyleFusionConfig
from headstyle.attention.prior import StyleFusionPrior
from headstyle.distill.shaping import resize_to
from headstyle.priors import controls
from headstyle.priors.base import Control, NoiseQuery
from headstyle.sfa.config import SFATrainConfig, dumps
from headstyle.sfa.dataset import Sample, SFADataset
from headstyle.sfa.module import StyleAppearanceModule
from headstyle.training import checkpointing, runner
from headstyle.training.gradients import GradientStep

MODULE_DIR = "module"
# A run seed's streams are seed * SEED_STRIDE + k: the training stream of process k, and the validation streams of
# held-out sample i at k = VALIDATION_STREAM * (i + 1).
SEED_STRIDE = 1_000_003
# Validation noise is drawn from its own stream, so the validation loss of a sample is the same at every
# evaluation and in every run with the same seed.
VALIDATION_STREAM = 7_919


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


class SFATrainer(runner.Task):
    """Trains a Style Appearance Module on a dataset with a frozen DiffusersPrior (see the module docstring);
    training/runner.py runs the loop: this class supplies its step and its state."""

    def __init__(self, cfg: SFATrainConfig, prior, dataset: SFADataset, accelerator: Any = None) -> None:
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=prior.device.type == "cpu")
        self.cfg = cfg
        self.prior = prior
        self.dataset = dataset
        self.accelerator = accelerator
        self.processes = runner.Processes.of(accelerator)
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
        self.weights = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.params = list(self.weights.values())
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, weight_decay=t.weight_decay)
        self.update = GradientStep(self.params, self.optimizer, self.world_size,
                                   hint="Resume from the last checkpoint with a lower train.lr")  # fmt: skip
        self.rng = torch.Generator().manual_seed(t.seed * SEED_STRIDE + self.rank)
        self.rngs = {"sfa": self.rng}
        self.prompt = prior.embed_prompts(t.prompt)
        self.iteration = 0
        self.val_loss: float | None = None

    @property
    def param_names(self) -> list[str]:
        return list(self.weights)

    def step(self) -> dict[str, Any]:
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
        metrics = self.update(loss, self.iteration + 1)
        return {"loss": float(loss.detach()), **metrics, "t": int(t), "sample": sample.record.sample}

    def measure(self, last: bool) -> dict[str, Any]:
        """The held-out loss every run.validate_every iterations and at the end (when there are held-out samples)."""
        if not self.val_ids or not (self.iteration % self.cfg.run.validate_every == 0 or last):
            return {}
        self.val_loss = self.validation_loss()
        return {"val_loss": self.val_loss}

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean diffusion loss over the held-out samples, each at fixed views, t and noise (the same at
        every call): comparable across iterations and runs."""
        prior, content_unet, style_unet = self.module.fusion(self.prior)
        return held_out_loss(prior, self.dataset, self.val_ids, self.cfg, (content_unet, style_unet))

    # -- state (runner.Task)

    def shared_state(self) -> dict[str, Any]:
        return {**self.update.state(), "dataset_records": len(self.dataset), "role": self.module.role}

    def check_resume(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        if ckpt.meta["role"] != self.module.role:
            raise checkpointing.ResumeError(f"{ckpt.path} trained another module (role {ckpt.meta['role']})")
        if ckpt.meta["dataset_records"] != len(self.dataset):
            raise checkpointing.ResumeError(
                f"{ckpt.path} trained on {ckpt.meta['dataset_records']} samples, the dataset now holds "
                f"{len(self.dataset)}: an exact resume needs the same data (train anew on the grown dataset)"
            )

    def restore(self, ckpt: checkpointing.LoadedCheckpoint) -> None:
        self.update.load_state({"skipped": 0, "nonfinite_in_row": 0, **ckpt.meta})

    def finish(self) -> None:
        self.save_module()

    def save_module(self) -> Path:
        meta = {
            "base_model": self.cfg.model.prior,
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
        cfg = self.cfg
        plan = runner.RunPlan(self.run_dir, cfg.train.iterations, "sfa train", dumps(cfg), cfg.run.checkpoint_every,
                              keep_last=cfg.run.keep_last, log_every=cfg.run.log_every)  # fmt: skip
        end = runner.run(self, plan, self.processes, resume, progress)
        module = self.run_dir / MODULE_DIR if self.processes.is_main and not end.interrupted else None
        return TrainResult(end.iteration, end.checkpoint, module, self.val_loss, end.interrupted)


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
        gen = torch.Generator().manual_seed(cfg.train.seed * SEED_STRIDE + VALIDATION_STREAM * (i + 1))
        sample = dataset.load(i)
        for _ in range(draws):
            chosen = torch.randperm(dataset.settings.views, generator=gen)[:views]
            t = torch.randint(0, len(prior.alphas_cumprod), (1,), generator=gen).to(prior.device)
            batch = encode_batch(prior, sample, chosen, cfg.train.control_scale)
            eps = torch.randn(batch.x0.shape, generator=gen).to(batch.x0.device)
            loss = diffusion_loss(prior, batch, t, eps, cfg.fusion, prompt, unets[0], unets[1], _seed_from(gen))
            losses.append(float(loss))
    return sum(losses) / max(len(losses), 1)
