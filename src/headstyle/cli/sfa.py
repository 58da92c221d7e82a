"""`headstyle sfa dataset | train`: DiffStyle360's paired dataset and its Style Appearance Module."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from headstyle.cli.common import UserError, app, parse_numbers, parse_seeds, rerun_hint
from headstyle.cli.lab import lab_app
from headstyle.training.lock import folder_lock, launched_main
from headstyle.training.signals import STOP, resume_hint

if TYPE_CHECKING:
    import torch
    from torch import nn

sfa_app = typer.Typer(no_args_is_help=True, help="DiffStyle360's Style Appearance Module: paired data and training.")
app.add_typer(sfa_app, name="sfa")

LAB = "lab"
LAB_STYLE = "lab:"
# A lab dataset keeps the lab's first LAB_HELD_OUT held-out identities (lab.world.identities.held_out_z) out of
# every pair.
LAB_HELD_OUT = 64


def _split_specs(values: list[str]) -> list[str]:
    """Repeated and comma-separated values, in order."""
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


def _style_name(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'lab:STYLE' -> (STYLE, spec); a PATH -> (its folder or file name, PATH)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name.strip(), path.strip()
    if spec.startswith(LAB_STYLE):
        return spec.removeprefix(LAB_STYLE), spec
    p = Path(spec)
    return (p.parent.name if p.name == "generator.safetensors" else p.stem if p.is_file() else p.name), spec


@sfa_app.command("dataset")
def sfa_dataset(
    base: str = typer.Option(..., help="Base generator (PanoHead .pkl, .pth, .safetensors or folder), or 'lab' for "
                             "the synthetic lab's head world."),
    stylized: list[str] = typer.Option(..., help="Stylised generators, repeated or comma-separated: PATH or NAME=PATH "
                                       "(a `headstyle stylize` run folder or its generator); with --base lab also "
                                       "lab:STYLE (the lab's ground-truth style)."),
    out: str = typer.Option(..., help="Dataset folder (created; an existing one is continued)."),
    samples: int = typer.Option(150, help="Samples per style (the paper: 150)."),
    views: int = typer.Option(16, help="Views per sample at random 360-degree cameras (the paper's batch: 16)."),
    eval_seeds: str = typer.Option("", help="Seeds of the evaluation identities, kept out of every pair (with "
                                   "--base lab the lab's held-out identities are kept out)."),
    first_seed: int = typer.Option(100_000, help="Identity seeds: sample i is first+2i (content), first+2i+1 (style)."),
    truncation: float | None = typer.Option(None, help="Truncation psi (default 0.7; the lab's 0.75)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    pitch: float = typer.Option(20.0, help="Views' pitch range in degrees: uniform in [-pitch, pitch]."),
    camera_seed: int = typer.Option(0, help="Seed of the views' cameras."),
    raw_only: bool = typer.Option(False, help="Store the raw neural renders (no super-resolution)."),
    generator_config: str | None = typer.Option(None, help="Base config for bare .pth files (default: released "
                                                "PanoHead)."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = torch's default)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Render DiffStyle360's paired multi-view dataset: content, cross-identity style exemplar, stylised truth."""
    import torch

    from headstyle.cli.common import check_out_dir, parse_seeds, pick_device
    from headstyle.sfa.dataset import STYLE_NAME, DatasetError, DatasetSettings, write_dataset

    is_lab = base == LAB
    specs = [_style_name(s) for s in _split_specs(stylized)]
    names = [n for n, _ in specs]
    if not specs:
        raise UserError("--stylized needs at least one stylised generator")
    bad = [n for n in names if not STYLE_NAME.match(n)]
    if bad or len(set(names)) != len(names):
        raise UserError(f"style names {bad or names} must be distinct letters/digits/_-. (name them with NAME=PATH)")
    for name, path in specs:
        if path.startswith(LAB_STYLE):
            from headstyle.lab.world.heads import STYLES

            if not is_lab:
                raise UserError(f"--stylized {path}: lab styles go with --base lab")
            if name not in STYLES:
                raise UserError(f"--stylized {path}: not a lab style; choose one of {', '.join(STYLES)}")
        elif not Path(path).exists():
            raise UserError(f"--stylized {path}: no such file or folder")
    if not is_lab and not Path(base).exists():
        raise UserError(f"--base {base}: no such file or folder (or 'lab' for the lab's head world)")
    if is_lab and eval_seeds:
        raise UserError("--eval-seeds names PanoHead identities; with --base lab the lab's held-out ones are kept out")
    held_seeds = parse_seeds(eval_seeds, "--eval-seeds") if eval_seeds else []
    try:
        cfg = DatasetSettings(samples=samples, views=views, first_seed=first_seed,
                              truncation_psi=(0.75 if is_lab else 0.7) if truncation is None else truncation,
                              truncation_cutoff=truncation_cutoff, pitch=pitch, camera_seed=camera_seed,
                              render_sr=not raw_only)  # fmt: skip
    except ValueError as exc:
        raise UserError(f"{exc} (see headstyle sfa dataset --help)") from None
    if threads < 0:
        raise UserError("--threads must be >= 0")
    check_out_dir(out)
    dev = pick_device(device)
    if threads:
        torch.set_num_threads(threads)

    G = _lab_world(dev) if is_lab else _generator(base, dev, generator_config)
    # a bare stylised .pth is read with the base generator's configuration, as the app does
    style_config = generator_config or (None if is_lab else base)
    styled = {name: _stylised(path, is_lab, dev, style_config) for name, path in specs}
    if is_lab:
        from headstyle.lab.world.identities import held_out_z

        held_out = held_out_z(LAB_HELD_OUT)
    else:
        from headstyle.generator.latents import z_from_seed

        held_out = torch.cat([z_from_seed(s, G.z_dim) for s in held_seeds]) if held_seeds else torch.empty(0, G.z_dim)
    sources = {"base": base, **dict(specs)}
    try:
        with resume_hint(rerun_hint()):
            ds = write_dataset(out, G, styled, cfg, held_out, sources, dev, progress=progress)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    typer.echo(f"wrote {len(ds)} samples ({len(ds.styles)} styles x {cfg.samples}, {cfg.views} views each) to {out}")


