"""Objectives, ablations and optimisers in the lab, trained for the same budget and seeds, scored against the truth.

A variant is a change of the lab recipe's config, made with dataclasses.replace (``lab_config``: the
paper's LD with mirror, grid and rank re-weighting at the lab's sizes: 64 px single views = 32 px raw
renders x2, 2x2 grids of 32 px raw renders, and LD's gradient shaping for the prior's latents, see
headstyle.lab.prior.learned.PriorProfile); an optimiser is a change of its optim section (the paper's Adam,
SGD with momentum, and the diffusion-classifier stopping rule). The trainer (headstyle.stylize.trainer.Stylizer)
runs unchanged on the lab generator and the prior, the learned lab prior by default.

Per run the bench records, besides the lab's metrics on held-out identities: the share of iterations
whose objective gradient is exactly zero at the rendered images (the trainer's logged
objective_grad_zero: the gradient that reaches the images through the prior's encoder, so neither the
regulariser nor the Tweedie losses count) or non-finite (the objective's own count, from the run's log),
and for LD and SDS the metrics every ``curve_every`` iterations (from the run's checkpoints). Over seeds
it writes mean and std per metric (bench.md, bench.csv), every run (runs.csv), and the curves (curves.csv,
curves.png). A run that trained fewer iterations than the budget is marked in the tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headstyle import cameras
from headstyle.distill.objectives import DDSParams, IDSParams, NFSDParams, ObjectiveParams, SDSParams
from headstyle.export import save_figure
from headstyle.input_files import check_fields, read_json_object, read_text
from headstyle.io import atomic_write_text
from headstyle.lab.experiments.evaluate import EvalSet, evaluate, make_eval_set
from headstyle.lab.prior.learned import EXEMPLAR, EXEMPLAR_SHAPING, LabPriorSpec, PriorProfile
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import STYLES, UNSTYLED_PROMPT, style_prompt
from headstyle.priors.base import ScorePrior
from headstyle.settings import SEED_END
from headstyle.stylize import stopping
from headstyle.stylize.config import OptimConfig, StylizeConfig, load_saved_config, resume_differences, validate
from headstyle.training import checkpointing
from headstyle.training.lock import folder_lock
from headstyle.training.log import read_log
from headstyle.training.signals import STOP

# A change of the lab recipe's config.
Variant = Callable[[StylizeConfig], StylizeConfig]


def _objective(name: str, params: ObjectiveParams) -> Variant:
    """The recipe with objective ``name`` and its parameters ``params``."""
    return lambda c: replace(c, objective=replace(c.objective, name=name, params=params))


# name -> change of the lab recipe. "ld" is the paper's recipe.
VARIANTS: dict[str, Variant] = {
    "ld": lambda c: c,
    # DreamFusion's SDS, w(t) = 1 - abar_t (the LD script's own SDS switch drops the eps_uncond term).
    "sds": _objective("sds", SDSParams(weighting="sds")),
    "ids": _objective("ids", IDSParams()),
    # DDS applies: the lab's frozen renders are the unstyled domain, prompt.source_prompt describes them.
    "dds": _objective("dds", DDSParams()),
    "nfsd": _objective("nfsd", NFSDParams()),
    "ld-no-mirror": lambda c: replace(c, single=replace(c.single, mirror=False)),
    "ld-no-grid": lambda c: replace(c, grid=replace(c.grid, enabled=False)),
    "ld-no-rank": lambda c: replace(c, single=replace(c.single, rank_weights=())),
    "ld-no-reg": lambda c: replace(c, regularisers=replace(c.regularisers, relative_distance=0.0)),
    "ld-mvnrs": lambda c: replace(c, objective=replace(c.objective, noise="mv_nrs")),
}
OBJECTIVE_VARIANTS = ("ld", "sds", "ids", "dds", "nfsd")
ABLATIONS = ("ld-no-mirror", "ld-no-grid", "ld-no-rank", "ld-no-reg", "ld-mvnrs")
# Variants whose metrics are followed over iterations (curves.csv, curves.png).
CURVE_VARIANTS = ("ld", "sds", "ids", "dds", "ld-no-reg")


def _optimizer(name: str, optim: OptimConfig, lr: float) -> OptimConfig:
    """``optim`` as the bench's optimiser ``name`` (OPTIMIZERS), SGD's steady step set from ``lr``."""
    sgd = replace(optim, name="sgd", momentum=0.9, sgd_step=float(lr))
    stop = replace(optim, stop_rule="classifier")
    return {"adam": replace(optim, stop_rule="none"), "sgd": replace(sgd, stop_rule="none"), "adam-stop": stop,
            "adam-decay": replace(stop, stop_action="decay", stop_decay=0.1),
            "sgd-stop": replace(sgd, stop_rule="classifier")}[name]  # fmt: skip


# The paper's Adam, run to the budget as its script does; SGD with momentum 0.9 whose step is proportional to the
# gradient (its learning rate set at the first step so that a constant gradient would reach steady steps as long, in
# RMS, as Adam's: --lr); either with the diffusion-classifier stopping rule (optim.stop_rule,
# headstyle.stylize.stopping: the product's default), which ends the run (-stop) or divides Adam's learning rate by
# 10 (-decay) where the margin passes 0.
OPTIMIZERS = ("adam", "sgd", "adam-stop", "adam-decay", "sgd-stop")

# Columns of the bench table: (metric key, header, format).
COLUMNS = (
    ("rgb_error", "rgb err", ".4f"),
    ("depth_error", "depth err", ".4f"),
    ("silhouette_iou", "IoU", ".3f"),
    ("id_accuracy_appearance", "id acc", ".2f"),
    ("stylisation", "stylisation", ".3f"),
    ("diversity_rgb", "diversity", ".3f"),
    ("mv_warp_error", "mv err", ".4f"),
    ("zero_grad_share", "zero grad", ".2f"),
    ("iterations_run", "iters", ".0f"),
    ("seconds", "s", ".1f"),
)
# Metrics of bench.md's variant x style tables.
PIVOT_METRICS = ("stylisation", "rgb_error", "id_accuracy_appearance")
# Figures of a run that are not evaluation metrics (a bench row's evaluate() keys are the rest).
RUN_FIGURES = ("zero_grad_share", "nonfinite_grad_share", "iterations_run", "seconds")
CURVE_METRICS = (("stylisation", "stylisation"), ("id_accuracy_appearance", "identity retrieval"),
                 ("rgb_error", "rgb error vs truth"), (stopping.MARGIN, "classifier margin (label-free)"))  # fmt: skip


@dataclass
class LabSettings:
    """Sizes, prior and budget shared by the demo and the bench.

    prior: "" = the shipped learned lab prior, "exemplar", or an SD folder (headstyle.lab.prior.learned);
    t_range: the objective's timesteps (low, high), inclusive, or None for the recipe's DDIM steps 35-49
    (t in 1..281 for SD's schedule); curve_every: evaluate LD and SDS runs every so many iterations (0 = off).
    """

    iterations: int = 100
    lr: float = 0.002
    seed: int = 0
    resolution: int = 32
    sr_factor: int = 2
    prior_identities: int = 6
    prior_views: int = 24
    eval_identities: int = 4
    eval_views: int = 8
    prior: str = ""
    guidance: float = 7.5
    t_range: tuple[int, int] | None = None
    optimizer: str = "adam"
    curve_every: int = 0


def step_range(timesteps: Tensor, low: int, high: int) -> tuple[int, int]:
    """(min_step_index, max_step_index) of the DDIM steps whose timestep lies in [low, high].

    ``timesteps`` descend (diffusers' DDIM grid), so the indices of a t range are contiguous.
    """
    inside = [i for i, t in enumerate(timesteps.tolist()) if low <= t <= high]
    if not inside:
        raise ValueError(f"no DDIM timestep of the prior lies in [{low}, {high}]; its steps are {timesteps.tolist()}")
    return inside[0], inside[-1]


def lab_config(
    style: str,
    settings: LabSettings,
    out: Path,
    variant: Variant = VARIANTS["ld"],
    profile: PriorProfile | None = None,
    steps: tuple[int, int] | None = None,
) -> StylizeConfig:
    """The lab recipe for ``style`` (LD + mirror + grid + rank re-weighting) for a prior described by ``profile``
    (the exemplar prior's when None) and DDIM step indices ``steps`` (the recipe's when None), changed by
    ``variant``; ConfigError when the result is not a valid config.

    Its cameras look at PanoHead's avg_camera_pivot (0, 0, 0.2), not at the LD scripts' (0, 0, 0): the lab's prior
    was trained on, and its truth is scored at, the lab world's renders from those cameras. The lab loads its prior
    itself (fp32 on CPU, no LPIPS weights): the config says so (model.vae_dtype, regularisers.lpips)."""
    profile = profile or PriorProfile(EXEMPLAR, settings.resolution * settings.sr_factor, *EXEMPLAR_SHAPING)
    c = StylizeConfig()
    objective = c.objective if steps is None else replace(c.objective, min_step_index=steps[0], max_step_index=steps[1])
    keep_last = settings.iterations // settings.curve_every + 1 if settings.curve_every else 1
    cfg = replace(
        c,
        model=replace(c.model, prior_image_size=profile.image_size, vae_dtype="fp32"),
        cameras=replace(c.cameras, pivot=cameras.PIVOT),
        regularisers=replace(c.regularisers, lpips=0.0),
        prompt=replace(c.prompt, prompt=style_prompt(style), source_prompt=UNSTYLED_PROMPT,
                       guidance_scale=float(settings.guidance)),
        objective=objective,
        single=replace(c.single, rank_weights=tuple(float(w) for w in profile.rank_weights)),
        shaping=replace(c.shaping, scale=float(profile.shaping_scale)),
        optim=_optimizer(settings.optimizer, replace(c.optim, lr=float(settings.lr)), settings.lr),
        run=replace(c.run, iterations=settings.iterations, checkpoint_every=settings.curve_every or settings.iterations,
                    keep_last=keep_last, sample_every=settings.iterations, turntable_identities=0, seed=settings.seed,
                    log_every=1, device="cpu", out=str(out)),
    )  # fmt: skip
    cfg = variant(cfg)
    validate(cfg)
    return cfg


def new_generator(settings: LabSettings) -> LabGenerator:
    return LabGenerator(resolution=settings.resolution, sr_factor=settings.sr_factor, seed=settings.seed)


def dead_share(zero: list[bool], nonfinite: list[int]) -> tuple[float, float]:
    """(share of iterations whose objective gradient was exactly zero or non-finite, share non-finite alone);
    ``zero`` per iteration (the trainer's objective_grad_zero), ``nonfinite`` the objective's non-finite entries
    per iteration."""
    if len(zero) != len(nonfinite) or not zero:
        raise ValueError(f"need one record per iteration, got {len(zero)} zero flags and {len(nonfinite)} counts")
    bad = [n > 0 for n in nonfinite]
    return sum(z or b for z, b in zip(zero, bad, strict=True)) / len(zero), sum(bad) / len(zero)


def _gradient_records(entries: list[dict[str, Any]]) -> tuple[list[bool], list[int]]:
    """Per iteration from the run's log.jsonl entries (one per iteration): whether the objective's gradient at the
    renders was exactly zero, and its non-finite entries summed over branches."""
    zero = [bool(e["objective_grad_zero"]) for e in entries]
    return zero, [sum(int(v) for k, v in e.items() if k.endswith("_nonfinite")) for e in entries]


@dataclass
class RunOutcome:
    """One trained variant: the generator, its wall time, run figures, (for curve variants) its checkpoints'
    iterations and paths, and the classifier margin the trainer logged at each checkpoint (label-free)."""

    G: LabGenerator
    seconds: float
    figures: dict[str, float]
    checkpoints: list[tuple[int, Path]]
    margins: dict[int, float]


def train_variant(
    style: str,
    variant: str,
    prior: ScorePrior,
    settings: LabSettings,
    out: Path,
    progress: bool = True,
    profile: PriorProfile | None = None,
    resume: bool = False,
) -> RunOutcome:
    """Stylise a fresh lab generator with one variant in ``out``; returns it, the wall time and the run figures.

    With ``resume`` a run already in ``out`` with the same config continues from its newest checkpoint (a
    finished one only reloads); otherwise, and without one, the run starts anew. A SIGINT/SIGTERM checkpoints the
    run and raises Interrupted (headstyle.training.signals), so the caller's next run never starts.
    """
    from headstyle.stylize.trainer import Stylizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(settings.seed)
    G = new_generator(settings)
    steps = None
    if settings.t_range is not None:
        steps = step_range(prior.inference_timesteps(StylizeConfig().objective.num_inference_steps), *settings.t_range)
    cfg = lab_config(style, settings, out, VARIANTS[variant], profile, steps)
    checkpoint = _resumable(cfg) if resume else None
    if checkpoint is None:
        checkpointing.clear_run(cfg.run.out)
    else:  # an earlier interruption's checkpoint is no curve point, and must not push one out of run.keep_last
        for _, path in _checkpoints(out, cfg.run.checkpoint_every, cfg.run.iterations, on_cadence=False):
            if path != checkpoint:
                shutil.rmtree(path)
    start = time.perf_counter()
    result = Stylizer(cfg, G, prior).train(resume=checkpoint, progress=progress)
    seconds = time.perf_counter() - start
    STOP.raise_if_requested()
    entries = read_log(out)
    zero, nonfinite = dead_share(*_gradient_records(entries))
    figures = {"zero_grad_share": zero, "nonfinite_grad_share": nonfinite,
               "iterations_run": float(result.iteration), "seconds": seconds}  # fmt: skip
    checkpoints = _checkpoints(out, cfg.run.checkpoint_every, result.iteration)
    margins = dict(stopping.checkpoint_signals(entries, cfg.run.checkpoint_every, result.iteration))
    return RunOutcome(G.eval(), seconds, figures, checkpoints, margins)


def _checkpoints(out: Path, every: int, last: int, on_cadence: bool = True) -> list[tuple[int, Path]]:
    """The run's checkpoints (iteration, path) on its cadence (every ``every`` iterations, and the ``last``
    iteration, where it ended), or with ``on_cadence`` False those off it (where a signal stopped the run)."""
    found = [(int(p.name.split("_")[-1]), p) for p in checkpointing.list_checkpoints(out)]
    return [(i, p) for i, p in found if checkpointing.on_cadence(i, every, last) == on_cadence]


def _resumable(cfg: StylizeConfig) -> Path | None:
    """The newest verified checkpoint of the run in cfg.run.out when it was written with this config (up to what a
    resume may change), else None: the run starts anew."""
    try:
        checkpoint = checkpointing.resolve_checkpoint(cfg.run.out)
    except (FileNotFoundError, checkpointing.ResumeError):
        return None
    saved = load_saved_config(checkpoint / "config.toml")
    return None if resume_differences(saved, cfg) else checkpoint


def _weights_at(checkpoint: Path, settings: LabSettings) -> LabGenerator:
    """A fresh lab generator with a checkpoint's trainable weights."""
    G = new_generator(settings)
    checkpointing.load_weights(G, checkpoint)
    return G.eval()


def curve(outcome: RunOutcome, settings: LabSettings, ev: EvalSet, before: dict[str, float]) -> list[dict[str, float]]:
    """The curve metrics at iteration 0 (``before``) and at every checkpoint of the run, with the trainer's classifier
    margin where it logged one (at the checkpoints, not before training)."""
    points = [{"iteration": 0.0, **{k: before[k] for k, _ in CURVE_METRICS if k in before}}]
    for iteration, path in outcome.checkpoints:
        m = evaluate(_weights_at(path, settings), ev)
        if iteration in outcome.margins:
            m[stopping.MARGIN] = outcome.margins[iteration]
        points.append({"iteration": float(iteration), **{k: m[k] for k, _ in CURVE_METRICS if k in m}})
    return points


def aggregate(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("style", "variant", "optimizer")) -> list[dict]:
    """Mean and sample std (0 for one run) of every numeric figure over the rows sharing ``keys`` (the seeds),
    in first-seen order: {**keys, "runs": n, "<metric>_mean": ..., "<metric>_std": ...}; failed runs are counted
    in "failed" and left out of the figures."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        ok = [m for m in members if "error" not in m]
        entry: dict[str, Any] = {**dict(zip(keys, key, strict=True)), "runs": len(ok), "failed": len(members) - len(ok)}
        metrics = [k for k, v in (ok[0].items() if ok else ()) if k not in (*keys, "seed") and isinstance(v, float)]
        for k in metrics:
            values = [float(m[k]) for m in ok]
            entry[f"{k}_mean"] = statistics.fmean(values)
            entry[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if not ok:
            entry["error"] = str(members[0]["error"])
        out.append(entry)
    return out


def _cell(r: dict[str, Any], key: str, fmt: str, failed_seeds: bool = False) -> str:
    """An aggregate row's metric as "mean ± std" (the mean alone for one run), optionally with its failed seeds."""
    failed = f" ({r['failed']} failed)" if failed_seeds and r["failed"] else ""
    if not r["runs"]:
        return f"failed{failed}"
    mean, std = r[f"{key}_mean"], r[f"{key}_std"]
    return format(mean, fmt) + (f" ± {std:{fmt}}" if r["runs"] > 1 else "") + failed


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# Marks a table row trained for fewer iterations than the bench's budget (a stopping rule ended it, or it was cut).
SHORT_MARK = "†"


def short_of_budget(row: dict[str, Any], budget: int) -> bool:
    """Whether a run (or an aggregate row, by its mean) trained fewer than ``budget`` iterations; the untrained row
    has no budget, and budget 0 marks nothing."""
    ran = row.get("iterations_run_mean", row.get("iterations_run"))
    return bool(budget) and row["variant"] != "untrained" and ran is not None and ran != budget


def budget_note(budget: int) -> str:
    return (f"{SHORT_MARK} trained fewer than the budget of {budget} iterations (a stopping rule ended it, or it was "
            "cut short; iters says how many): compare it with the others with care.")


@dataclass
class BenchResult:
    """Every run (one row per style, variant, optimiser and seed) and the curves of the curve variants;
    ``iterations``: the budget every run was given (rows that ran fewer are marked)."""

    prior: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    iterations: int = 0

    def summary(self) -> list[dict[str, Any]]:
        return aggregate(self.rows)

    def markdown(self) -> str:
        """The mean +- std table over seeds (std left out for a single run), then one variant x style table per
        PIVOT_METRICS entry (a cell's "(k failed)" counts its seeds whose run failed)."""
        summary = self.summary()
        short = {id(r) for r in summary if r["runs"] and short_of_budget(r, self.iterations)}
        head = "| style | variant | optimizer | runs | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
        lines = [f"prior: {self.prior}", "", head, "|" + "---|" * (len(COLUMNS) + 4)]
        for r in summary:
            mark = f" {SHORT_MARK}" if id(r) in short else ""
            name = f"| {r['style']} | {r['variant']}{mark} | {r['optimizer']} | {r['runs']} |"
            if not r["runs"]:
                lines.append(f"{name} failed: {r['error'][:100]} |")
                continue
            lines.append(f"{name} " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |")
        styles = list(dict.fromkeys(r["style"] for r in summary))
        cells = {(r["style"], r["variant"], r["optimizer"]): r for r in summary}
        for key, header, fmt in (c for c in COLUMNS if c[0] in PIVOT_METRICS):
            lines += ["", f"{header}, mean ± std over seeds:", "", "| variant | " + " | ".join(styles) + " |",
                      "|---|" + "---:|" * len(styles)]  # fmt: skip
            for variant, optimizer in dict.fromkeys((r["variant"], r["optimizer"]) for r in summary):
                name = variant if optimizer in ("adam", "-") else f"{variant} ({optimizer})"
                row = ["" if (r := cells.get((s, variant, optimizer))) is None
                       else _cell(r, key, fmt, True) + (f" {SHORT_MARK}" if id(r) in short else "")
                       for s in styles]  # fmt: skip
                lines.append(f"| {name} | " + " | ".join(row) + " |")
        if short:
            lines += ["", budget_note(self.iterations)]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        return _csv(self.summary())

    def runs_csv(self) -> str:
        return _csv(self.rows)

    def curves_csv(self) -> str:
        return _csv(self.curves)


def plot_curves(curves: list[dict[str, Any]], path: Path) -> None:
    """curves.png: per curve metric a panel, per (style, variant, optimizer) a line of the mean over seeds with a
    +- std band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for c in curves:
        series.setdefault(f"{c['style']} {c['variant']} {c['optimizer']}", {}).setdefault(c["iteration"], []).append(c)
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], CURVE_METRICS, strict=True):
        for label, by_iteration in series.items():
            # A metric a point lacks (the margin before training) is left out of its line.
            measured = {i: [p[key] for p in by_iteration[i] if key in p] for i in sorted(by_iteration)}
            kept = {i: v for i, v in measured.items() if v}
            its, values = list(kept), list(kept.values())
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            (line,) = ax.plot(its, mean, marker=".", label=label)
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(its, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def run_bench(
    styles: tuple[str, ...],
    variants: tuple[str, ...],
    settings: LabSettings,
    out: Path,
    progress: bool = True,
    seeds: tuple[int, ...] | None = None,
    optimizers: tuple[str, ...] = ("adam",),
    prior_spec: LabPriorSpec | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> BenchResult:
    """Train every (style, variant, optimizer, seed) for the same budget and score it on held-out identities.

    Writes bench.md / bench.csv (mean and std over seeds), runs.csv (every run), and with
    settings.curve_every curves.csv / curves.png for the CURVE_VARIANTS, in ``out``; each run's folder is
    out/runs/<style>-<variant>-<optimizer>-seed<seed>. The tables are rewritten after every run; with ``resume``
    the finished runs in ``out`` (same prior and settings, bench.json) are kept and only the missing or failed ones
    run. ``on_run`` sees every finished row (progress output).
    """
    from headstyle.lab.prior.learned import resolve_prior

    unknown = ([s for s in styles if s not in STYLES] + [v for v in variants if v not in VARIANTS]
               + [o for o in optimizers if o not in OPTIMIZERS])  # fmt: skip
    if unknown:
        raise ValueError(
            f"unknown styles/variants/optimizers {unknown}; styles: {', '.join(STYLES)}; variants: "
            f"{', '.join(VARIANTS)}; optimizers: {', '.join(OPTIMIZERS)}"
        )
    spec = prior_spec or resolve_prior(settings.prior)
    record = _bench_record(spec, settings)
    with folder_lock(out):  # one bench per folder: a second is refused before it reads or writes anything
        result = _resumed(out, spec.name, record) if resume else BenchResult(prior=spec.name)
        result.iterations = settings.iterations
        prior, profile = spec.load(settings.resolution, settings.sr_factor, settings.prior_identities,
                                   settings.prior_views, progress=progress)  # fmt: skip
        atomic_write_text(out / "bench.json", json.dumps(record, indent=2) + "\n")
        done = {_run_key(r) for r in result.rows}
        like = new_generator(settings)
        seed_list = seeds if seeds is not None else (settings.seed,)
        runs = [(v, o, seed) for v in variants for o in optimizers for seed in seed_list]
        for style in styles:
            ev: EvalSet = make_eval_set(style, like, settings.eval_identities, settings.eval_views)
            before = _floats(evaluate(like, ev))
            untrained = {"style": style, "variant": "untrained", "optimizer": "-", "seed": settings.seed}
            if _run_key(untrained) not in done:
                result.rows.append({**untrained, **before, **dict.fromkeys(RUN_FIGURES, 0.0)})
            for variant, optimizer, seed in runs:
                if (style, variant, optimizer, seed) in done:
                    continue
                row = _run_one(style, variant, optimizer, seed, prior, profile, settings, out, ev, before, result,
                               progress, resume)  # fmt: skip
                _write_tables(result, out)
                if on_run is not None:
                    on_run(row)
        _write_tables(result, out)
        if result.curves:
            plot_curves(result.curves, out / "curves.png")
        return result


def _write_tables(result: BenchResult, out: Path) -> None:
    atomic_write_text(out / "bench.csv", result.csv())
    atomic_write_text(out / "runs.csv", result.runs_csv())
    atomic_write_text(out / "bench.md", result.markdown())
    if result.curves:
        atomic_write_text(out / "curves.csv", result.curves_csv())


class BenchResumeError(ValueError):
    """--resume on a folder whose bench used another prior or other settings, or whose records are damaged."""


# What a resumed bench reads back: runs.csv and curves.csv are a few kilobytes per run.
MAX_TABLE_BYTES = 64 << 20
TEXT_CELLS = ("style", "variant", "optimizer", "error")
KEY_CELLS = ("style", "variant", "optimizer", "seed")
DAMAGED = "this folder's records are damaged: run the bench into a new --out"


def _run_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["style"], row["variant"], row["optimizer"], int(row["seed"])


def _bench_record(spec: LabPriorSpec, settings: LabSettings) -> dict[str, Any]:
    """What a resumed bench must share with the runs already in its folder (seeds, styles and variants may grow):
    the prior (its folder and weights) and the settings."""
    record = {k: v for k, v in settings.__dict__.items() if k != "seed"}
    record["t_range"] = list(settings.t_range) if settings.t_range is not None else None
    return {"prior": spec.name, "prior_weights_sha256": spec.weights_sha256(), "settings": record}


def row_problem(row: dict[str | None, str | None]) -> str | None:
    """What keeps a csv.DictReader row of runs.csv / curves.csv from being one _csv wrote: a cell more or fewer
    than the header, a run key missing, a seed that is not an integer in [0, 2**32), another cell not a number."""
    if None in row or None in row.values():
        return "it has another number of cells than the header"
    if missing := [k for k in KEY_CELLS if not row.get(k)]:
        return f"column {missing[0]!r} is empty or absent"
    seed = row["seed"]
    if not (seed.isascii() and seed.isdigit() and len(seed) <= 10 and int(seed) < SEED_END):
        return f"column 'seed' must be an integer in [0, 2**32), got {seed[:20]!r}"
    for key, value in row.items():
        if key in (*TEXT_CELLS, "seed") or value == "":
            continue
        try:
            float(value)
        except ValueError:
            return f"column {key!r} must be a number, got {value[:20]!r}"
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """A runs.csv / curves.csv written by _csv: names stay text, the seed an int, every other filled cell a float;
    anything else is refused (BenchResumeError) naming the row and column."""
    if not path.is_file():
        return []
    text = read_text(path, BenchResumeError, DAMAGED, max_bytes=MAX_TABLE_BYTES)
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise BenchResumeError(f"{path}: not a CSV table ({exc}); {DAMAGED}") from None
    for number, row in enumerate(rows, start=1):
        if problem := row_problem(row):
            raise BenchResumeError(f"{path}, row {number}: {problem}; {DAMAGED}")
    return [{k: (v if k in TEXT_CELLS else int(v) if k == "seed" else float(v)) for k, v in r.items() if v != ""}
            for r in rows]  # fmt: skip


def _resumed(out: Path, prior: str, want: dict[str, Any]) -> BenchResult:
    """The finished runs (and their curves) of the bench in ``out`` if its record equals ``want`` (_bench_record);
    failed runs are dropped so that they rerun."""
    record_path = out / "bench.json"
    if not record_path.is_file():
        return BenchResult(prior=prior)
    record = read_json_object(record_path, BenchResumeError, DAMAGED)
    check_fields(record, {"settings": dict}, str(record_path), BenchResumeError)
    if record != want:
        changed = sorted(k for k in {**record["settings"], **want["settings"]}
                         if record["settings"].get(k) != want["settings"].get(k))  # fmt: skip
        changed += [k for k in ("prior", "prior_weights_sha256") if record.get(k) != want[k]]
        raise BenchResumeError(f"{out} holds a bench with other settings ({', '.join(changed)}); use the same options "
                         "to resume it or another --out")  # fmt: skip
    rows = [r for r in _read_rows(out / "runs.csv") if "error" not in r]
    keys = {_run_key(r) for r in rows}
    curves = [c for c in _read_rows(out / "curves.csv") if _run_key(c) in keys]
    return BenchResult(prior=prior, rows=rows, curves=curves)


def _run_one(
    style: str, variant: str, optimizer: str, seed: int, prior: ScorePrior, profile: PriorProfile,
    settings: LabSettings, out: Path, ev: EvalSet, before: dict[str, float], result: BenchResult, progress: bool,
    resume: bool,
) -> dict[str, Any]:  # fmt: skip
    """Train (or with ``resume`` continue) and score one run, appending its row (and curve points) to ``result``."""
    follow = settings.curve_every > 0 and variant in CURVE_VARIANTS
    run_settings = LabSettings(**{**settings.__dict__, "seed": seed, "optimizer": optimizer,
                                  "curve_every": settings.curve_every if follow else 0})  # fmt: skip
    keys = {"style": style, "variant": variant, "optimizer": optimizer, "seed": seed}
    folder = out / "runs" / f"{style}-{variant}-{optimizer}-seed{seed}"
    try:
        run = train_variant(style, variant, prior, run_settings, folder, progress, profile, resume)
    except (RuntimeError, ValueError) as exc:
        # One broken run must not lose the others' figures; the table says why it is missing.
        row = {**keys, "error": f"{type(exc).__name__}: {exc}"}
        result.rows.append(row)
        return row
    row = {**keys, **_floats(evaluate(run.G, ev)), **run.figures}
    result.rows.append(row)
    if follow:
        result.curves += [{**keys, **point} for point in curve(run, run_settings, ev, before)]
    return row


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def format_row(row: dict[str, Any]) -> str:
    """One line per finished run for the console."""
    name = f"{row['style']} {row['variant']} {row['optimizer']} seed {row['seed']}"
    if "error" in row:
        return f"{name}: failed ({row['error'][:120]})"
    figures = ", ".join(f"{h} {row[k]:{f}}" for k, h, f in COLUMNS if not math.isnan(row[k]))
    return f"{name}: {figures}"
