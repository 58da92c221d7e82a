"""What the learned lab prior knows about the head world, measured through DiffusersPrior; its model card.

Figures (all on ground-truth renders of the lab's HELD-OUT identities unless said otherwise):

- diffusion classifier: for each render x0, t in ``CLASSIFIER_T`` (all <= 281) and CLASSIFIER_DRAWS noises,
  the eps error || eps - eps_theta(x_t, t, prompt) ||^2 of each domain's prompt under shared noise; the domain
  with the lowest summed error is the prediction (Li et al. 2023, "Your diffusion model is secretly
  a zero-shot classifier"). On single views and on 2x2 grids.
- memorisation: mean eps error at t <= 281 (own prompt) on held-out renders / the same on the
  prior's training identities at their training cameras (same noise, same t).
- samples: DDIM (eta = 0) + classifier-free guidance from pure noise per prompt, classified by the
  nearest ground-truth colour-statistics centroid (per-channel mean and std, foreground mean).
- guidance moves towards the truth: DDIM img2img of held-out UNSTYLED single views from t0 in
  IMG2IMG_T with each style prompt; ratio = rgb error(result, the identity's ground-truth stylised
  render) / rgb error(unstyled render, the same). Below 1: the prompt pulls towards the truth. Its floor:
  the same img2img started from the ground-truth stylised render itself, over the same denominator: how far
  DDIM from t0 strays even from the truth. Where the floor is near 1, no prompt can bring the ratio under 1.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.distill.objectives import guided_eps
from headstyle.distill.shaping import tile_2x2
from headstyle.export import save_grid
from headstyle.io import atomic_write_text
from headstyle.lab.prior.data import prior_identities, render_domain, single_view
from headstyle.lab.prior.learned import learned_spec
from headstyle.lab.prior.recipe import (
    CONTROLNETS,
    DOMAINS,
    IDENTITY_SEED,
    PHRASINGS,
    TrainPriorConfig,
    domain_name,
    stream,
)
from headstyle.lab.prior.train import read_stages
from headstyle.lab.world.identities import held_out_z, stratified_360_cameras
from headstyle.priors.base import Control, NoiseQuery
from headstyle.priors.loading import load_prior

CLASSIFIER_T = (101, 181, 281)
CLASSIFIER_DRAWS = 4  # noise draws per t: the classifier averages its eps errors, as Li et al. do over many
IMG2IMG_T = (281, 481)
GUIDANCE = 5.0
CONTROL_T = 681


@dataclass
class Renders:
    """Ground truth per domain: raw views (N, 3, r, r) in [-1, 1] and depth controls (N, 1, r, r) in [0, 1];
    N = identities * views (identity-major)."""

    raw: dict[str | None, Tensor]
    depth: dict[str | None, Tensor]
    views: int

    def single(self, domain: str | None) -> Tensor:
        return single_view(self.raw[domain])

    def grids(self, domain: str | None) -> tuple[Tensor, Tensor]:
        """2x2 grids of each identity's first four views and their depth controls (3 channels)."""
        def tile(x: Tensor) -> Tensor:
            x = x.reshape(-1, self.views, *x.shape[1:])[:, :4]
            return tile_2x2([x[:, k] for k in range(4)])

        return tile(self.raw[domain]), tile(self.depth[domain]).expand(-1, 3, -1, -1)


