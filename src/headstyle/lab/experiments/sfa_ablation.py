"""DiffStyle360's ablation (its Table 2 and Fig. 12) in the synthetic lab, scored against the lab's ground truth.

Rows, each on the lab's held-out identities and a style that no training pair shows (``unseen``):

- "SFA alone": Style Fusion Attention on the base prior, whose own UNet writes both banks (tau 1.00);
- "+ fine-tuning": one appearance module fine-tuned on the paired dataset writes both banks
  (headstyle.sfa role "shared"; tau 1.00);
- "+ Style Appearance Module": the frozen content module beside a trained Style Appearance Module
  (role "style"; tau 1.00);
- "+ key scaling": the same at ``key_tau``; and the trade-off curve of the same module over ``taus``.

Generation: img2img (DDIM, ``strength`` of ``steps``, CFG ``guidance``) of each identity's base renders at
the lab's evaluation cameras, the content bank written from the identity's front and back base renders and
the style bank from a cross-identity exemplar's front and back in the unseen style: the pairs as the dataset
makes them (headstyle.sfa.dataset). Scores (headstyle.lab.experiments.evaluate.score against the unseen style's truth of
the same identities): stylisation and style_fd (the colour/texture statistics of the style, identity-free;
the lab's FID), rgb_error (to the ground-truth stylised head of the same identity), id_accuracy_appearance
(which truth is nearest), input_distance (colour distance to the identity's own unstylised render: the
paper's ID axis, lower = more like the input) and mv_warp_error (multi-view consistency through the base
geometry, which img2img keeps). Mean +- std over seeds; each seed trains its own modules and draws its own
sampling noise.

``mask_regions`` restricts Style Fusion Attention to named regions of the world (headstyle.lab.world.heads.REGIONS):
each content view's and each style exemplar view's own region mask (world.region_masks) masks its bank's
tokens, and the runs gain outside_distance, the colour distance to the input outside the regions of each
evaluation view (what the mask should keep).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.attention.config import REFERENCE_YAWS, Pairing, SamplingConfig, StyleFusionConfig
from headstyle.attention.prior import StyleFusionPrior
from headstyle.attention.views import stylize_image
from headstyle.cameras import cameras
from headstyle.export import save_figure, save_grid
from headstyle.io import atomic_write_text
from headstyle.lab.experiments.evaluate import EvalSet, Views, make_eval_set, render_views, score
from headstyle.lab.prior.learned import learned_spec
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import STYLES, check_regions, params_from_z, region_masks, region_select, sample_z
from headstyle.lab.world.identities import check_disjoint, held_out_z
from headstyle.metrics.identity import colour_distance
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.priors.loading import load_prior
from headstyle.progress import progress_bar
from headstyle.settings import (
    MAX_IDENTITIES,
    MAX_ITERATIONS,
    MAX_VIEWS,
    check_fields,
    param,
)
from headstyle.sfa.config import SFATrainConfig
from headstyle.sfa.dataset import DatasetSettings, SFADataset, check_no_leak, write_dataset
from headstyle.sfa.module import StyleAppearanceModule, read_manifest
from headstyle.sfa.train import MODULE_DIR, SFATrainer
from headstyle.training import checkpointing
from headstyle.training.signals import STOP

# The unseen style's exemplar identity: drawn apart from the evaluation (1000) and reference (3000) sets.
EXEMPLAR_SEED = 5_000
TRUNCATION_PSI = 0.75  # the lab's evaluation renders (headstyle.lab.experiments.evaluate.render_views)
REGION_FLOOR = 0.05  # region coverage below this counts as none (see world_masks)
# (key, header, format, higher is better)
COLUMNS = (
    ("stylisation", "stylisation", ".3f", True),
    ("style_fd", "style FD", ".4f", False),
    ("rgb_error", "rgb err vs truth", ".4f", False),
    ("id_accuracy_appearance", "id acc", ".2f", True),
    ("input_distance", "input dist", ".4f", False),
    ("mv_warp_error", "mv err", ".4f", False),
)
OUTSIDE_COLUMN = ("outside_distance", "outside dist", ".4f", False)
# name -> (label, the role of the trained module or None for the untrained SFA)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "sfa": ("SFA alone", None),
    "finetune": ("+ fine-tuning", "shared"),
    "sam": ("+ Style Appearance Module", "style"),
}


@dataclass(frozen=True)
class AblationSettings:
    """prior: an SD-layout lab prior folder (the base UNet; `headstyle lab train-prior`). data: an existing
    `headstyle sfa dataset` folder, or "" to write one from the lab's ground truth of the ``seen`` styles
    (samples x views each). Training: iterations, lr, views per batch, samples per style held out for the
    validation loss. Evaluation: the ``unseen`` style, eval identities x views, img2img strength / steps /
    guidance, the tau sweep and the tau of the "+ key scaling" row; pairing: Style Fusion Attention's value
    pairing in training and evaluation ("paper": tau K_s with V_c, as Sec. 3.5 writes; "matched": tau K_s
    with V_s); seeds: one training run and sampling noise each. mask_regions: stylise only these world
    regions (empty: everywhere)."""

    prior: str
    data: str = ""
    seen: tuple[str, ...] = ("statue", "zombie", "toon")
    unseen: str = "gold"
    samples: int = param(24, at_least=1, budget=MAX_IDENTITIES)
    views: int = param(8, at_least=1, budget=MAX_VIEWS)
    iterations: int = param(200, at_least=0, budget=MAX_ITERATIONS)
    lr: float = 1e-4
    train_views: int = param(8, at_least=1, budget=MAX_VIEWS)
    held_out_per_style: int = 2
    eval_identities: int = param(4, at_least=1, budget=MAX_IDENTITIES)
    eval_views: int = param(8, at_least=2, high=MAX_VIEWS.high, why="at least 2 for consistency; " + MAX_VIEWS.why)
    strength: float = 0.6
    steps: int = 25
    guidance: float = 3.0
    taus: tuple[float, ...] = (1.0, 1.025, 1.05, 1.075, 1.1)
    key_tau: float = 1.05
    pairing: Pairing = "paper"
    seeds: tuple[int, ...] = (0, 1)
    mask_regions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [s for s in (*self.seen, self.unseen) if s not in STYLES]
        if unknown:
            raise ValueError(f"unknown lab styles {unknown}; choose from {', '.join(STYLES)}")
        if self.unseen in self.seen:
            raise ValueError(f"the unseen style {self.unseen!r} is among the training styles {list(self.seen)}")
        check_fields(self)
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed")
        if not self.data and self.samples <= self.held_out_per_style:
            raise ValueError(f"samples ({self.samples}) must exceed the {self.held_out_per_style} per style held out "
                             "for the validation loss, or nothing is left to train on")  # fmt: skip
        if not self.taus or not all(math.isfinite(t) and t > 0 for t in (*self.taus, self.key_tau)):
            raise ValueError(f"taus and key_tau must be positive, got {list(self.taus)} and {self.key_tau}")
        SamplingConfig(strength=self.strength, steps=self.steps, guidance_scale=self.guidance)
        if self.mask_regions:
            check_regions(self.mask_regions)
        StyleFusionConfig(pairing=self.pairing)


def lab_like() -> LabGenerator:
    """The lab generator's sizes (the learned prior's 64 px images), no trainable weights."""
    return LabGenerator(resolution=32, sr_factor=2, residual=False).eval()


def load_base_prior(folder: str) -> DiffusersPrior:
    """The SD-layout lab prior through the production path, fp32 on the CPU, VAE posterior means."""
    return load_prior(learned_spec(folder, controlnets=(), latent_sample="mean"), "cpu")


def ensure_dataset(s: AblationSettings, out: Path, eval_z: Tensor, progress: bool) -> SFADataset:
    """The training pairs: s.data, or the lab's ground-truth seen styles written into out/data; never an
    evaluation identity, never the unseen style."""
    if s.data:
        ds = SFADataset(s.data)
    else:
        styles = {name: LabGenerator(resolution=32, sr_factor=2, style=name, residual=False) for name in s.seen}
        settings = DatasetSettings(samples=s.samples, views=s.views, truncation_psi=TRUNCATION_PSI)
        sources = {"base": "lab", **{name: f"lab:{name}" for name in s.seen}}
        ds = write_dataset(out / "data", lab_like(), styles, settings, held_out_z(64), sources, progress=progress)
    check_no_leak(ds, eval_z)
    if s.unseen in ds.styles or f"lab:{s.unseen}" in ds.sources.values():
        raise ValueError(f"{ds.root} trains on the unseen style {s.unseen!r}; evaluate on another style")
    return ds


def train_module(
    s: AblationSettings, prior, ds: SFADataset, role: str, seed: int, out: Path, progress: bool
) -> StyleAppearanceModule:
    """The module of (role, seed), trained in out/runs/<role>-seed<seed>; a finished run is reused, an
    interrupted one resumed from its checkpoint."""
    run = out / "runs" / f"{role}-seed{seed}"
    module_dir = run / MODULE_DIR
    if (module_dir / "sfa_module.json").is_file() and read_manifest(module_dir)["iterations"] == s.iterations:
        return StyleAppearanceModule.load(module_dir, prior.unet)
    cfg = SFATrainConfig()
    cfg.data.path, cfg.data.held_out_per_style = str(ds.root), s.held_out_per_style
    cfg.model.prior = s.prior
    cfg.fusion.pairing = s.pairing
    t = cfg.train
    t.role, t.iterations, t.lr, t.views, t.seed = role, s.iterations, s.lr, s.train_views, seed
    cfg.run.out, cfg.run.checkpoint_every, cfg.run.validate_every = str(run), 50, max(s.iterations, 1)
    trainer = SFATrainer(cfg, prior, ds)
    trainer.train(resume=checkpointing.continue_or_clear(run), progress=progress)
    STOP.raise_if_requested()  # checkpointed: the next call resumes it
    return trainer.module.eval().requires_grad_(False)


@dataclass
class References:
    """Latents of each evaluation identity's front/back base renders (I, 2, C, h, w) and of the unseen
    style's exemplar (2, C, h, w); with mask regions, their region masks (I, 2, h', w') and (2, h', w')."""

    content: Tensor
    style: Tensor
    content_mask: Tensor | None = None
    style_mask: Tensor | None = None


