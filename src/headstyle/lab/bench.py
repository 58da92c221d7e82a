"""Objectives and ablations in the lab, trained for the same budget and seeds, scored against the truth.

A variant is a list of config overrides on top of the lab recipe (``lab_config``: the paper's
LD with mirror, grid and rank re-weighting, adapted to the lab's sizes: 64 px single views, 2x2
grids of 32 px raw renders, 3 rank weights for 3 latent channels, a learning rate for the lab's
small residual field). The trainer (headstyle.stylize.trainer.Stylizer) runs unchanged on the
lab generator and the lab prior.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from headstyle.io import atomic_write_text
from headstyle.lab.evaluate import EvalSet, evaluate, make_eval_set
from headstyle.lab.generator import LabGenerator
from headstyle.lab.prior import LabPrior, build_lab_prior
from headstyle.lab.world import STYLES, UNSTYLED_PROMPT, style_prompt
from headstyle.stylize.config import StylizeConfig, apply_overrides

# name -> overrides of the lab recipe. "ld" is the paper's recipe.
VARIANTS: dict[str, tuple[str, ...]] = {
    "ld": (),
    # DreamFusion's SDS, w(t) = 1 - abar_t (the LD script's own SDS switch drops the eps_uncond term).
    "sds": ("objective.name=sds", "objective.weighting=sds"),
    "ld-no-mirror": ("single.mirror=false",),
    "ld-no-grid": ("grid.enabled=false",),
    "ld-no-rank": ("single.rank_weights=[]",),
    "ld-no-reg": ("regularisers.relative_distance=0.0",),
    "ids": ("objective.name=ids",),
    "ld-mvnrs": ("objective.noise=mv_nrs",),
}
OBJECTIVE_VARIANTS = ("ld", "sds", "ids")
ABLATIONS = ("ld-no-mirror", "ld-no-grid", "ld-no-rank", "ld-no-reg", "ld-mvnrs")

# Columns of the bench table: (metric key, header, format).
COLUMNS = (
    ("rgb_error", "rgb err", ".4f"),
    ("depth_error", "depth err", ".4f"),
    ("silhouette_iou", "IoU", ".3f"),
    ("id_accuracy_appearance", "id acc", ".2f"),
    ("stylisation", "stylisation", ".3f"),
    ("diversity_rgb", "diversity", ".3f"),
    ("mv_warp_error", "mv err", ".4f"),
    ("seconds", "s", ".1f"),
)


@dataclass
class LabSettings:
    """Sizes and budget shared by the demo and the bench."""

    iterations: int = 100
    lr: float = 0.002
    seed: int = 0
    resolution: int = 32
    sr_factor: int = 2
    prior_identities: int = 6
    prior_views: int = 24
    eval_identities: int = 4
    eval_views: int = 8


def lab_config(style: str, settings: LabSettings, out: Path, overrides: tuple[str, ...] = ()) -> StylizeConfig:
    """The lab recipe for ``style`` (LD + mirror + grid + rank re-weighting), then ``overrides``."""
    base = (
        f"prompt.prompt={style_prompt(style)}",
        f"prompt.source_prompt={UNSTYLED_PROMPT}",
        f"model.prior_image_size={settings.resolution * settings.sr_factor}",
        "single.rank_weights=[1.0, 0.75, 0.5]",
        f"optim.lr={settings.lr}",
        # The lab prior's scores are ~100x smaller than SD's latent scores: divide by 10, not 1000.
        "shaping.scale=10.0",
        f"run.iterations={settings.iterations}",
        f"run.checkpoint_every={settings.iterations}",
        f"run.sample_every={settings.iterations}",
        "run.turntable_identities=0",
        f"run.seed={settings.seed}",
        "run.device=cpu",
        f"run.out={out}",
    )
    return apply_overrides(StylizeConfig(), [*base, *overrides])


def new_generator(settings: LabSettings) -> LabGenerator:
    return LabGenerator(resolution=settings.resolution, sr_factor=settings.sr_factor, seed=settings.seed)


def train_variant(
    style: str, variant: str, prior: LabPrior, settings: LabSettings, out: Path, progress: bool = True
) -> tuple[LabGenerator, float]:
    """Stylise a fresh lab generator with one variant; returns it and the training wall time."""
    from headstyle.stylize.checkpointing import clear_run
    from headstyle.stylize.trainer import Stylizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(settings.seed)
    G = new_generator(settings)
    cfg = lab_config(style, settings, out / f"{style}-{variant}", VARIANTS[variant])
    start = time.perf_counter()
    clear_run(cfg.run.out)  # every bench run starts from scratch in its own folder
    Stylizer(cfg, G, prior).train(progress=progress)
    return G.eval(), time.perf_counter() - start


@dataclass
class BenchResult:
    rows: list[dict[str, object]] = field(default_factory=list)

    def markdown(self) -> str:
        head = "| style | variant | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
        sep = "|" + "---|" * (len(COLUMNS) + 2)
        lines = [head, sep]
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['style']} | {r['variant']} | failed: {str(r['error'])[:100]} |")
                continue
            cells = [format(r[k], f) for k, _, f in COLUMNS]
            lines.append(f"| {r['style']} | {r['variant']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        return buf.getvalue()


def run_bench(
    styles: tuple[str, ...],
    variants: tuple[str, ...],
    settings: LabSettings,
    out: Path,
    progress: bool = True,
) -> BenchResult:
    """Train every (style, variant) for the same budget and seed and score it; writes bench.csv/.md in ``out``."""
    unknown = [s for s in styles if s not in STYLES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown styles/variants {unknown}; styles: {', '.join(STYLES)}; variants: {', '.join(VARIANTS)}"
        )
    prior, _ = build_lab_prior(
        styles=tuple(STYLES),
        identities=settings.prior_identities,
        views=settings.prior_views,
        resolution=settings.resolution,
        sr_factor=settings.sr_factor,
        progress=progress,
    )
    result = BenchResult()
    like = new_generator(settings)
    for style in styles:
        ev: EvalSet = make_eval_set(style, like, settings.eval_identities, settings.eval_views)
        result.rows.append({"style": style, "variant": "untrained", **evaluate(like, ev), "seconds": 0.0})
        for variant in variants:
            try:
                G, seconds = train_variant(style, variant, prior, settings, out / "runs", progress)
            except (RuntimeError, ValueError) as exc:
                # One broken variant must not lose the others' figures; the table says why it is missing.
                result.rows.append({"style": style, "variant": variant, "error": f"{type(exc).__name__}: {exc}"})
                continue
            result.rows.append({"style": style, "variant": variant, **evaluate(G, ev), "seconds": seconds})
    atomic_write_text(out / "bench.csv", result.csv())
    atomic_write_text(out / "bench.md", result.markdown())
    return result
