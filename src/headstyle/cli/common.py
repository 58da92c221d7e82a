"""What every command shares: the Typer app, the one-line user error, and the checks and loaders that run
before any slow work (seeds, views, device, output folder, generator, diffusers prior)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from headstyle.settings import (
    MAX_IDENTITIES,
    MAX_TRUNCATION_CUTOFF,
    MAX_VIEWS,
    SEED_END,
    TRUNCATION_PSI,
    Budget,
    seed_problem,
)

if TYPE_CHECKING:
    import torch

    from headstyle.generator.base import Generator
    from headstyle.generator.latents import Latent
    from headstyle.priors.diffusers_prior import DiffusersPrior
    from headstyle.priors.loading import PriorSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="headstyle: identity-preserving 3D head stylisation (PanoHead + Stable Diffusion score distillation). "
    "Bad input gets a one-line error and exit code 2.",
)

MAX_NEURAL_RENDERING_RESOLUTION = 1024
MAX_DEPTH_SAMPLES = 1024


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def rerun_hint(flag: str = "", *values: str) -> str:
    """How to continue the command that runs: its own command line again, with ``flag`` (e.g. --resume) and its
    ``values`` added unless it has that flag already."""
    argv = ["headstyle", *sys.argv[1:]]
    if flag and flag not in argv:
        argv += [flag, *values]
    return "continue it with: " + shlex.join(argv)


def check_count(option: str, value: int | float, low: float, budget: Budget) -> None:
    """A count, size or iteration option (or a number such as psi) within [low, budget.high], checked before any
    model loads: one line naming the option, the range and why it ends there (headstyle.settings' budgets)."""
    if not low <= value <= budget.high:  # written so that NaN lies outside
        raise UserError(f"{option} {value} lies outside [{low}, {budget.high}]: {budget.why}")


def check_truncation(psi: float, cutoff: int | None, option: str = "--truncation") -> None:
    """Truncation psi and cutoff within headstyle.settings' ranges."""
    check_count(option, psi, TRUNCATION_PSI.low, TRUNCATION_PSI)
    if cutoff is not None:
        check_count(f"{option}-cutoff", cutoff, 0, MAX_TRUNCATION_CUTOFF)


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed in [0, SEED_END) (headstyle.settings.seed_problem), checked before any model loads."""
    if problem := seed_problem(option, seed):
        raise UserError(problem)
    return seed


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """'0,1' -> [0, 1]: at least one integer seed in [0, 2**32)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: seeds are integers like 0,1") from None
    if not seeds or any(not 0 <= s < SEED_END for s in seeds):
        raise UserError(f"{option} must be integers in [0, 2**32), got {text!r}")
    check_count(f"{option} count", len(seeds), 1, MAX_IDENTITIES)
    return seeds


def parse_numbers(text: str, kind: type[int] | type[float], option: str) -> tuple:
    """'1,281' -> (1, 281): at least one number of ``kind``."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: give numbers separated by commas, e.g. 1,2") from None
    if not values:
        raise UserError(f"{option} is empty: give at least one value")
    return values


def parse_yaws(text: str, option: str = "--yaws") -> list[float]:
    """'-90,0,90' (degrees) -> radians."""
    from headstyle.cameras import parse_angles_degrees

    try:
        yaws = parse_angles_degrees(text)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None
    check_count(f"{option} count", len(yaws), 0, MAX_VIEWS)
    return yaws


def parse_pivot(text: str, option: str = "--pivot") -> tuple[float, float, float]:
    """'0,0,0.2' -> (0.0, 0.0, 0.2): a look-at point of three numbers within [-1, 1]."""
    values = parse_numbers(text, float, option)
    if len(values) != 3 or not all(abs(v) <= 1 for v in values):
        raise UserError(f"{option} {text!r}: give the look-at point as x,y,z within [-1, 1], e.g. 0,0,0")
    return values[0], values[1], values[2]


def pick_device(name: str | None) -> torch.device:
    """headstyle.runtime.resolve_device, its error as a UserError about --device."""
    from headstyle.runtime import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise UserError(f"--{exc}") from None


def check_out_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """An output folder that exists or can be created and written, checked before any model loads: the
    nearest existing folder above it must take a new folder (not a file, not read-only, not /proc)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {out} exists and is not a folder; give a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {out} lies under the file {existing}; give a folder path")
    try:
        Path(tempfile.mkdtemp(prefix=".headstyle-probe-", dir=existing)).rmdir()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"{option} {out}: cannot write in {existing} ({reason}); choose a writable folder") from None
    return path


