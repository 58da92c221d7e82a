"""`headstyle style-views`: Style Fusion Attention img2img of rendered views from a style image."""

from __future__ import annotations

import typer

from headstyle.cli.common import UserError, app


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

    from headstyle.attention.config import StyleFusionConfig, StyleViewsConfig
    from headstyle.attention.prior import load_image
    from headstyle.attention.views import stylize_views
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

