"""`headstyle style-views`: Style Fusion Attention img2img of rendered views from a style image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from headstyle.cli.common import UserError, app

if TYPE_CHECKING:
    from headstyle.attention.config import StyleViewsConfig


def _list(text: str | None) -> str | None:
    """'0,1' -> '[0,1]' (a TOML list for the typed config); None stays None."""
    return None if text is None else f"[{text}]"


@app.command("style-views")
def style_views(
    generator: str | None = typer.Option(None, help="Generator: PanoHead .pkl, .pth, our .safetensors (+ .json) or a "
                                         "folder."),
    style_image: str | None = typer.Option(None, help="Style reference image (PNG/JPEG)."),
    style_image_back: str | None = typer.Option(None, help="The style's back view (optional): the style bank then "
                                                "holds front and back, as a trained Style Appearance Module saw."),
    content: str | None = typer.Option(None, help="Content reference of every view: front_back (the head's front "
                                       "and back renders, DiffStyle360's pairing) or view (the view itself)."),
    out: str | None = typer.Option(None, help="Output folder (created)."),
    seeds: str | None = typer.Option(None, help="Comma-separated latent seeds, e.g. 0,1 (default 0)."),
    yaws: str | None = typer.Option(None, help="View yaws in degrees (0 = front; default -90,-45,0,45,90,180)."),
    pitch: float | None = typer.Option(None, help="View pitch in degrees."),
    tau: float | None = typer.Option(None, help="Style key scaling: larger = stronger style, weaker identity (1.05)."),
    mask: str | None = typer.Option(None, help="Style mask image (white = stylise there, black = keep content)."),
    mask_parser: str | None = typer.Option(None, help="Face parser checkpoint (face-parsing.PyTorch's 79999_iter.pth): "
                                           "masks each view and the style image by --mask-regions."),
    mask_regions: str | None = typer.Option(None, help="Regions the parser's mask keeps, e.g. hair or skin,lips "
                                            "(skin, face, hair, eyes, brows, lips, mouth, nose, ears, neck, ...)."),
    style_image_2: str | None = typer.Option(None, help="Second style image, blended with --alpha."),
    alpha: float | None = typer.Option(None, help="Blend of the two styles: 0 = first, 1 = second (default 0.5)."),
    strength: float | None = typer.Option(None, help="img2img strength: fraction of the schedule re-noised (0.6)."),
    steps: int | None = typer.Option(None, help="DDIM steps of the full schedule (strength * steps are run; 30)."),
    guidance: float | None = typer.Option(None, help="Classifier-free guidance weight (3.0)."),
    prompt: str | None = typer.Option(None, help="Optional text prompt, e.g. 'a portrait'."),
    negative_prompt: str | None = typer.Option(None, help="Negative prompt."),
    pairing: str | None = typer.Option(None, help="Value pairing: paper (K_hat-V_s, tau K_s-V_c) or matched."),
    layers: str | None = typer.Option(None, help="Self-attention layers with style fusion: all or decoder."),
    reference: str | None = typer.Option(None, help="Reference latents for the appearance pass: noised or clean."),
    prior: str | None = typer.Option(None, help="SD 1.5-family diffusers folder or hub id (default Realistic "
                                     "Vision 5.1)."),
    vae: str | None = typer.Option(None, help="VAE: '' (the model's own, the default), 'auto' (the model "
                                   "folder's vae/ when it has one, else sd-vae-ft-mse) or a folder / hub id."),
    controlnet_depth: str | None = typer.Option(None, help="Depth ControlNet folder or hub id ('' = none)."),
    control_scale: float | None = typer.Option(None, help="Depth ControlNet conditioning scale."),
    seed: int | None = typer.Option(None, help="Seed of the img2img and reference noise."),
    fps: float | None = typer.Option(None, help="Turntable frames per second."),
    truncation: float | None = typer.Option(None, help="Truncation psi for seeds (1 = none; 0.7)."),
    truncation_cutoff: int | None = typer.Option(None, help="Number of ws truncated."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    raw_only: bool = typer.Option(False, help="Stylise the raw neural renders (no super-resolution): faster."),
    config: str | None = typer.Option(None, help="TOML/JSON run config; flags and --set override its fields."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: section.field=value, e.g. "
                                   "--set fusion.tau=1.1 --set sampling.steps=50 (see --print-config)."),
    print_config: bool = typer.Option(False, help="Print the resolved config as TOML and exit."),
    generator_config: str | None = typer.Option(None, "--generator-config", help="Base config for a bare .pth "
                                                "(default: released PanoHead)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
    style_module: str | None = typer.Option(None, help="A trained Style Appearance Module (`headstyle sfa train`'s "
                                            "module/ folder) writes the style bank."),
) -> None:
    """Stylise rendered views of heads from a style image (Style Fusion Attention img2img): PNGs + turntable."""
    from headstyle import settings
    from headstyle.attention.config import StyleViewsConfig

    flags = {
        "model.generator": generator, "model.generator_config": generator_config, "model.prior": prior,
        "model.vae": vae, "model.controlnet_depth": controlnet_depth, "model.device": device,
        "model.neural_rendering_resolution": neural_rendering_resolution, "model.depth_samples": depth_samples,
        "model.style_module": style_module,
        "style.image": style_image, "style.image_back": style_image_back, "style.image_2": style_image_2,
        "style.mask": mask, "views.content": content,
        "style.parser": mask_parser, "style.regions": _list(mask_regions and ",".join(
            f'"{r.strip()}"' for r in mask_regions.split(",") if r.strip())),
        "views.seeds": _list(seeds), "views.yaws": _list(yaws), "views.pitch": pitch, "views.out": out,
        "views.truncation_psi": truncation, "views.truncation_cutoff": truncation_cutoff, "views.fps": fps,
        "views.render_sr": "false" if raw_only else None,
        "fusion.tau": tau, "fusion.alpha": alpha, "fusion.pairing": pairing, "fusion.layers": layers,
        "fusion.reference": reference,
        "sampling.strength": strength, "sampling.steps": steps, "sampling.guidance_scale": guidance,
        "sampling.prompt": prompt, "sampling.negative_prompt": negative_prompt,
        "sampling.control_scale": control_scale, "sampling.seed": seed,
    }  # fmt: skip
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_)
    try:
        cfg = StyleViewsConfig()
        if config is not None:
            cfg = settings.from_dict(cfg, settings.read_file(config))
        cfg = settings.from_dict(cfg, settings.overrides_dict(cfg, overrides))
    except settings.ConfigError as exc:
        raise UserError(f"{exc} (see headstyle style-views --help)") from None
    if print_config:
        typer.echo(settings.dumps({k: settings.plain(v) for k, v in vars(cfg).items()}), nl=False)
        return
    run_style_views(cfg, alpha_given=alpha is not None)


def run_style_views(cfg: StyleViewsConfig, alpha_given: bool = False) -> None:
    """Check the inputs (before any model loads), load generator and prior, stylise and write the views."""
    import torch

    from headstyle.attention.prior import load_image
    from headstyle.attention.views import stylize_views
    from headstyle.cli.common import check_image, check_out_dir, load_diffusers_prior, load_generator, pick_device
    from headstyle.generator.latents import latents_from_seeds
    from headstyle.priors.loading import PriorSpec

    m, s = cfg.model, cfg.style
    if not (m.generator and s.image and cfg.views.out):
        raise UserError("give --generator, --style-image and --out (or model.generator, style.image, views.out)")
    if alpha_given and not s.image_2:
        raise UserError("--alpha blends two styles: give --style-image-2 as well")
    if s.image_back and cfg.views.content == "view":
        raise UserError("--style-image-back goes with --content front_back: a view alone is one content image")
    for option, path in (("--style-image", s.image), ("--style-image-back", s.image_back),
                         ("--style-image-2", s.image_2), ("--mask", s.mask)):  # fmt: skip
        if path:
            check_image(path, option)
    if s.parser:
        from headstyle.faces import parser as face_parser
        from headstyle.faces.perceptual import WeightsError

        try:
            face_parser.check_regions(s.regions)
            net = face_parser.BiSeNet.from_file(s.parser)
        except (ValueError, WeightsError) as exc:
            raise UserError(f"--mask-parser / --mask-regions: {exc}") from None
    if m.style_module:
        from headstyle.sfa.module import ModuleLoadError, read_manifest

        try:
            read_manifest(m.style_module)
        except ModuleLoadError as exc:
            raise UserError(f"--style-module: {exc}") from None
    check_out_dir(cfg.views.out)
    dev = pick_device(m.device)
    G = load_generator(m.generator, dev, m.generator_config or None, m.neural_rendering_resolution or None,
                       m.depth_samples or None)  # fmt: skip
    # latent_sample="mean": the VAE posterior mean, so a run is a function of its seeds
    nets = {"depth": m.controlnet_depth} if m.controlnet_depth else {}
    prior = load_diffusers_prior(PriorSpec(m.prior, m.vae, nets, latent_sample="mean"), dev)
    content_unet = style_unet = None
    if m.style_module:
        prior, content_unet, style_unet = load_style_module(m.style_module, prior)
    try:
        size = prior.image_size
        style = torch.cat([load_image(path, size) for path in (s.image, s.image_back) if path])
        style_2 = load_image(s.image_2, size) if s.image_2 else None
        style_mask = load_image(s.mask, size, mode="L")[0, 0] if s.mask else None
    except ValueError as exc:
        raise UserError(f"{exc}; give a PNG or JPEG file") from None
    content_masks = None
    if s.parser:
        net = net.to(prior.device)

        def content_masks(image):
            return face_parser.region_masks(face_parser.parse(net, image), s.regions)[0]

        # the first style's regions (front and back); a second style is blended through the same tokens
        style_mask = torch.stack([content_masks(view[None].to(prior.device)) for view in style])
    v = cfg.views
    latents = latents_from_seeds(G, list(v.seeds), v.truncation_psi, v.truncation_cutoff)
    paths = stylize_views(G, prior, latents, style, cfg, style_2, style_mask, content_unet=content_unet,
                          style_unet=style_unet, content_masks=content_masks)  # fmt: skip
    typer.echo(f"wrote {len(paths)} files to {v.out}")


def load_style_module(folder: str, prior) -> tuple:
    """(prior, content UNet, style UNet) of a trained module for ``prior`` (StyleAppearanceModule.fusion),
    checked against the prior's UNet."""
    from headstyle.sfa.module import ModuleLoadError, StyleAppearanceModule

    try:
        return StyleAppearanceModule.load(folder, prior.unet).fusion(prior)
    except ModuleLoadError as exc:
        raise UserError(f"--style-module: {exc}") from None