def world_masks(z: Tensor, cams: Tensor, regions: tuple[str, ...], style: str | None = None) -> Tensor:
    """Masks (I, V, h, w) of ``regions`` in the world's renders of identities z (I, P) at cameras (V, 25), at the
    lab renders' raw size and truncation: each pixel's coverage by the regions, 0 below REGION_FLOOR.

    The floor, because Style Fusion Attention drops a style token only where its mask is exactly 0: the soft
    masks' tails (1e-8 far from a region) would keep every style token, with its key scaled to ~0. Soft above
    it, because eyes and brows cover under half of any pixel of a 32 px render."""
    like = lab_like()
    i, v = len(z), len(cams)
    params = params_from_z(TRUNCATION_PSI * z.repeat_interleave(v, 0))
    masks = region_masks(params, cams.repeat(i, 1), like.neural_rendering_resolution, like.rendering_kwargs, style)
    union = region_select(masks, regions)
    return torch.where(union >= REGION_FLOOR, union, 0.0).reshape(i, v, *masks.shape[-2:])


@torch.no_grad()
def references(prior, ev: EvalSet, unseen: str, mask_regions: tuple[str, ...] = ()) -> References:
    like = lab_like()
    ref_cams = cameras(torch.tensor(REFERENCE_YAWS), torch.zeros(len(REFERENCE_YAWS)))
    content = render_views(like, ev.z, ref_cams, TRUNCATION_PSI).image
    styled = LabGenerator(resolution=32, sr_factor=2, style=unseen, residual=False)
    exemplar_z = sample_z(1, EXEMPLAR_SEED)
    exemplar = render_views(styled, exemplar_z, ref_cams, TRUNCATION_PSI).image[0]
    i = content.shape[0]
    c = prior.encode(content.flatten(0, 1))
    refs = References(c.reshape(i, 2, *c.shape[1:]), prior.encode(exemplar))
    if mask_regions:
        refs.content_mask = world_masks(ev.z, ref_cams, mask_regions)
        refs.style_mask = world_masks(exemplar_z, ref_cams, mask_regions, unseen)[0]
    return refs