def render_truth(z: Tensor, cams: Tensor, resolution: int = 32) -> Renders:
    """Ground-truth renders of identities z at cams (len(z) * V, 25) in every domain, quantised like the data."""
    raw, depth = {}, {}
    for d in DOMAINS:
        parts = list(render_domain(z, cams, d, resolution, chunk=64))
        raw[d] = torch.cat([p["raw"] for p in parts]).float() / 127.5 - 1
        depth[d] = torch.cat([p["depth"] for p in parts]).float() / 255
    return Renders(raw, depth, len(cams) // len(z))


def eval_cameras(identities: int, views: int, cfg: TrainPriorConfig) -> Tensor:
    """(identities * views, 25): the training cameras of the first ``identities`` training identities, ``views``
    of each spread over their 360-degree sectors. Held-out and training identities are rendered at these same
    cameras, so the two sets differ only in who is rendered."""
    gen = torch.Generator().manual_seed(IDENTITY_SEED + stream(cfg, "cameras"))
    cams = stratified_360_cameras(cfg.identities, cfg.views, gen).reshape(cfg.identities, cfg.views, 25)
    return cams[:identities, torch.arange(views) * (cfg.views // views)].reshape(-1, 25)


def held_out_truth(identities: int, views: int, cfg: TrainPriorConfig) -> Renders:
    """The lab's held-out identities (never seen by the prior) at eval_cameras."""
    return render_truth(held_out_z(identities), eval_cameras(identities, views, cfg), cfg.resolution)


def training_truth(identities: int, views: int, cfg: TrainPriorConfig) -> Renders:
    """The first ``identities`` training identities at eval_cameras (images the prior was trained on)."""
    cams = eval_cameras(identities, views, cfg)
    return render_truth(prior_identities(cfg)[:identities], cams, cfg.resolution)


# ---------------------------------------------------------------------------------------------- eps errors


@torch.no_grad()
def eps_errors(
    prior, latents: Tensor, prompts: list[str], ts: tuple[int, ...], seed: int, control: Control | None = None,
    batch: int = 64, draws: int = 1,
) -> Tensor:
    """Mean squared eps error (N, len(prompts), len(ts)) of each latent under each prompt, averaged over ``draws``
    noise draws per t; each noise is shared by all prompts (paired comparison)."""
    from headstyle.priors.base import PromptEmbeds

    gen = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    out = torch.zeros(n, len(prompts), len(ts))
    embeds = [prior.embed_prompts(p).cond for p in prompts]
    # predict_noise evaluates (uncond, cond) of a query: two prompts per query halve the UNet calls.
    pairs = [(i, min(i + 1, len(prompts) - 1)) for i in range(0, len(prompts), 2)]
    for j, t in [(j, t) for j, t in enumerate(ts) for _ in range(draws)]:
        eps = torch.randn(latents.shape, generator=gen)
        tt = torch.tensor([t])
        x_t = prior.add_noise(latents, eps, tt)
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            ctl = None if control is None else Control(control.name, control.image[sl], control.scale)
            queries = [NoiseQuery(x_t[sl], tt, PromptEmbeds(embeds[a], embeds[b]), ctl) for a, b in pairs]
            for (a, b), (e_a, e_b) in zip(pairs, prior.predict_noise(queries), strict=True):
                # an odd prompt count pairs the last prompt with itself: count it once
                for k, e in {a: e_a, b: e_b}.items():
                    out[sl, k, j] += (e - eps[sl]).square().flatten(1).mean(1) / draws
    return out


@torch.no_grad()
def encode(prior, images: Tensor) -> Tensor:
    """Posterior means (deterministic latents) of images in [-1, 1]."""
    return prior.vae.encode(images.to(prior.vae_dtype)).latent_dist.mean.float() * prior.scaling_factor


def classify(prior, renders: Renders, grid: bool, seed: int = 0, draws: int = CLASSIFIER_DRAWS) -> tuple[float, Tensor]:
    """Diffusion-classifier accuracy over every domain's renders, and the (true, predicted) confusion counts."""
    prompts = [PHRASINGS[d][0] for d in DOMAINS]
    confusion = torch.zeros(len(DOMAINS), len(DOMAINS), dtype=torch.long)
    for k, d in enumerate(DOMAINS):
        if grid:
            images, depth = renders.grids(d)
            control = Control("depth", depth)
        else:
            images, control = renders.single(d), None
        err = eps_errors(prior, encode(prior, images), prompts, CLASSIFIER_T, seed, control, draws=draws).sum(-1)
        confusion[k] += torch.bincount(err.argmin(1), minlength=len(DOMAINS))
    return float(confusion.diag().sum() / confusion.sum()), confusion


def denoising_error(prior, renders: Renders, seed: int = 0) -> float:
    """Mean eps error at CLASSIFIER_T with each render's own prompt, over all domains (single views)."""
    errs = [
        eps_errors(prior, encode(prior, renders.single(d)), [PHRASINGS[d][0]], CLASSIFIER_T, seed).mean()
        for d in DOMAINS
    ]
    return float(torch.stack(errs).mean())


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def ddim(
    prior, x: Tensor, prompt: str, start_t: int, steps: int, guidance: float, control: Control | None = None
) -> Tensor:
    """DDIM (eta = 0) with classifier-free guidance eps_u + w (eps_c - eps_u), from x at start_t down to t = 0
    over the scheduler's ``steps``-step grid (timesteps <= start_t); returns the predicted x0 latents."""
    grid = prior.inference_timesteps(steps)
    ts = [int(t) for t in grid if int(t) <= start_t]
    abar = prior.alphas_cumprod.cpu()
    embeds = prior.embed_prompts(prompt)
    for i, t in enumerate(ts):
        eps_u, eps_c = prior.predict_noise([NoiseQuery(x, torch.tensor([t]), embeds, control)])[0]
        eps = guided_eps(eps_u, eps_c, guidance)
        a = abar[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def sample(prior, prompt: str, n: int, seed: int, steps: int = 25, guidance: float = GUIDANCE) -> Tensor:
    """n DDIM + CFG samples of ``prompt`` from pure noise, decoded to images in [-1, 1]."""
    size = prior.image_size // prior.vae_scale_factor
    noise = torch.randn(n, prior.latent_channels, size, size, generator=torch.Generator().manual_seed(seed))
    start = int(prior.inference_timesteps(steps)[0])
    return prior.decode(ddim(prior, noise, prompt, start, steps, guidance))


def colour_features(images: Tensor) -> Tensor:
    """Colour statistics (N, 9): per-channel mean and std over the image, per-channel mean over the head
    (pixels not near the white background)."""
    x = (images.float() + 1) / 2
    fg = foreground(images).unsqueeze(1).float()
    fg_mean = (x * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1)
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), fg_mean], dim=1)


def centroid_classifier(renders: Renders):
    """Nearest domain centroid of standardised colour features, fitted on ground-truth single views."""
    feats = {d: colour_features(renders.single(d)) for d in DOMAINS}
    pooled = torch.cat(list(feats.values()))
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
    centroids = torch.stack([((f - mu) / sd).mean(0) for f in feats.values()])

    def predict(images: Tensor) -> Tensor:
        return torch.cdist((colour_features(images) - mu) / sd, centroids).argmin(1)

    return predict


def sample_accuracy(prior, renders: Renders, n: int, seed: int = 0, steps: int = 25) -> tuple[dict[str, float], dict]:
    """Per domain (by domain_name), the share of its prompt's DDIM + CFG samples classified into it; the samples."""
    predict = centroid_classifier(renders)
    samples, accuracy = {}, {}
    for k, d in enumerate(DOMAINS):
        samples[d] = sample(prior, PHRASINGS[d][0], n, seed + k, steps)
        accuracy[domain_name(d)] = float((predict(samples[d]) == k).float().mean())
    return accuracy, samples


def img2img_ratios(
    prior, renders: Renders, seed: int = 0, steps: int = 25, from_truth: bool = False
) -> dict[tuple[str, int], float]:
    """(style, t0) -> mean rgb error(img2img of the unstyled render, GT style) / rgb error(unstyled, GT style).
    from_truth: img2img starts from the GT stylised render itself instead (same noise): the ratio's floor."""
    src = renders.single(None)
    src_latents = encode(prior, src)
    truths = {style: renders.single(style) for style in DOMAINS[1:]}
    starts = {style: encode(prior, truth) if from_truth else src_latents for style, truth in truths.items()}
    out = {}
    for t0 in IMG2IMG_T:
        eps = torch.randn(src_latents.shape, generator=torch.Generator().manual_seed(seed + t0))
        for style, truth in truths.items():
            x_t = prior.add_noise(starts[style], eps, torch.tensor([t0]))
            result = prior.decode(ddim(prior, x_t, PHRASINGS[style][0], t0, steps, GUIDANCE))
            before = (src - truth).square().flatten(1).mean(1)
            after = (result - truth).square().flatten(1).mean(1)
            out[(style, t0)] = float(after.mean() / before.mean())
    return out


def foreground(images: Tensor) -> Tensor:
    """Head pixels (N, H, W): not near the white background."""
    return ((images.float() + 1) / 2).amin(1) < 0.9


def control_iou(prior, renders: Renders, t0: int = CONTROL_T, seed: int = 0, steps: int = 25) -> dict[str, float]:
    """Silhouette IoU with the ground-truth stylised grid of DDIM img2img of unstyled 2x2 grids from t0 with each
    style prompt, without and with the depth ControlNet (the grid branch's control): does the control keep the
    identity's geometry?"""
    src, depth = renders.grids(None)
    latents = encode(prior, src)
    x_t = prior.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)),
                          torch.tensor([t0]))  # fmt: skip
    out = {}
    for control in (None, Control("depth", depth)):
        ious = []
        for style in DOMAINS[1:]:
            truth = foreground(renders.grids(style)[0])
            pred = foreground(prior.decode(ddim(prior, x_t, PHRASINGS[style][0], t0, steps, GUIDANCE, control)))
            ious.append(((pred & truth).sum((1, 2)) / (pred | truth).sum((1, 2)).clamp_min(1)).mean())
        out["depth" if control is not None else "none"] = float(torch.stack(ious).mean())
    return out


