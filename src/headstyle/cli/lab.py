"""`headstyle demo` and `headstyle lab ...`: the synthetic head lab."""

from __future__ import annotations

import typer

from headstyle.cli.common import (
    UserError,
    app,
    check_count,
    check_out_dir,
    check_seed,
    parse_numbers,
    parse_seeds,
    rerun_hint,
)
from headstyle.settings import MAX_ITERATIONS
from headstyle.training.signals import resume_hint

PRIOR_HELP = ("The prior: '' = the shipped learned lab prior (an SD folder, through DiffusersPrior), 'exemplar' = "
              "the analytic exemplar prior, or PATH = any SD folder from `headstyle lab train-prior` (its model/).")


def _lab_prior(prior: str):
    """The resolved --prior (folders checked, nothing loaded yet)."""
    from headstyle.lab.prior.learned import LabPriorError, resolve_prior

    try:
        return resolve_prior(prior)
    except LabPriorError as err:
        raise UserError(str(err)) from None


# Bounds of the evaluation's size options: each identity and camera is rendered for every model compared.
EVAL_IDENTITIES = (2, 32)
EVAL_VIEWS = (2, 64)
TURNTABLE_FRAMES = (2, 240)
EVAL_IDENTITIES_HELP = (f"Held-out identities scored (and shown), {EVAL_IDENTITIES[0]}-{EVAL_IDENTITIES[1]}; identity "
                        "retrieval needs at least 2.")
EVAL_VIEWS_HELP = f"Evaluation cameras over 360 degrees per identity, {EVAL_VIEWS[0]}-{EVAL_VIEWS[1]}."


def _check_range(option: str, value: int, bounds: tuple[int, int]) -> None:
    if not bounds[0] <= value <= bounds[1]:
        raise UserError(f"{option} {value}: give {bounds[0]}-{bounds[1]} (each one is rendered for every model "
                        "compared)")  # fmt: skip


def _threads(threads: int) -> None:
    import torch

    if threads:
        # The lab's tensors are small: one thread is as fast, and OpenMP threads spin when cores are shared.
        torch.set_num_threads(threads)


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Output folder: turntables/, views.png, metrics.json, summary.html/png."),
    style: str = typer.Option("statue", help="Lab style: statue, zombie, toon or gold."),
    iterations: int = typer.Option(100, help="Training iterations for LD and (the same budget) for SDS."),
    seed: int = typer.Option(0, help="Seed of both runs."),
    prior: str = typer.Option("", help=PRIOR_HELP),
    eval_identities: int = typer.Option(4, help=EVAL_IDENTITIES_HELP),
    eval_views: int = typer.Option(8, help=EVAL_VIEWS_HELP),
    turntable_frames: int = typer.Option(16, help=f"Frames of each turntable GIF, {TURNTABLE_FRAMES[0]}-"
                                         f"{TURNTABLE_FRAMES[1]}."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default; 1 is fastest for the lab)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    resume: bool = typer.Option(False, help="Continue the demo in --out: each run from its newest checkpoint (a "
                                "finished run is reused), then the comparison."),
) -> None:
    """Stylise the synthetic head lab with the paper's recipe and with SDS on a CPU, scored against ground truth."""
    from pathlib import Path

    from headstyle.lab.experiments.bench import LabSettings
    from headstyle.lab.experiments.demo import run_demo
    from headstyle.lab.prior.learned import LabPriorError
    from headstyle.lab.world.heads import STYLES

    if style not in STYLES:
        raise UserError(f"--style {style!r} is not a lab style; choose one of {', '.join(STYLES)}")
    check_count("--iterations", iterations, 1, MAX_ITERATIONS)
    if threads < 0:
        raise UserError("--threads must be >= 0")
    _check_range("--eval-identities", eval_identities, EVAL_IDENTITIES)
    _check_range("--eval-views", eval_views, EVAL_VIEWS)
    _check_range("--turntable-frames", turntable_frames, TURNTABLE_FRAMES)
    check_seed(seed)
    check_out_dir(out)
    spec = _lab_prior(prior)
    _threads(threads)
    settings = LabSettings(iterations=iterations, seed=seed, eval_identities=eval_identities, eval_views=eval_views)
    try:
        with resume_hint(rerun_hint("--resume")):
            metrics = run_demo(Path(out), style, settings, turntable_frames, progress, spec, resume)
    except LabPriorError as err:
        raise UserError(str(err)) from None
    r = metrics["results"]
    typer.echo(f"prior: {metrics['prior']}")
    typer.echo(f"{'':<10}{'rgb err':>10}{'depth err':>11}{'stylisation':>13}{'id acc':>8}{'diversity':>11}"
               f"{'zero grad':>11}")
    for name in ("untrained", "ld", "sds"):
        m = r[name]
        typer.echo(f"{name:<10}{m['rgb_error']:>10.4f}{m['depth_error']:>11.4f}{m['stylisation']:>13.3f}"
                   f"{m['id_accuracy_appearance']:>8.2f}{m['diversity_rgb']:>11.3f}{m['zero_grad_share']:>11.2f}")
    typer.echo(f"wrote {out}/summary.html ({metrics['wall_seconds']:.0f} s)")