@torch.no_grad()
def generate(
    prior, unets: tuple[nn.Module | None, nn.Module | None], refs: References, ev: EvalSet, tau: float,
    s: AblationSettings, seed: int,
) -> Views:
    """img2img of every evaluation identity's base views through SFA with the given appearance modules."""
    fusion = StyleFusionConfig(tau=tau, pairing=s.pairing)
    sampling = SamplingConfig(strength=s.strength, steps=s.steps, guidance_scale=s.guidance, seed=seed)
    images = []
    for i in range(ev.z.shape[0]):
        content_mask = None if refs.content_mask is None else refs.content_mask[i]
        sfa = StyleFusionPrior(prior, refs.style, config=fusion, style_mask=refs.style_mask, content_unet=unets[0],
                               style_unet=unets[1], seed=seed * 1_000 + i, content_mask=content_mask)  # fmt: skip
        noise = torch.Generator().manual_seed(seed * 1_000 + i)
        images.append(stylize_image(sfa, ev.before.image[i], None, sampling, noise, content=refs.content[i]))
    # img2img keeps the base geometry: depth and mask are the base renders'
    return Views(torch.stack(images), ev.before.depth, ev.before.mask)


def scores(pred: Views, ev: EvalSet, inside: Tensor | None = None) -> dict[str, float]:
    """headstyle.lab.experiments.evaluate.score plus input_distance, and outside_distance when ``inside`` (I, V, h, w),
    the evaluation views' region masks, is given (see the module docstring)."""
    out = score(pred, ev)
    b = ev.before
    size = pred.image.shape[-2:]

    def on_images(mask: Tensor) -> Tensor:
        # masks come at the raw render's size, images super-resolved: compare on the images' grid
        return F.interpolate(mask.flatten(0, 1), size=size, mode="nearest-exact").reshape(*mask.shape[:3], *size)

    mask = on_images(b.mask)
    out["input_distance"] = float(colour_distance(pred.image, mask, b.image, mask).mean())
    if inside is not None:
        outside = mask * (1 - on_images(inside.unsqueeze(2)))
        out["outside_distance"] = float(colour_distance(pred.image, outside, b.image, outside).mean())
    return {k: float(v) for k, v in out.items()}