# ---------------------------------------------------------------------------------------------- the card


def measure(folder: Path, cfg: TrainPriorConfig, identities: int = 8, views: int = 4, samples: int = 8) -> dict:
    """Every figure of the card (see the module docstring)."""
    prior = load_prior(learned_spec(folder), "cpu")
    held = held_out_truth(identities, views, cfg)
    train = training_truth(identities, views, cfg)
    single_acc, single_conf = classify(prior, held, grid=False)
    grid_acc, _ = classify(prior, held, grid=True)
    held_err, train_err = denoising_error(prior, held), denoising_error(prior, train)
    sample_acc, sheet = sample_accuracy(prior, held, samples)
    ratios = img2img_ratios(prior, held)
    floors = img2img_ratios(prior, held, from_truth=True)
    iou = control_iou(prior, held)
    return {
        "held_out": {"identities": identities, "views": views, "samples_per_prompt": samples},
        "classifier_single": single_acc,
        "classifier_single_confusion": single_conf.tolist(),
        "classifier_grid_depth": grid_acc,
        "eps_error_held_out": held_err,
        "eps_error_training": train_err,
        "eps_error_ratio": held_err / train_err,
        "sample_accuracy": sum(sample_acc.values()) / len(sample_acc),
        "sample_accuracy_per_prompt": sample_acc,
        "img2img_ratio": {f"{s}@{t}": r for (s, t), r in ratios.items()},
        "img2img_floor": {f"{s}@{t}": r for (s, t), r in floors.items()},
        "grid_silhouette_iou": iou,
        "_sheet": sheet,
    }