def _lab_world(device: torch.device) -> nn.Module:
    from headstyle.lab.experiments.bench import LabSettings
    from headstyle.lab.world.generator import LabGenerator

    s = LabSettings()
    return LabGenerator(resolution=s.resolution, sr_factor=s.sr_factor, residual=False).to(device).eval()


def _generator(path: str, device: torch.device, config: str | None) -> nn.Module:
    from headstyle.cli.common import load_generator

    return load_generator(path, device, config)


def _stylised(path: str, is_lab: bool, device: torch.device, config: str | None) -> nn.Module:
    """A lab ground-truth style or lab run (with --base lab), else a PanoHead-compatible stylised generator."""
    if path.startswith(LAB_STYLE):
        from headstyle.lab.experiments.bench import LabSettings
        from headstyle.lab.world.generator import LabGenerator

        s = LabSettings()
        style = path.removeprefix(LAB_STYLE)
        return LabGenerator(resolution=s.resolution, sr_factor=s.sr_factor, style=style, residual=False).to(device)
    if is_lab:
        from headstyle.cli.eval import load_lab_generator

        return load_lab_generator(path, device)
    return _generator(path, device, config)


@sfa_app.command("train")
def sfa_train(
    data: str | None = typer.Option(None, help="Dataset folder (`headstyle sfa dataset`)."),
    out: str | None = typer.Option(None, help="Run folder: config.toml, logs, checkpoints/, module/ (the result)."),
    prior: str | None = typer.Option(None, help="SD 1.5-family diffusers folder or hub id (the base the module is "
                                     "trained for; default Realistic Vision 5.1)."),
    vae: str | None = typer.Option(None, help="VAE: '' (the model's own, the default), 'auto' or a folder / hub id."),
    controlnet_depth: str | None = typer.Option(None, help="Depth ControlNet fed the views' depth ('' = none)."),
    role: str | None = typer.Option(None, help="style: a Style Appearance Module beside the frozen content module "
                                    "(the paper); shared: one fine-tuned module writes both banks."),
    lora_rank: int | None = typer.Option(None, help="Also train LoRA of this rank on the main UNet's attention "
                                         "(0 = off: the main UNet stays frozen, as the paper)."),
    iterations: int | None = typer.Option(None, help="Iterations (the paper: 800)."),
    lr: float | None = typer.Option(None, help="AdamW learning rate (the paper: 1e-5)."),
    views: int | None = typer.Option(None, help="Views per batch (the paper: 16)."),
    held_out: int | None = typer.Option(None, help="Samples per style held out for the validation loss (2)."),
    seed: int | None = typer.Option(None, help="Seed of samples, views, timesteps and noise."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    config: str | None = typer.Option(None, help="TOML/JSON run config; flags and --set override its fields."),
    set_: list[str] = typer.Option([], "--set", help="Override any field: section.field=value, e.g. "
                                   "--set train.weight_decay=0 --set run.checkpoint_every=50 (see --print-config)."),
    print_config: bool = typer.Option(False, help="Print the resolved config as TOML and exit."),
    resume: str | None = typer.Option(None, help="Continue a run exactly from its folder (its own config; only "
                                      "--iterations may change)."),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = torch's default)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Fine-tune a Style Appearance Module on a paired dataset (diffusion loss on the stylised views)."""
    from headstyle import settings
    from headstyle.sfa.config import SFATrainConfig, dumps

    flags = {
        "data.path": data, "data.held_out_per_style": held_out, "run.out": out, "model.prior": prior,
        "model.vae": vae, "model.controlnet_depth": controlnet_depth, "model.device": device, "train.role": role,
        "train.lora_rank": lora_rank,
        "train.iterations": iterations, "train.lr": lr, "train.views": views, "train.seed": seed,
    }  # fmt: skip
    given = [k for k, v in flags.items() if v is not None and k != "train.iterations"]
    if resume is not None and (given or config or set_):
        raise UserError("--resume continues the run's own config: give only --iterations with it")
    try:
        if resume is not None:
            run_config = Path(resume) / "config.toml"
            if not run_config.is_file():
                raise UserError(f"--resume {resume}: no config.toml there; give the --out folder of an sfa train run")
            cfg = settings.from_dict(SFATrainConfig(), settings.read_file(run_config))
        else:
            cfg = SFATrainConfig()
            if config is not None:
                cfg = settings.from_dict(cfg, settings.read_file(config))
        overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_)
        cfg = settings.from_dict(cfg, settings.overrides_dict(cfg, overrides))
    except settings.ConfigError as exc:
        raise UserError(f"{exc} (see headstyle sfa train --help)") from None
    if print_config:
        typer.echo(dumps(cfg), nl=False)
        return
    if threads < 0:
        raise UserError("--threads must be >= 0")
    run_sfa_train(cfg, resume, threads, progress)


def run_sfa_train(cfg, resume: str | None, threads: int, progress: bool) -> None:
    """Check the inputs (before any model loads), load the prior and the dataset, train, write the module."""
    import torch

    from headstyle.cli.common import check_out_dir, load_diffusers_prior, pick_device
    from headstyle.priors.loading import PriorSpec
    from headstyle.sfa.dataset import DatasetError, SFADataset
    from headstyle.sfa.train import SFATrainer
    from headstyle.training import checkpointing

    if not (cfg.data.path and cfg.run.out):
        raise UserError("give --data and --out (or data.path and run.out)")
    try:
        dataset = SFADataset(cfg.data.path)
    except DatasetError as exc:
        raise UserError(str(exc)) from None
    if not len(dataset):
        raise UserError(f"--data {cfg.data.path} holds no complete sample yet; finish `headstyle sfa dataset` first")
    if not dataset.split(cfg.data.held_out_per_style)[0]:
        raise UserError(f"--data {cfg.data.path}: all {len(dataset)} samples are held out for validation; write more "
                        "samples or lower --held-out")  # fmt: skip
    check_out_dir(cfg.run.out)
    # The one writer of --out from here on (a live run there is refused before any model loads).
    with folder_lock(cfg.run.out) if launched_main() else contextlib.nullcontext():
        if resume is None and checkpointing.run_exists(cfg.run.out):
            raise UserError(f"--out {cfg.run.out} already holds a run: continue it with --resume {cfg.run.out} or "
                            "choose another --out")  # fmt: skip
        if resume is not None:
            try:
                checkpointing.resolve_checkpoint(resume)
            except (FileNotFoundError, checkpointing.ResumeError) as exc:
                raise UserError(f"--resume: {exc}") from None
        if not math.isfinite(cfg.train.control_scale):
            raise UserError("train.control_scale must be finite")
        dev = pick_device(cfg.model.device)
        if threads:
            torch.set_num_threads(threads)
        m = cfg.model
        nets = {"depth": m.controlnet_depth} if m.controlnet_depth else {}
        # latent_sample="mean": the VAE posterior mean, so a run is a function of its seed
        spec = PriorSpec(m.prior, m.vae, nets, dtype=torch.float32, latent_sample="mean")
        prior = load_diffusers_prior(spec, dev)
        try:
            trainer = SFATrainer(cfg, prior, dataset)
            result = trainer.train(resume=resume, progress=progress)
        except (checkpointing.ResumeError, DatasetError) as exc:
            raise UserError(str(exc)) from None
        STOP.raise_if_requested(f"checkpoint {result.checkpoint}; {rerun_hint('--resume', cfg.run.out)}")
        if result.val_loss is not None:
            typer.echo(f"held-out diffusion loss: {result.val_loss:.5f} ({len(trainer.val_ids)} samples)")
        typer.echo(f"wrote {result.module} after {result.iteration} iterations; use it with "
                   f"headstyle style-views --style-module {result.module}")  # fmt: skip


@lab_app.command("sfa-ablation")
def lab_sfa_ablation(
    out: str = typer.Option("runs/lab-sfa-ablation", help="Output folder: ablation.md/.csv/.json, tradeoff.png, "
                            "views.png, data/ and the training runs (a finished run is reused, a broken one resumed)."),
    prior: str = typer.Option("", help="The base prior: an SD-layout lab prior folder (`headstyle lab train-prior`'s "
                              "model/); '' = the shipped learned lab prior."),
    data: str = typer.Option("", help="Training pairs: a `headstyle sfa dataset` folder (e.g. from lab runs of "
                             "`headstyle stylize`); '' = written from the lab's ground truth of --seen."),
    seen: str = typer.Option("statue,zombie,toon", help="Training styles (when --data is not given)."),
    unseen: str = typer.Option("gold", help="The evaluation style, in no training pair."),
    samples: int = typer.Option(24, help="Samples per training style (the paper: 150)."),
    views: int = typer.Option(8, help="Views per sample (the paper: 16)."),
    iterations: int = typer.Option(200, help="Training iterations per module (the paper: 800)."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (the paper: 1e-5)."),
    train_views: int = typer.Option(8, help="Views per training batch (the paper: 16)."),
    identities: int = typer.Option(4, help="Held-out evaluation identities."),
    eval_views: int = typer.Option(8, help="Evaluation views over 360 degrees."),
    strength: float = typer.Option(0.6, help="img2img strength."),
    steps: int = typer.Option(25, help="DDIM steps of the full schedule."),
    guidance: float = typer.Option(3.0, help="Classifier-free guidance (the paper: 3.0)."),
    taus: str = typer.Option("1.0,1.025,1.05,1.075,1.1", help="Key scaling sweep."),
    key_tau: float = typer.Option(1.05, help="tau of the '+ key scaling' row (the paper: 1.05)."),
    pairing: str = typer.Option("paper", help="Value pairing: paper (K_hat-V_s, tau K_s-V_c, as written) or matched."),
    seeds: str = typer.Option("0,1", help="Seeds: a training run and sampling noise each."),
    mask_regions: str = typer.Option("", help="Stylise only these world regions, e.g. 'hair' or 'skin,lips' (skin, "
                                     "hair, sclera, iris, brow, lips): each reference view's own region mask masks "
                                     "the banks; '' = everywhere."),
    threads: int = typer.Option(1, help="CPU threads for torch (0 = torch's default)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """DiffStyle360's Table 2 in the lab: SFA alone, + fine-tuning, + Style Appearance Module, + key scaling."""
    import torch

    from headstyle.cli.common import check_out_dir
    from headstyle.lab.experiments.sfa_ablation import AblationSettings, run_ablation
    from headstyle.lab.prior.learned import SHIPPED
    from headstyle.sfa.dataset import DatasetError, read_manifest

    folder = Path(prior) if prior else SHIPPED
    if not (folder / "model_index.json").is_file():
        raise UserError(f"--prior {prior or SHIPPED}: not an SD-layout lab prior folder (no model_index.json); give "
                        "the model/ folder of `headstyle lab train-prior`")  # fmt: skip
    if data:
        try:
            read_manifest(Path(data))
        except DatasetError as exc:
            raise UserError(f"--data: {exc}") from None
    try:
        settings = AblationSettings(
            prior=str(folder), data=data, seen=tuple(s.strip() for s in seen.split(",") if s.strip()), unseen=unseen,
            samples=samples, views=views, iterations=iterations, lr=lr, train_views=train_views,
            eval_identities=identities, eval_views=eval_views, strength=strength, steps=steps, guidance=guidance,
            taus=parse_numbers(taus, float, "--taus"), key_tau=key_tau, pairing=pairing,
            seeds=tuple(parse_seeds(seeds)),
            mask_regions=tuple(r.strip() for r in mask_regions.split(",") if r.strip()),
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(f"{exc} (see headstyle lab sfa-ablation --help)") from None
    if threads < 0:
        raise UserError("--threads must be >= 0")
    check_out_dir(out)
    if threads:
        torch.set_num_threads(threads)
    with resume_hint(rerun_hint()):
        result = run_ablation(settings, Path(out), progress=progress)
    typer.echo(result.markdown(), nl=False)
    typer.echo(f"wrote {out}/ablation.md, ablation.csv, tradeoff.png and views.png")