def check_image(path: str | os.PathLike, option: str) -> None:
    """A readable image file (PNG, JPEG, ...) within the pixel budget, decoded once before any model loads."""
    from headstyle.input_files import InputError, read_image

    try:
        read_image(path, InputError, "give a PNG or JPEG image")
    except InputError as exc:
        raise UserError(f"{option} {exc}") from None


def check_render_overrides(neural_rendering_resolution: int | None, depth_samples: int | None) -> None:
    for flag, value, low, high in (
        ("--neural-rendering-resolution", neural_rendering_resolution, 4, MAX_NEURAL_RENDERING_RESOLUTION),
        ("--depth-samples", depth_samples, 2, MAX_DEPTH_SAMPLES),
    ):
        if value is not None and not low <= value <= high:
            raise UserError(f"{flag} must lie in [{low}, {high}], got {value}")


def load_generator(
    path: str,
    device: torch.device,
    config: str | None = None,
    neural_rendering_resolution: int | None = None,
    depth_samples: int | None = None,
    ray_start: float | None = None,
) -> Generator:
    """A generator from a .pkl, .pth, .safetensors or folder (headstyle.generator.checkpoint), optionally
    rendering at another raw resolution, with another number of samples per ray, or from another ray start."""
    from headstyle.generator.checkpoint import CheckpointError
    from headstyle.generator.checkpoint import load_generator as load

    check_render_overrides(neural_rendering_resolution, depth_samples)
    overrides: dict[str, float] = {}
    if depth_samples:
        overrides.update(depth_resolution=depth_samples, depth_resolution_importance=depth_samples)
    if ray_start is not None:
        overrides["ray_start"] = ray_start
    try:
        return load(path, device=device, config=config, neural_rendering_resolution=neural_rendering_resolution,
                    rendering_overrides=overrides or None)  # fmt: skip
    except CheckpointError as exc:
        raise UserError(str(exc)) from None


def check_heads(seeds: str | None, w_npz: str | None) -> list[int]:
    """The seeds to render (default 0), or [] when the heads come from a W+ npz that exists; not both."""
    if seeds is not None and w_npz is not None:
        raise UserError("give either --seeds or --w-npz, not both")
    if w_npz is not None:
        from headstyle.generator.latents import CodeFileError, check_code_file

        if not Path(w_npz).is_file():
            raise UserError(f"--w-npz {w_npz}: no such file")
        try:
            check_code_file(w_npz)
        except CodeFileError as exc:
            raise UserError(f"--w-npz {exc}") from None
        return []
    return parse_seeds(seeds or "0")


def heads(
    G: Generator, seeds: list[int], w_npz: str | None, truncation: float, truncation_cutoff: int, device: torch.device
) -> list[Latent]:
    """The latents to render: W+ codes from ``w_npz`` (checked against G), else ws of ``seeds``."""
    from headstyle.generator.latents import latents_from_npz, latents_from_seeds

    if w_npz is None:
        return latents_from_seeds(G, seeds, truncation, truncation_cutoff)
    try:
        return latents_from_npz(w_npz, G.num_ws, G.w_dim, device=device)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def load_diffusers_prior(spec: PriorSpec, device: torch.device) -> DiffusersPrior:
    """The SD 1.5-family prior ``spec`` names (headstyle.priors.loading.load_prior), its load error a UserError."""
    from headstyle.priors.diffusers_prior import PriorLoadError
    from headstyle.priors.loading import load_prior

    try:
        return load_prior(spec, device)
    except PriorLoadError as exc:
        raise UserError(str(exc)) from None
