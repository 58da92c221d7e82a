"""`headstyle eval`: the papers' metrics of a stylised generator against its base, with local weights.

Renders I identities at V views with both generators (the same ws: the base generator's mapping),
optionally makes DiffStyle360's SD img2img reference set of the base views (cached), scores every
metric whose weights are given (headstyle.metrics.suite) and writes metrics.json, metrics.md and
views.png (rows per identity: base, stylised, reference). With ``--lab STYLE`` the base is the lab's
unedited head world and the lab bench's ground-truth figures (headstyle.lab.experiments.evaluate.score) are added,
for the bench's held-out identities and cameras, so a bench run can be re-scored from its saved
generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from headstyle.cli.common import UserError, app

if TYPE_CHECKING:
    import torch

    from headstyle.lab.world.generator import LabGenerator
    from headstyle.metrics.reference import ReferenceSettings
    from headstyle.metrics.suite import Renders, Scorers
    from headstyle.priors.loading import PriorSpec

def ring_yaws(views: int) -> list[float]:
    """``views`` yaws evenly spaced over 360 degrees from the front, wrapped to [-pi, pi) (the lab's cameras)."""
    return [(2 * math.pi * k / views + math.pi) % (2 * math.pi) - math.pi for k in range(views)]


def load_lab_generator(path: str, device: torch.device) -> LabGenerator:
    """A stylised lab generator saved by a `lab bench`/`demo` run (its folder or generator.safetensors),
    rebuilt at the bench's sizes (headstyle.lab.experiments.bench.LabSettings)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from headstyle.lab.experiments.bench import LabSettings, new_generator

    file = Path(path) / "generator.safetensors" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise UserError(f"--stylized {path}: no generator.safetensors there; give a lab run folder or its weights")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"--stylized {file}: not a readable safetensors file ({exc})") from None
    G = new_generator(LabSettings())
    own = G.state_dict()
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise UserError(f"--stylized {file} is not a lab generator at the bench's sizes (its tensors differ)")
    G.load_state_dict(state)
    return G.to(device).eval()


@app.command("eval")
def eval_command(
    stylized: str = typer.Option(..., help="Stylised generator: .pkl, .pth, .safetensors (+ .json) or folder; with "
                                 "--lab a lab run folder or its generator.safetensors."),
    out: str = typer.Option(..., help="Output folder: metrics.json, metrics.md, views.png (created)."),
    base: str | None = typer.Option(None, help="Unedited generator (PanoHead .pkl etc.); not with --lab."),
    lab: str | None = typer.Option(None, help="Score a lab run of this style (statue, zombie, toon, gold): the base "
                                   "is the lab's head world and its ground truth is scored too."),
    prompt: str | None = typer.Option(None, help="Style prompt: CLIP-T and the reference set's img2img prompt."),
    identities: int = typer.Option(4, help="Identities: seeds 0..N-1 (--lab: the bench's held-out ones)."),
    seeds: str | None = typer.Option(None, help="Explicit latent seeds instead of --identities, e.g. 0,5,7."),
    ring: int = typer.Option(8, help="Views evenly spaced over 360 degrees from the front (the lab bench's cameras)."),
    views: str | None = typer.Option(None, help="Explicit view yaws in degrees (0 = front) instead of --ring."),
    pitch: float = typer.Option(10.0, help="View pitch in degrees."),
    truncation: float = typer.Option(0.7, help="Truncation psi for seeds (1 = none)."),
    truncation_cutoff: int = typer.Option(14, help="Number of ws truncated."),
    raw_only: bool = typer.Option(False, help="Score the raw neural renders (no super-resolution)."),
    neural_rendering_resolution: int | None = typer.Option(None, help="Override the raw render size."),
    depth_samples: int | None = typer.Option(None, help="Override coarse and importance samples per ray."),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
    dlib: bool = typer.Option(True, help="dlib descriptor identity distance (offline; face-recognition-models)."),
    arcface: str | None = typer.Option(None, help="ArcFace weights: model_ir_se50.pth (IR-SE50) or an insightface "
                                       "iresnet backbone.pth."),
    clip: str | None = typer.Option(None, help="Local transformers CLIP folder (CLIP-I, CLIP-T)."),
    inception: str | None = typer.Option(None, help="FID Inception weights: pt_inception-2015-12-05-6726825d.pth."),
    depth_anything: str | None = typer.Option(None, help="Local transformers Depth Anything folder (Delta D)."),
    prior: str | None = typer.Option(None, help="SD 1.x diffusers folder (or hub id) for DiffStyle360's img2img "
                                     "reference set; needs --prompt."),
    vae: str = typer.Option("", help="VAE of --prior: '' (the model's own), 'auto' or a folder / hub id."),
    negative_prompt: str = typer.Option("", help="Negative prompt of the reference img2img."),
    reference_steps: int = typer.Option(50, help="DDIM steps of the reference schedule."),
    reference_start: int = typer.Option(25, help="Schedule index the unedited views are noised to (25 of 50)."),
    reference_guidance: float = typer.Option(7.5, help="Classifier-free guidance of the reference img2img."),
    reference_seed: int = typer.Option(0, help="Seed of the reference img2img noise."),
    reference_cache: str | None = typer.Option(None, help="Cache folder of reference sets (default OUT/reference)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Score a stylised generator against its base: identity, CLIP, FID/KID, Delta D, multi-view consistency."""
    from headstyle.cli.common import (
        check_count,
        check_out_dir,
        check_render_overrides,
        check_seed,
        check_truncation,
        parse_seeds,
        parse_yaws,
        pick_device,
    )
    from headstyle.faces.perceptual import WeightsError
    from headstyle.metrics.reference import ReferenceSettings
    from headstyle.metrics.suite import WeightPaths, check_paths, load_scorers
    from headstyle.priors.loading import PriorSpec
    from headstyle.settings import MAX_IDENTITIES, MAX_VIEWS

    # Every input is checked before a model loads.
    if (lab is None) == (base is None):
        raise UserError("give --base G (a PanoHead generator) or --lab STYLE (a lab run), exactly one")
    if lab is not None:
        from headstyle.lab.world.heads import STYLES

        if lab not in STYLES:
            raise UserError(f"--lab {lab!r} is not a lab style; choose one of {', '.join(STYLES)}")
        if seeds is not None:
            raise UserError("--seeds picks PanoHead latents; the lab scores its held-out identities (--identities N)")
    elif not Path(base).exists():
        raise UserError(f"--base {base}: no such file or folder")
    if not Path(stylized).exists():
        raise UserError(f"--stylized {stylized}: no such file or folder")
    check_count("--identities", identities, 1, MAX_IDENTITIES)
    seed_list = parse_seeds(seeds) if seeds is not None else list(range(identities))
    check_count("--ring", ring, 1, MAX_VIEWS)
    yaws = parse_yaws(views, "--views") if views is not None else ring_yaws(ring)
    if not yaws:
        raise UserError("--views needs at least one yaw")
    if not (math.isfinite(pitch) and abs(pitch) <= 360):
        raise UserError("--pitch must be degrees within [-360, 360]")
    check_truncation(truncation, truncation_cutoff)
    check_render_overrides(neural_rendering_resolution, depth_samples)
    if lab is not None and (neural_rendering_resolution or depth_samples or raw_only):
        raise UserError("--raw-only and the render overrides are for PanoHead generators; the lab renders as its bench")
    if prior is not None and not prompt:
        raise UserError("--prior makes the reference set by img2img with the style prompt: give --prompt too")
    if prior is not None and not Path(prior).is_dir() and (Path(prior).exists() or prior.count("/") != 1):
        raise UserError(f"--prior {prior}: not a diffusers model folder or a hub id (owner/name)")
    check_seed(reference_seed, "--reference-seed")
    try:
        reference = ReferenceSettings(prompt or "", negative_prompt, reference_steps, reference_start,
                                      reference_guidance, reference_seed)  # fmt: skip
    except ValueError as exc:
        raise UserError(f"--reference-start/--reference-steps/--reference-guidance: {exc}") from None
    paths = WeightPaths(dlib=dlib, arcface=arcface, clip=clip, inception=inception, depth_anything=depth_anything)
    try:
        check_paths(paths)
    except WeightsError as exc:
        raise UserError(str(exc)) from None
    check_out_dir(out)
    dev = pick_device(device)
    try:
        scorers = load_scorers(paths, dev)
    except WeightsError as exc:
        raise UserError(str(exc)) from None

    job = EvalJob(
        lab=lab, base=base, stylized=stylized, seeds=seed_list, identities=identities, yaws=yaws,
        ring=views is None, pitch=math.radians(pitch), truncation=truncation,
        truncation_cutoff=truncation_cutoff, raw_only=raw_only, neural_rendering_resolution=neural_rendering_resolution,
        depth_samples=depth_samples, device=dev, prompt=prompt,
        prior=PriorSpec(prior, vae, latent_sample="mean") if prior else None, reference=reference,
        cache=Path(reference_cache) if reference_cache else Path(out) / "reference",
    )  # fmt: skip
    run_eval(job, scorers, Path(out), progress)


@dataclass
class EvalJob:
    """The checked inputs of `headstyle eval`."""

    lab: str | None
    base: str | None
    stylized: str
    seeds: list[int]
    identities: int
    yaws: list[float]
    ring: bool
    pitch: float
    truncation: float
    truncation_cutoff: int
    raw_only: bool
    neural_rendering_resolution: int | None
    depth_samples: int | None
    device: torch.device
    prompt: str | None
    prior: PriorSpec | None  # --prior and --vae, the SD model of the reference set's img2img
    reference: ReferenceSettings
    cache: Path

    def settings(self) -> dict[str, object]:
        """What metrics.json records about the run."""
        return {
            "base": self.base, "stylized": self.stylized, "lab": self.lab, "prompt": self.prompt,
            "seeds": None if self.lab else self.seeds, "identities": self.identities if self.lab else len(self.seeds),
            "yaws_degrees": [round(math.degrees(y), 6) for y in self.yaws],
            "pitch_degrees": round(math.degrees(self.pitch), 6), "truncation": self.truncation,
            "render": "raw" if self.raw_only else "super-resolved", "device": str(self.device),
            "neural_rendering_resolution": self.neural_rendering_resolution, "depth_samples": self.depth_samples,
            "reference": asdict(self.reference) if self.prior is not None else None,
        }  # fmt: skip


def render_lab(job: EvalJob, cams: torch.Tensor) -> tuple[Renders, Renders, dict[str, float]]:
    """Base (the unedited head world) and stylised renders of the bench's held-out identities, and the
    bench's ground-truth figures of the stylised generator (headstyle.lab.experiments.evaluate)."""
    from headstyle.lab.experiments.evaluate import REFERENCE_SEED, EvalSet, oracle, render_views, score
    from headstyle.lab.world.heads import sample_z
    from headstyle.lab.world.identities import held_out_z
    from headstyle.metrics.suite import Renders

    G = load_lab_generator(job.stylized, job.device)
    z = held_out_z(job.identities)
    # make_eval_set's set, at these cameras: before, truth, and the style's reference identities (4 of them).
    ev = EvalSet(job.lab, z, cams, render_views(oracle(None, G), z, cams), render_views(oracle(job.lab, G), z, cams),
                 render_views(oracle(job.lab, G), sample_z(4, REFERENCE_SEED), cams))  # fmt: skip
    pred = render_views(G, z, cams)
    as_renders = [Renders(r.image, r.depth, r.mask) for r in (ev.before, pred)]
    return as_renders[0], as_renders[1], score(pred, ev)


def render_panohead(job: EvalJob, cams: torch.Tensor, advance: Callable[[], None]) -> tuple[Renders, Renders]:
    """Base and stylised renders of the seeds' ws (the base generator's mapping) at every camera."""
    import torch

    from headstyle.cli.common import load_generator
    from headstyle.export import render_view
    from headstyle.generator.latents import latents_from_seeds
    from headstyle.metrics.suite import Renders

    G_base, G_styl = (load_generator(path, job.device, None, job.neural_rendering_resolution, job.depth_samples)
                      for path in (job.base, job.stylized))  # fmt: skip
    if (G_base.num_ws, G_base.w_dim) != (G_styl.num_ws, G_styl.w_dim):
        raise UserError(f"--base and --stylized take different ws ({G_base.num_ws} x {G_base.w_dim} vs "
                        f"{G_styl.num_ws} x {G_styl.w_dim}): not a stylisation of that generator")  # fmt: skip
    latents = latents_from_seeds(G_base, job.seeds, job.truncation, job.truncation_cutoff)
    out = []
    for G in (G_base, G_styl):
        images, depths, masks = [], [], []
        for latent in latents:
            for c in cams:
                r = render_view(G, latent, c[None], render_sr=not job.raw_only)
                images.append(r.image_raw if job.raw_only else r.image)
                depths.append(r.depth)
                masks.append(r.mask)
                advance()
        shape = (len(latents), len(cams))
        out.append(Renders(*(torch.cat(x).float().cpu().unflatten(0, shape) for x in (images, depths, masks))))
    return out[0], out[1]


def run_eval(job: EvalJob, scorers: Scorers, out: Path, progress: bool) -> None:
    """Render, make the reference set, score and write (the checked command's work)."""
    import torch

    from headstyle.cameras import cameras
    from headstyle.cli.common import load_diffusers_prior
    from headstyle.lab.experiments.evaluate import eval_cameras
    from headstyle.metrics.reference import model_fingerprint, reference_set
    from headstyle.metrics.suite import SCORE_STEPS, score, views_sheet, write_report
    from headstyle.progress import progress_bar

    if job.lab and job.ring:
        cams = eval_cameras(len(job.yaws), job.pitch)  # the bench's cameras, bit for bit
    else:
        cams = cameras(torch.tensor(job.yaws), torch.full((len(job.yaws),), job.pitch))
    lab_figures = None
    with progress_bar(disable=not progress) as bar:
        if job.lab:
            task = bar.add_task("rendering the lab", total=1)
            base, styl, lab_figures = render_lab(job, cams)
            bar.update(task, advance=1)
        else:
            task = bar.add_task("rendering", total=2 * len(job.seeds) * len(cams))
            base, styl = render_panohead(job, cams, lambda: bar.update(task, advance=1))

        reference = None
        if job.prior is not None:
            n = base.flat().shape[0]
            ref_task = bar.add_task("reference img2img", total=n)
            spec = job.prior
            reference, folder, cached = reference_set(
                base.flat(), job.reference, lambda: load_diffusers_prior(spec, job.device),
                model_fingerprint(spec.model, spec.vae), job.cache, lambda: bar.update(ref_task, advance=1),
            )  # fmt: skip
            bar.update(ref_task, completed=n)
            scorers.weights["reference"] = {"model": f"SD img2img of {spec.model} (vae: {spec.vae or 'its own'})",
                                            "path": str(folder), "cached": str(cached).lower()}  # fmt: skip
        else:
            scorers.skipped["reference"] = ("no --prior: DiffStyle360's reference set (SD img2img of the base views) "
                                            "was not made; fid_ref, kid_ref and clip_i_ref need it")  # fmt: skip

        score_task = bar.add_task("scoring", total=SCORE_STEPS)
        report = score(base, styl, cams, scorers, job.prompt, reference, lambda: bar.update(score_task, advance=1))
    if lab_figures is not None:
        report.metrics["lab"] = lab_figures
        truth = f"the lab's ground truth of style {job.lab!r} (headstyle.lab.experiments.evaluate)"
        report.weights["lab"] = {"model": truth}
    report.settings = job.settings()
    paths = write_report(report, views_sheet(base, styl, reference), out)
    for group, values in report.metrics.items():
        typer.echo(f"{group}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    for group, note in report.skipped.items():
        typer.echo(f"skipped {group}: {note}")
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")