def parameter_counts(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts = {}
    for sub in ("vae", "text_encoder", "unet", *(f"controlnet-{n}" for n in CONTROLNETS)):
        total = 0
        for f in sorted((folder / sub).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        counts[sub] = total
    return counts


def write_card(folder: Path, run: Path | None, cfg: TrainPriorConfig, command: str) -> dict:
    """Measure the model in ``folder`` and write folder/README.md and folder/samples.png."""
    start = time.perf_counter()
    figures = measure(folder, cfg)
    sheet = figures.pop("_sheet")
    rows = [sheet[d] for d in DOMAINS]
    save_grid(F.interpolate(torch.cat(rows), scale_factor=2, mode="nearest"), folder / "samples.png", cols=len(rows[0]))
    stages = read_stages(run) if run is not None else json.loads((folder / "stages.json").read_text())
    if run is not None:
        atomic_write_text(folder / "stages.json", json.dumps(stages, indent=2) + "\n")
    counts = parameter_counts(folder)
    figures["card_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(folder / "figures.json", json.dumps(figures, indent=2) + "\n")
    atomic_write_text(folder / "README.md", _card_text(figures, stages, counts, cfg, command))
    return figures


def _card_text(figures: dict, stages: dict, counts: dict, cfg: TrainPriorConfig, command: str) -> str:
    lines = [
        "# The lab's learned prior",
        "",
        "A tiny Stable-Diffusion-1.5-shaped latent diffusion model of the synthetic head world",
        "(headstyle.lab.world.heads), loaded by `load_prior(learned_spec(folder), device)`",
        "(headstyle.lab.prior.learned).",
        "64 px images: single views (32 px raw render x2 bilinear) and 2x2 grids of 32 px raw renders;",
        f"AutoencoderKL with factor 4 -> 16x16x4 latents; a CLIPTextModel with its own vocabulary "
        f"({'trained with the UNet' if cfg.train_text else 'frozen at its random init'});",
        "UNet2DConditionModel (epsilon, scaled-linear betas 0.00085..0.012, 1000 steps, "
        f"{cfg.prompt_dropout:.0%} prompt dropout); ControlNets: depth (grids), canny (single views).",
        "",
        f"Reproduce: `{command}` (seed {cfg.seed}; identities seed {IDENTITY_SEED + cfg.seed}).",
        "",
        "## Data",
        "",
        f"{cfg.identities} identities x {cfg.views} stratified 360-degree cameras x {len(DOMAINS)} domains "
        f"({', '.join(domain_name(d) for d in DOMAINS)}), disjoint from the lab's held-out identities.",
        "Prompts per domain: " + "; ".join(f"{domain_name(d)}: " + " | ".join(PHRASINGS[d]) for d in DOMAINS),
        "",
        "## Stages",
        "",
        "| stage | wall s (1 thread) | steps | parameters | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in stages.items():
        lines.append(
            f"| {name} | {s.get('seconds', 0):.0f} | {s.get('steps', '')} | {s.get('parameters', '')} | "
            + (f"{s['final_loss']:.4f}" if "final_loss" in s else "")
            + " |"
        )
    lines += [
        "",
        "Wall seconds of one torch thread on a shared 2-core machine (other jobs ran beside it; the decoder stage "
        "ran beside the UNet stage, which it cannot affect: the encoder is frozen).",
        "",
        "Parameters per component: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
        "",
    ]
    f = figures
    lines += [
        f"## What it learned ({f['held_out']['identities']} held-out identities x {f['held_out']['views']} "
        "training cameras, every domain)",
        "",
        f"- Diffusion classifier at t in {CLASSIFIER_T}, {CLASSIFIER_DRAWS} noise draws each: single views "
        f"{f['classifier_single']:.3f}, 2x2 grids with depth control {f['classifier_grid_depth']:.3f}.",
        f"- Denoising error held-out / training identities: {f['eps_error_held_out']:.4f} / "
        f"{f['eps_error_training']:.4f} = {f['eps_error_ratio']:.3f}.",
        f"- DDIM (25 steps) + CFG {GUIDANCE} samples classified to their domain by colour statistics: "
        f"{f['sample_accuracy']:.3f} (per prompt: "
        + ", ".join(f"{k} {v:.2f}" for k, v in f["sample_accuracy_per_prompt"].items())
        + "). Sheet: samples.png (rows: " + ", ".join(domain_name(d) for d in DOMAINS) + ").",
        f"- img2img (DDIM over the 25-step grid, CFG {GUIDANCE}) of unstyled renders with each style prompt, "
        "rgb error to the ground-truth style relative to the unstyled render's (below 1 = closer). Floor: the "
        "same img2img started from the ground-truth style itself, over the same denominator (how far DDIM "
        "from t0 strays even from the truth):",
        "",
        "| style | " + " | ".join(f"t0 = {t}" for t in IMG2IMG_T) + " | "
        + " | ".join(f"floor at {t}" for t in IMG2IMG_T) + " |",
        "|---|" + "---:|" * 2 * len(IMG2IMG_T),
    ]
    for style in DOMAINS[1:]:
        cells = [f[key][f"{style}@{t}"] for key in ("img2img_ratio", "img2img_floor") for t in IMG2IMG_T]
        lines.append(f"| {style} | " + " | ".join(f"{r:.3f}" for r in cells) + " |")
    iou = f["grid_silhouette_iou"]
    lines += [
        "",
        f"- Geometry under control: img2img of unstyled 2x2 grids from t0 = {CONTROL_T} with each style prompt; "
        f"silhouette IoU with the ground-truth stylised grid {iou['none']:.3f} without, {iou['depth']:.3f} with "
        "the depth ControlNet.",
        "",
        "![samples](samples.png)",
        "",
    ]
    return "\n".join(lines)