@dataclass
class AblationResult:
    """Every (row, tau, seed) scored; the table rows and the tau curve."""

    runs: list[dict[str, Any]]
    settings: AblationSettings

    def rows(self) -> list[tuple[str, float]]:
        """(variant, tau) of Table 2's rows."""
        return [("input", 0.0), ("sfa", 1.0), ("finetune", 1.0), ("sam", 1.0), ("sam", self.settings.key_tau)]

    def stats(self, variant: str, tau: float, key: str) -> tuple[float, float]:
        values = [r[key] for r in self.runs if r["variant"] == variant and math.isclose(r["tau"], tau)]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    def markdown(self) -> str:
        s = self.settings
        columns = COLUMNS + ((OUTSIDE_COLUMN,) if s.mask_regions else ())
        head = "| row | tau | " + " | ".join(f"{h} {'↑' if up else '↓'}" for _, h, _, up in columns) + " |"
        lines = [head, "|" + "---|" * (len(columns) + 2)]
        labels = {"input": "input (unstylised render)", **{k: v[0] for k, v in VARIANTS.items()}}
        for variant, tau in self.rows():
            label = "+ key scaling" if variant == "sam" and not math.isclose(tau, 1.0) else labels[variant]
            cells = []
            for key, _, fmt, _ in columns:
                mean, std = self.stats(variant, tau, key)
                cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
            tau_text = "-" if variant == "input" else f"{tau:.3f}"
            lines.append(f"| {label} | {tau_text} | " + " | ".join(cells) + " |")
        lines += ["", f"tau sweep of {labels['sam']} (Fig. 12):", "", head, lines[1]]
        for tau in s.taus:
            cells = [f"{m:{fmt}} ± {d:{fmt}}" for key, _, fmt, _ in columns for m, d in [self.stats("sam", tau, key)]]
            lines.append(f"| {labels['sam']} | {tau:.3f} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        keys = list(dict.fromkeys(k for r in self.runs for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.runs)
        return buf.getvalue()


def plot_tradeoff(result: AblationResult, path: Path) -> None:
    """tradeoff.png: stylisation and input distance (the identity axis) against tau, mean +- std over seeds,
    with the untrained SFA and the fine-tuned module at tau 1 as markers (the paper's Fig. 12)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    taus = list(result.settings.taus)
    panels = (("stylisation", "stylisation (higher = more style)"),
              ("input_distance", "distance to the input (lower = more identity)"),
              ("rgb_error", "rgb error vs the ground truth"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        stats = [result.stats("sam", t, key) for t in taus]
        ax.errorbar(taus, [m for m, _ in stats], yerr=[d for _, d in stats], marker="o", capsize=3,
                    label=VARIANTS["sam"][0])  # fmt: skip
        for variant, marker in (("sfa", "s"), ("finetune", "^")):
            m, d = result.stats(variant, 1.0, key)
            ax.errorbar([1.0], [m], yerr=[d], marker=marker, linestyle="none", capsize=3, label=VARIANTS[variant][0])
        ax.set_title(title)
        ax.set_xlabel("key scaling tau")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def run_ablation(s: AblationSettings, out: Path, progress: bool = True) -> AblationResult:
    """Train the modules per seed, generate and score every row and tau; writes ablation.md / .csv / .json,
    tradeoff.png and views.png (the first identity: input, truth, then each row) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ev = make_eval_set(s.unseen, lab_like(), s.eval_identities, s.eval_views)
    check_disjoint(sample_z(1, EXEMPLAR_SEED), ev.z)
    ds = ensure_dataset(s, out, ev.z, progress)
    prior = load_base_prior(s.prior)
    refs = references(prior, ev, s.unseen, s.mask_regions)
    inside = world_masks(ev.z, ev.cams, s.mask_regions) if s.mask_regions else None
    runs: list[dict[str, Any]] = [
        {"variant": "input", "tau": 0.0, "seed": seed, **scores(ev.before, ev, inside)} for seed in s.seeds
    ]
    sheet = [ev.before.image[0], ev.truth.image[0]]
    configs = [("sfa", 1.0), ("finetune", 1.0), *(("sam", tau) for tau in s.taus)]
    if not any(math.isclose(s.key_tau, t) for t in s.taus):
        configs.append(("sam", s.key_tau))
    for seed in s.seeds:
        modules = {role: train_module(s, prior, ds, role, seed, out, progress) for role in ("shared", "style")}
        with progress_bar(disable=not progress) as bar:
            task = bar.add_task(f"sfa ablation seed {seed}", total=len(configs))
            for variant, tau in configs:
                role = VARIANTS[variant][1]
                fused, *unets = (prior, None, None) if role is None else modules[role].fusion(prior)
                pred = generate(fused, tuple(unets), refs, ev, tau, s, seed)
                runs.append({"variant": variant, "tau": tau, "seed": seed, **scores(pred, ev, inside)})
                if seed == s.seeds[0] and (variant != "sam" or math.isclose(tau, 1.0) or math.isclose(tau, s.key_tau)):
                    sheet.append(pred.image[0])
                bar.update(task, advance=1, info=f"{variant} tau {tau:.3f}")
    result = AblationResult(runs, s)
    atomic_write_text(out / "ablation.md", result.markdown())
    atomic_write_text(out / "ablation.csv", result.csv())
    atomic_write_text(out / "ablation.json", json.dumps({"settings": asdict(s), "runs": runs}, indent=1))
    plot_tradeoff(result, out / "tradeoff.png")
    save_grid(torch.cat(sheet), out / "views.png", cols=s.eval_views)
    return result
