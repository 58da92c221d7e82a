"""`headstyle stylize`: fine-tune a generator towards a style (the trainer behind a command)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from headstyle.cli.common import UserError, app
from headstyle.training.lock import folder_lock, launched_main


@app.command()
def stylize(
    preset: str | None = typer.Option(None, help="Start from a paper style: pixar, joker, zombie, statue, werewolf, "
                                      "sketch."),
    prompt: str | None = typer.Option(None, help="Target text prompt (overrides the preset's)."),
    generator: str | None = typer.Option(None, help="Generator to stylise: PanoHead .pkl, .pth, our .safetensors "
                                         "(+ .json) or a fixture folder."),
    prior: str | None = typer.Option(None, help="SD 1.5-family diffusers folder or hub id."),
    vae: str | None = typer.Option(None, help="VAE folder or hub id; '' (the default) = the model's own vae/, as the "
                                   "LD script."),
    canny_controlnet: str | None = typer.Option(None, help="Canny ControlNet for the single view ('' = none)."),
    depth_controlnet: str | None = typer.Option(None, help="Depth ControlNet for the 2x2 grid ('' = none)."),
    depth_estimator: str | None = typer.Option(None, help="Local Depth Anything folder (transformers, e.g. "
                                               "Depth-Anything-V2-Base-hf) for the grid's depth control, as the LD "
                                               "script; default: the generator's rendered depth."),
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
    resume: str | None = typer.Option(None, help="Continue a run exactly from its folder (its newest checkpoint that "
                                      "verifies) or one of its checkpoints."),
    overwrite: bool = typer.Option(False, help="Clear what an earlier run wrote into --out, then start a new run."),
    print_config: bool = typer.Option(False, help="Print the resolved config as TOML and exit."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fine-tune a 3D head generator towards a text style by multi-view likelihood distillation."""
    from headstyle.training.checkpointing import run_folder

    if resume is not None and overwrite:
        raise UserError("--resume continues a run and --overwrite clears one: give one of them")
    flags = {"prompt.prompt": prompt, "model.generator": generator, "model.prior": prior, "model.vae": vae,
             "model.canny_controlnet": canny_controlnet, "model.depth_controlnet": depth_controlnet,
             "model.depth_estimator": depth_estimator,
             "run.out": out, "run.iterations": iterations, "run.seed": seed, "run.device": device,
             "run.mixed_precision": mixed_precision, "style.image": style_image}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_)
    with contextlib.ExitStack() as held:
        if resume is not None and not print_config and Path(resume).is_dir() and launched_main():
            # A live run in the folder --resume names is refused before its checkpoints are read.
            held.enter_context(folder_lock(run_folder(resume)))
        _stylize(resume, overwrite, preset, config, overrides, print_config, progress)


def _stylize(resume: str | None, overwrite: bool, preset: str | None, config: str | None, overrides: list[str],
             print_config: bool, progress: bool) -> None:
    from headstyle.cli.common import check_image, check_out_dir, pick_device
    from headstyle.stylize import stopping
    from headstyle.stylize.config import ConfigError, dumps
    from headstyle.stylize.factory import check_local_files
    from headstyle.stylize.presets import resolve_config
    from headstyle.training import checkpointing

    skipped: list = []
    try:
        checkpoint = checkpointing.resolve_checkpoint(resume, skipped) if resume is not None else None
        cfg = resolve_config(preset, config, checkpoint, overrides)
    except (ConfigError, FileNotFoundError, checkpointing.ResumeError) as exc:
        raise UserError(str(exc)) from None
    if print_config:
        typer.echo(dumps(cfg), nl=False)
        return
    if not (cfg.prompt.prompt or cfg.style.image):
        raise UserError("no prompt: give --prompt TEXT, --preset NAME (pixar, joker, zombie, statue, werewolf, "
                        "sketch) or --style-image IMG")
    if not cfg.model.generator:
        raise UserError("no generator: give --generator PATH (a PanoHead .pkl/.pth or a .safetensors save)")
    for option, path in (("--style-image", cfg.style.image), ("style.image_2", cfg.style.image_2)):
        if path:
            check_image(path, option)
    if cfg.run.device:
        pick_device(cfg.run.device)
    try:
        check_local_files(cfg)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    check_out_dir(cfg.run.out)
    # The one writer of the run folder from here on, --overwrite and --resume included (checked before any model
    # loads); under accelerate the main process holds it.
    with folder_lock(cfg.run.out) if launched_main() else contextlib.nullcontext():
        if checkpoint is None:
            if overwrite:
                checkpointing.clear_run(cfg.run.out)
            else:
                try:
                    checkpointing.check_fresh_run_dir(cfg.run.out)
                except checkpointing.RunExistsError as exc:
                    raise UserError(str(exc)) from None
        for path, problem in skipped:
            typer.secho(f"note: checkpoint {path} is corrupt ({problem}); resuming from {checkpoint}", err=True,
                        fg=typer.colors.YELLOW)

        from headstyle.generator.checkpoint import CheckpointError
        from headstyle.priors.diffusers_prior import PriorLoadError
        from headstyle.stylize.factory import run_stylize
        from headstyle.training.gradients import NonFiniteError
        from headstyle.weight_files import WeightsError

        try:
            result = run_stylize(cfg, resume=checkpoint, progress=progress)
        except (CheckpointError, PriorLoadError, checkpointing.ResumeError, ConfigError, WeightsError) as exc:
            raise UserError(str(exc)) from None
        except NonFiniteError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise SystemExit(1) from None
        if result.interrupted:
            typer.echo(f"interrupted at iteration {result.iteration}; checkpoint: {result.checkpoint}\n"
                       f"resume with: headstyle stylize --resume {cfg.run.out}")
            # 128 + the signal, as shells report a job a signal ended: `stylize ... && render ...` stops here.
            raise SystemExit(128 + (result.signal or 0))
        if result.generator_path is not None:
            typer.echo(f"done: {result.iteration} iterations ({result.skipped_steps} skipped); stylised generator: "
                       f"{result.generator_path} (headstyle render --generator {result.generator_path})")
            if cfg.optim.stop_rule != "none":
                typer.echo(stopping.describe(result.rule_fired_at, cfg.optim.stop_action, cfg.optim.stop_margin,
                                             str(Path(cfg.run.out) / stopping.SIGNALS)))
