"""The `headstyle` command line: parses arguments, builds configs, calls the library.

Every command turns a user error (bad path, bad value) into a one-line message and exit 2.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None


@app.command()
def render(
    generator: str = typer.Option(..., help="Generator: PanoHead .pkl, .pth state dict, .safetensors (+ .json) or "
                                  "a folder (params.safetensors + config.json, e.g. the parity fixture)."),
    out: str = typer.Option(..., help="Output folder (created)."),
    seeds: str | None = typer.Option(None, help="Comma-separated latent seeds, e.g. 0,1 (default 0)."),
    w_npz: str | None = typer.Option(None, help="W+ codes instead of seeds: npz with 'w' of shape (N, num_ws, 512) "
                                     "(PanoHead's projector: (1, 14, 512)); a code with another number of ws is "
                                     "refused, not cut: its ws belong to another network's layers."),
    yaws: str = typer.Option("-90,-30,0,30,90", help="View yaws in degrees (0 = front)."),
    pitch: float = typer.Option(0.0, help="View pitch in degrees (offset from pi/2, as in PanoHead's scripts)."),
    turntable: int = typer.Option(0, help="Frames of a 360-degree turntable GIF (+ MP4); 0 = none."),
    fps: float = typer.Option(24.0, help="Turntable frames per second."),
    truncation: float = typer.Option(0.7, help="Truncation psi for seeds (1 = none)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu or cuda."),
    raw_only: bool = typer.Option(False, help="Write the raw neural renders (no super-resolution): much faster."),
    depth: bool = typer.Option(False, help="Also write a grey depth map per view (near = white)."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth (default: released PanoHead)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
) -> None:
    """Render heads (PNG per seed and view, a sheet per seed, optionally a turntable GIF/MP4)."""
    import math
    from pathlib import Path

    import torch

    from headstyle.cameras import parse_angles_degrees
    from headstyle.export import export_renders, latents_from_npz, latents_from_seeds
    from headstyle.generator.checkpoint import CheckpointError, load_generator

    if seeds is not None and w_npz is not None:
        raise UserError("give either --seeds or --w-npz, not both")
    try:
        seed_list = [int(s) for s in (seeds or "0").split(",") if s.strip()]
        yaw_list = parse_angles_degrees(yaws)
    except ValueError as exc:
        raise UserError(f"{exc}; seeds are integers like 0,1 and yaws degrees like -90,0,90") from None
    if any(not 0 <= s < 2**32 for s in seed_list) or (seeds is not None and not seed_list):
        raise UserError(f"--seeds must be integers in [0, 2**32), got {seeds!r}")
    if turntable < 0 or (turntable == 0 and not yaw_list):
        raise UserError("nothing to render: give --yaws and/or --turntable N with N > 0")
    for name, value, low in (("fps", fps, 1e-3), ("neural-rendering-resolution", neural_rendering_resolution, 4),
                             ("depth-samples", depth_samples, 2)):
        if value is not None and not (math.isfinite(value) and value >= low):
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if not (math.isfinite(truncation) and math.isfinite(pitch)):
        raise UserError("--truncation and --pitch must be finite numbers")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {device!r} is not usable here ({exc}); try --device cpu") from None
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if w_npz is not None and not Path(w_npz).is_file():
        raise UserError(f"--w-npz {w_npz}: no such file")

    overrides = {"depth_resolution": depth_samples, "depth_resolution_importance": depth_samples}
    try:
        G = load_generator(generator, device=dev, config=config,
                           neural_rendering_resolution=neural_rendering_resolution,
                           rendering_overrides=overrides if depth_samples else None)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    if w_npz is not None:
        try:
            latents = latents_from_npz(w_npz, G.num_ws, G.w_dim, device=dev)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    else:
        latents = latents_from_seeds(G, seed_list, truncation, truncation_cutoff)
    paths = export_renders(G, latents, out, yaw_list, math.radians(pitch), turntable, fps,
                           render_sr=not raw_only, depth=depth)
    typer.echo(f"wrote {len(paths)} files to {out}")


@app.command()
def stylize(
    preset: str | None = typer.Option(None, help="Start from a paper style: pixar, joker, zombie, statue, werewolf, "
                                      "sketch."),
    prompt: str | None = typer.Option(None, help="Target text prompt (overrides the preset's)."),
    generator: str | None = typer.Option(None, help="Generator to stylise: PanoHead .pkl, .pth, our .safetensors "
                                         "(+ .json) or a fixture folder."),
    prior: str | None = typer.Option(None, help="SD 1.5-family diffusers folder or hub id."),
    vae: str | None = typer.Option(None, help="Separate VAE folder or hub id ('' = the model's own)."),
    canny_controlnet: str | None = typer.Option(None, help="Canny ControlNet for the single view ('' = none)."),
    depth_controlnet: str | None = typer.Option(None, help="Depth ControlNet for the 2x2 grid ('' = none)."),
    out: str | None = typer.Option(None, help="Run folder: config, logs, samples, checkpoints, final generator."),
    style_image: str | None = typer.Option(None, help="Style IMAGE as the target (Style Fusion Attention); needs "
                                           "--set objective.name=sds --set objective.weighting=sds."),
    iterations: int | None = typer.Option(None, help="Training iterations (presets: 10000)."),
    seed: int | None = typer.Option(None, help="Run seed (each process draws from its own stream)."),
    device: str | None = typer.Option(None, help="'cpu' forces CPU; default: accelerate's choice."),
    mixed_precision: str | None = typer.Option(None, help="no, fp16 or bf16 (GPU autocast; loss math stays fp32)."),
    config: str | None = typer.Option(None, help="TOML/JSON config file; its fields override the preset's."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: section.field=value (repeatable), e.g. "
                                   "--set objective.name=sds --set single.mirror=false."),
    resume: str | None = typer.Option(None, help="Continue a run exactly from its folder or one of its checkpoints."),
    print_config: bool = typer.Option(False, help="Print the resolved config as TOML and exit."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fine-tune a 3D head generator towards a text style by multi-view likelihood distillation."""
    from headstyle.stylize.config import ConfigError, dumps, resolve_config

    flags = {"prompt.prompt": prompt, "model.generator": generator, "model.prior": prior, "model.vae": vae,
             "model.canny_controlnet": canny_controlnet, "model.depth_controlnet": depth_controlnet,
             "run.out": out, "run.iterations": iterations, "run.seed": seed, "run.device": device,
             "run.mixed_precision": mixed_precision, "style.image": style_image}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_)
    try:
        cfg = resolve_config(preset, config, resume, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    if print_config:
        typer.echo(dumps(cfg), nl=False)
        return
    if not (cfg.prompt.prompt or cfg.style.image):
        raise UserError("no prompt: give --prompt TEXT, --preset NAME (pixar, joker, zombie, statue, werewolf, "
                        "sketch) or --style-image IMG")
    if not cfg.model.generator:
        raise UserError("no generator: give --generator PATH (a PanoHead .pkl/.pth or a .safetensors save)")

    from headstyle.generator.checkpoint import CheckpointError
    from headstyle.priors.diffusers_prior import PriorLoadError
    from headstyle.stylize.checkpointing import ResumeError
    from headstyle.stylize.trainer import NonFiniteError, run_stylize

    try:
        result = run_stylize(cfg, resume=resume, progress=progress)
    except (CheckpointError, PriorLoadError, ResumeError) as exc:
        raise UserError(str(exc)) from None
    except NonFiniteError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None
    if result.interrupted:
        typer.echo(f"interrupted at iteration {result.iteration}; checkpoint: {result.checkpoint}\n"
                   f"resume with: headstyle stylize --resume {cfg.run.out}")
    elif result.generator_path is not None:
        typer.echo(f"done: {result.iteration} iterations ({result.skipped_steps} skipped); stylised generator: "
                   f"{result.generator_path} (headstyle render --generator {result.generator_path})")


@app.command("style-views")
def style_views(
    generator: str = typer.Option(..., help="Generator: PanoHead .pkl, .pth, our .safetensors (+ .json) or a folder."),
    style_image: str = typer.Option(..., help="Style reference image (PNG/JPEG)."),
    out: str = typer.Option(..., help="Output folder (created)."),
    seeds: str = typer.Option("0", help="Comma-separated latent seeds, e.g. 0,1."),
    yaws: str = typer.Option("-90,-45,0,45,90,180", help="View yaws in degrees (0 = front)."),
    pitch: float = typer.Option(0.0, help="View pitch in degrees."),
    tau: float = typer.Option(1.05, help="Style key scaling: larger = stronger style, weaker identity."),
    mask: str | None = typer.Option(None, help="Style mask image (white = stylise there, black = keep content)."),
    style_image_2: str | None = typer.Option(None, help="Second style image, blended with --alpha."),
    alpha: float | None = typer.Option(None, help="Blend of the two styles: 0 = first, 1 = second (default 0.5)."),
    strength: float = typer.Option(0.6, help="img2img strength: fraction of the schedule re-noised, in (0, 1]."),
    steps: int = typer.Option(30, help="DDIM steps of the full schedule (strength * steps are run)."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance weight."),
    prompt: str = typer.Option("", help="Optional text prompt, e.g. 'a portrait'."),
    negative_prompt: str = typer.Option("", help="Negative prompt."),
    pairing: str = typer.Option("paper", help="Value pairing: paper (K_hat-V_s, tau K_s-V_c) or matched."),
    layers: str = typer.Option("all", help="Self-attention layers with style fusion: all or decoder."),
    reference: str = typer.Option("noised", help="Reference latents for the appearance pass: noised or clean."),
    model: str | None = typer.Option(None, help="SD 1.5-family diffusers folder or hub id (default Realistic "
                                     "Vision 5.1)."),
    vae: str | None = typer.Option(None, help="Separate VAE folder or hub id ('' = the model's own; default: the "
                                   "model folder's vae/ when it has one, else sd-vae-ft-mse)."),
    controlnet_depth: str | None = typer.Option(None, help="Depth ControlNet folder or hub id ('' = none)."),
    control_scale: float = typer.Option(1.0, help="Depth ControlNet conditioning scale."),
    seed: int = typer.Option(0, help="Seed of the img2img and reference noise."),
    fps: float = typer.Option(4.0, help="Turntable frames per second."),
    truncation: float = typer.Option(0.7, help="Truncation psi for seeds (1 = none)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    raw_only: bool = typer.Option(False, help="Stylise the raw neural renders (no super-resolution): faster."),
    config: str | None = typer.Option(None, help="Base config for a bare .pth (default: released PanoHead)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
) -> None:
    """Stylise rendered views of heads from a style image (Style Fusion Attention img2img): PNGs + turntable."""
    import math
    from pathlib import Path

    import torch

    from headstyle.attention.prior import StyleFusionConfig, load_image
    from headstyle.attention.views import StyleViewsConfig, stylize_views
    from headstyle.cameras import parse_angles_degrees
    from headstyle.export import latents_from_seeds
    from headstyle.generator.checkpoint import CheckpointError, load_generator
    from headstyle.priors.diffusers_prior import (
        DEFAULT_CONTROLNETS,
        DEFAULT_MODEL,
        DEFAULT_VAE,
        DiffusersPrior,
        PriorLoadError,
    )

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        yaw_list = parse_angles_degrees(yaws)
    except ValueError as exc:
        raise UserError(f"{exc}; seeds are integers like 0,1 and yaws degrees like -90,0,90") from None
    if not seed_list or any(not 0 <= s < 2**32 for s in seed_list) or not yaw_list:
        raise UserError("give at least one seed in [0, 2**32) (--seeds 0,1) and one yaw (--yaws -45,0,45)")
    if alpha is not None and style_image_2 is None:
        raise UserError("--alpha blends two styles: give --style-image-2 as well")
    if not all(math.isfinite(v) for v in (tau, strength, guidance, pitch, truncation, control_scale, fps)):
        raise UserError("numeric options must be finite numbers")
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    for option, path in (("--style-image", style_image), ("--style-image-2", style_image_2), ("--mask", mask)):
        if path is not None and not Path(path).is_file():
            raise UserError(f"{option} {path}: no such file")
    try:
        fusion = StyleFusionConfig(tau=tau, alpha=0.5 if alpha is None else alpha, pairing=pairing, layers=layers,
                                   reference=reference)
        views = StyleViewsConfig(fusion=fusion, strength=strength, steps=steps, guidance_scale=guidance,
                                 prompt=prompt, negative_prompt=negative_prompt, control_scale=control_scale,
                                 seed=seed, pitch=math.radians(pitch), fps=fps, render_sr=not raw_only)
    except ValueError as exc:
        raise UserError(f"{exc} (see headstyle style-views --help)") from None
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise UserError(f"--device {device!r} is not usable here ({exc}); try --device cpu") from None

    model = model or DEFAULT_MODEL
    if vae is None:
        vae = "" if (Path(model) / "vae").is_dir() else DEFAULT_VAE
    depth_net = DEFAULT_CONTROLNETS["depth"] if controlnet_depth is None else controlnet_depth
    overrides = {"depth_resolution": depth_samples, "depth_resolution_importance": depth_samples}
    try:
        G = load_generator(generator, device=dev, config=config,
                           neural_rendering_resolution=neural_rendering_resolution,
                           rendering_overrides=overrides if depth_samples else None)
        # latent_sample="mean": the VAE posterior mean, so a run is a function of its seeds
        prior = DiffusersPrior.from_pretrained(model, vae=vae or None, controlnets={"depth": depth_net} if depth_net
                                               else {}, device=dev, latent_sample="mean")
    except (CheckpointError, PriorLoadError) as exc:
        raise UserError(str(exc)) from None
    try:
        size = prior.image_size
        style = load_image(style_image, size)
        style_2 = load_image(style_image_2, size) if style_image_2 else None
        style_mask = load_image(mask, size, mode="L")[0, 0] if mask else None
    except ValueError as exc:
        raise UserError(f"{exc}; give a PNG or JPEG file") from None
    latents = latents_from_seeds(G, seed_list, truncation, truncation_cutoff)
    paths = stylize_views(G, prior, latents, yaw_list, style, out, views, style_2, style_mask)
    typer.echo(f"wrote {len(paths)} files to {out}")


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