lab_app = typer.Typer(no_args_is_help=True, help="The synthetic head lab: benchmarks against ground truth.")
app.add_typer(lab_app, name="lab")


def _names(text: str, known: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(known) if text == "all" else tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(f"{option}: unknown or missing {bad or text!r}; choose from {', '.join(known)} or all")
    return names


@lab_app.command("bench")
def lab_bench(
    out: str = typer.Option("runs/lab-bench", help="Output folder: bench.md/.csv (mean +- std over seeds), runs.csv, "
                            "curves.csv/.png and the runs."),
    styles: str = typer.Option("statue", help="Comma-separated lab styles (statue, zombie, toon, gold) or all."),
    objectives: str = typer.Option("ld,sds", help="Comma-separated objectives/ablations: ld, sds, ids, dds, nfsd, "
                                   "ld-no-mirror, ld-no-grid, ld-no-rank, ld-no-reg, ld-mvnrs, or 'all'."),
    optimizer: str = typer.Option("adam", help="Comma-separated optimisers: adam (the paper's, to the budget), sgd "
                                  "(momentum 0.9, step proportional to the gradient, steady step as long as Adam's), "
                                  "adam-stop, sgd-stop (ended by the diffusion-classifier stopping rule, the product's "
                                  "default), adam-decay (lr / 10 there), or 'all'."),
    prior: str = typer.Option("", help=PRIOR_HELP),
    iterations: int = typer.Option(100, help="Training iterations of every run (same budget)."),
    lr: float = typer.Option(0.002, help="Learning rate (Adam's; SGD's first step moves the weights as far)."),
    t_range: str = typer.Option("", help="The objective's timesteps LOW,HIGH (inclusive, e.g. 1,281); '' = the "
                                "recipe's DDIM steps 35-49 of 50."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance weight omega."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; figures are mean +- std over them."),
    eval_identities: int = typer.Option(4, help=EVAL_IDENTITIES_HELP),
    eval_views: int = typer.Option(8, help=EVAL_VIEWS_HELP),
    curve_every: int = typer.Option(10, help="Evaluate LD and SDS runs every so many iterations for curves.png "
                                    "(0 = off)."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default; 1 is fastest for the lab)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    resume: bool = typer.Option(False, help="Keep the finished runs in --out (same prior and options) and run only "
                                "the missing ones."),
) -> None:
    """Train every objective/ablation and optimiser for the same budget and seeds; print and save the tables."""
    import math
    from pathlib import Path

    from headstyle.lab.experiments.bench import (
        OPTIMIZERS,
        VARIANTS,
        BenchResumeError,
        LabSettings,
        format_row,
        run_bench,
    )
    from headstyle.lab.prior.learned import LabPriorError
    from headstyle.lab.world.heads import STYLES

    style_list = _names(styles, tuple(STYLES), "--styles")
    variant_list = _names(objectives, tuple(VARIANTS), "--objectives")
    optimizer_list = _names(optimizer, OPTIMIZERS, "--optimizer")
    seed_list = tuple(parse_seeds(seeds))
    window = None
    if t_range:
        window = parse_numbers(t_range, int, "--t-range")
        if len(window) != 2 or not 0 <= window[0] <= window[1] <= 999:
            raise UserError(f"--t-range {t_range!r}: give LOW,HIGH with 0 <= LOW <= HIGH <= 999, e.g. 1,281")
    check_count("--iterations", iterations, 1, MAX_ITERATIONS)
    if threads < 0 or curve_every < 0 or not (math.isfinite(lr) and lr > 0):
        raise UserError("--threads must be >= 0, --curve-every >= 0 and --lr > 0")
    if not (math.isfinite(guidance) and 0 <= guidance <= 100):
        raise UserError(f"--guidance {guidance}: give a weight within [0, 100] (7.5 is SD's)")
    _check_range("--eval-identities", eval_identities, EVAL_IDENTITIES)
    _check_range("--eval-views", eval_views, EVAL_VIEWS)
    check_out_dir(out)
    spec = _lab_prior(prior)
    _threads(threads)
    settings = LabSettings(iterations=iterations, lr=lr, seed=seed_list[0], guidance=guidance, t_range=window,
                           curve_every=curve_every, eval_identities=eval_identities,
                           eval_views=eval_views)  # fmt: skip
    try:
        with resume_hint(rerun_hint("--resume")):
            result = run_bench(style_list, variant_list, settings, Path(out), progress=progress, seeds=seed_list,
                               optimizers=optimizer_list, prior_spec=spec,
                               on_run=lambda row: typer.echo(format_row(row)), resume=resume)  # fmt: skip
    except (LabPriorError, BenchResumeError) as err:
        raise UserError(str(err)) from None
    typer.echo(result.markdown(), nl=False)
    written = "bench.md, bench.csv, runs.csv" + (", curves.csv, curves.png" if result.curves else "")
    typer.echo(f"wrote {written} in {out}")


@lab_app.command("train-prior")
def lab_train_prior(
    out: str = typer.Option(..., help="Run folder: data/, checkpoints/, model/ (the SD-layout prior), logs."),
    resume: bool = typer.Option(False, help="Continue a run in --out from its checkpoints."),
    stage: str = typer.Option("all", help="Stage: data, vae, decoder, unet, controlnet or all (every unfinished one)."),
    config: str = typer.Option(
        "full-long",
        help="Sizes and steps: full-long (the shipped prior: text encoder trained, a long UNet schedule), full "
        "(frozen text encoder), full-text (full-long's UNet schedule cut to 2400 steps), full-pooled (full-text + "
        "the pooled prompt in the timestep embedding) or tiny (tests).",
    ),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train the lab's learned prior, a tiny Stable-Diffusion-shaped latent diffusion model of the head world."""
    from pathlib import Path

    import torch

    from headstyle.lab.prior.recipe import CONFIGS
    from headstyle.lab.prior.train import STAGES, train_prior

    if stage not in (*STAGES, "all"):
        raise UserError(f"--stage {stage!r} is unknown; choose one of {', '.join(STAGES)} or all")
    if config not in CONFIGS:
        raise UserError(f"--config {config!r} is unknown; choose one of {', '.join(CONFIGS)}")
    if threads < 0:
        raise UserError("--threads must be >= 0")
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()) and not resume:
        raise UserError(f"--out {out} is not empty; pass --resume to continue that run or choose a new folder")
    if threads:
        torch.set_num_threads(threads)
    try:
        model = train_prior(folder, CONFIGS[config], stage, progress=progress)
    except ValueError as err:
        raise UserError(str(err)) from err
    typer.echo(f"wrote {model}")


@lab_app.command("prior-card")
def lab_prior_card(
    run: str = typer.Option(..., help="A finished `lab train-prior` run folder (its model/ is measured)."),
    out: str = typer.Option("", help="Copy run/model here first and write the card there (e.g. the package's "
                            "src/headstyle/lab/learned_prior); empty = write the card into run/model."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default)."),
) -> None:
    """Measure the learned lab prior (diffusion classifier, memorisation, samples, img2img) and write its model card."""
    import json
    import shlex
    from pathlib import Path

    import torch

    from headstyle.lab.prior.card import write_card
    from headstyle.lab.prior.recipe import CONFIGS, TrainPriorConfig
    from headstyle.lab.prior.train import STAGES, copy_model, stage_done

    folder = Path(run)
    try:
        if not all(stage_done(folder, s) for s in STAGES):
            raise UserError(f"--run {run} is not a finished `headstyle lab train-prior` run; finish it with --resume")
        cfg = TrainPriorConfig.read(folder)
    except ValueError as err:
        raise UserError(f"--run {run}: {err}") from None
    if threads:
        torch.set_num_threads(threads)
    model = copy_model(folder, Path(out)) if out else folder / "model"
    name = next(n for n, c in CONFIGS.items() if c == cfg)
    command = f"headstyle lab train-prior --out {shlex.quote(run)} --config {name} --threads {threads or 1}"
    figures = write_card(model, folder, cfg, command)
    typer.echo(json.dumps(figures, indent=2))
    typer.echo(f"wrote {model}/README.md")
