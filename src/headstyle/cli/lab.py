"""`headstyle demo` and `headstyle lab ...`: the synthetic head lab."""

from __future__ import annotations

import typer

from headstyle.cli.common import UserError, app


@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Output folder: turntables/, views.png, metrics.json, summary.html/png."),
    style: str = typer.Option("statue", help="Lab style: statue, zombie, toon or gold."),
    iterations: int = typer.Option(100, help="Training iterations for LD and (the same budget) for SDS."),
    seed: int = typer.Option(0, help="Seed of both runs."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default; 1 is fastest for the lab)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Stylise the synthetic head lab with the paper's recipe and with SDS on a CPU, scored against ground truth."""
    from pathlib import Path

    import torch

    from headstyle.lab.bench import LabSettings
    from headstyle.lab.demo import run_demo
    from headstyle.lab.world import STYLES

    if style not in STYLES:
        raise UserError(f"--style {style!r} is not a lab style; choose one of {', '.join(STYLES)}")
    if iterations < 1 or threads < 0:
        raise UserError("--iterations must be >= 1 and --threads >= 0")
    if threads:
        # The lab's tensors are small: one thread is as fast, and OpenMP threads spin when cores are shared.
        torch.set_num_threads(threads)
    metrics = run_demo(Path(out), style, LabSettings(iterations=iterations, seed=seed), progress=progress)
    r = metrics["results"]
    typer.echo(f"{'':<10}{'rgb err':>10}{'depth err':>11}{'stylisation':>13}{'diversity':>11}")
    for name in ("untrained", "ld", "sds"):
        m = r[name]
        typer.echo(f"{name:<10}{m['rgb_error']:>10.4f}{m['depth_error']:>11.4f}{m['stylisation']:>13.3f}"
                   f"{m['diversity_rgb']:>11.3f}")
    typer.echo(f"wrote {out}/summary.html ({metrics['wall_seconds']:.0f} s)")


lab_app = typer.Typer(no_args_is_help=True, help="The synthetic head lab: benchmarks against ground truth.")
app.add_typer(lab_app, name="lab")


@lab_app.command("bench")
def lab_bench(
    out: str = typer.Option("runs/lab-bench", help="Output folder: bench.csv, bench.md and the runs."),
    styles: str = typer.Option("statue", help="Comma-separated lab styles (statue, zombie, toon, gold)."),
    objectives: str = typer.Option("ld,sds", help="Comma-separated objectives/ablations: ld, sds, ids, ld-no-mirror, "
                                   "ld-no-grid, ld-no-rank, ld-no-reg, ld-mvnrs, or 'all'."),
    iterations: int = typer.Option(100, help="Training iterations of every variant (same budget and seed)."),
    lr: float = typer.Option(0.002, help="Adam learning rate of every variant."),
    seed: int = typer.Option(0, help="Seed of every run."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default; 1 is fastest for the lab)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train every objective/ablation for the same budget and seed; print and save the metrics table."""
    from pathlib import Path

    import torch

    from headstyle.lab.bench import VARIANTS, LabSettings, run_bench
    from headstyle.lab.world import STYLES

    style_list = tuple(s.strip() for s in styles.split(",") if s.strip())
    variant_list = tuple(VARIANTS) if objectives == "all" else tuple(v.strip() for v in objectives.split(",") if v)
    bad = [s for s in style_list if s not in STYLES] + [v for v in variant_list if v not in VARIANTS]
    if bad or not style_list or not variant_list:
        raise UserError(f"unknown or missing styles/objectives {bad}; styles: {', '.join(STYLES)}; "
                        f"objectives: {', '.join(VARIANTS)} or all")
    if iterations < 1 or threads < 0 or lr <= 0:
        raise UserError("--iterations must be >= 1, --threads >= 0 and --lr > 0")
    if threads:
        torch.set_num_threads(threads)
    result = run_bench(style_list, variant_list, LabSettings(iterations=iterations, lr=lr, seed=seed), Path(out),
                       progress=progress)
    typer.echo(result.markdown(), nl=False)
    typer.echo(f"wrote {out}/bench.csv and {out}/bench.md")


@lab_app.command("train-prior")
def lab_train_prior(
    out: str = typer.Option(..., help="Run folder: data/, checkpoints/, model/ (the SD-layout prior), logs."),
    resume: bool = typer.Option(False, help="Continue a run in --out from its checkpoints."),
    stage: str = typer.Option("all", help="Stage: data, vae, decoder, unet, controlnet or all (every unfinished one)."),
    config: str = typer.Option("full", help="Sizes and steps: full, full-text (text encoder trained) or tiny (tests)."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train the lab's learned prior, a tiny Stable-Diffusion-shaped latent diffusion model of the head world."""
    from pathlib import Path

    import torch

    from headstyle.lab.train_prior import CONFIGS, STAGES, train_prior

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

    from headstyle.lab.prior_card import write_card
    from headstyle.lab.train_prior import CONFIGS, STAGES, TrainPriorConfig, copy_model, stage_done

    folder = Path(run)
    if not all(stage_done(folder, s) for s in STAGES):
        raise UserError(f"--run {run} is not a finished `headstyle lab train-prior` run; finish it with --resume")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainPriorConfig.from_json(json.loads((folder / "config.json").read_text()))
    model = copy_model(folder, Path(out)) if out else folder / "model"
    name = next(n for n, c in CONFIGS.items() if c == cfg)
    command = f"headstyle lab train-prior --out {shlex.quote(run)} --config {name} --threads {threads or 1}"
    figures = write_card(model, folder, cfg, command)
    typer.echo(json.dumps(figures, indent=2))
    typer.echo(f"wrote {model}/README.md")
