"""The models behind the page, loaded on first use and kept: the configured PanoHead world (app.toml) and
the synthetic lab (no weights). Only the job worker calls the loaders, one job at a time.

Stylised generators on offer: the configured [styles], plus every style trained here (a run folder under
WORKDIR/styles/ or WORKDIR/lab/styles/ holding its final generator.safetensors); the lab also offers its
ground-truth styles.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from headstyle.app.config import AppConfig, LabSection, RenderSection, tab_reasons
from headstyle.app.jobs import AppError
from headstyle.generator.base import Generator
from headstyle.runtime import resolve_device

if TYPE_CHECKING:
    from headstyle.lab.world.generator import LabGenerator

# PanoHead's projector renders with ray_start 2.35 (the generator's own 2.25 elsewhere).
PROJECTION_RAY_START = 2.35
GROUND_TRUTH = " (ground truth)"


def device_from_name(name: str) -> torch.device:
    """headstyle.runtime.resolve_device, its error as an AppError about server.device."""
    try:
        return resolve_device(name)
    except ValueError as exc:
        raise AppError(f"server.{exc}") from None


def trained_styles(folder: Path) -> dict[str, str]:
    """Run folders under ``folder`` that finished (their generator.safetensors exists), newest first."""
    if not folder.is_dir():
        return {}
    runs = [d for d in folder.iterdir() if d.is_dir() and (d / "generator.safetensors").is_file()]
    runs.sort(key=lambda d: (d / "generator.safetensors").stat().st_mtime, reverse=True)
    return {d.name: str(d / "generator.safetensors") for d in runs}


class _Cache:
    """Loaded models by key; a file's modification time is part of its key, so a re-trained style reloads."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}

    def get(self, key: tuple, load) -> Any:
        if key not in self._items:
            self._items[key] = load()
        return self._items[key]


def _stamp(path: str) -> float:
    p = Path(path)
    return p.stat().st_mtime if p.exists() else 0.0


def _style_module(cache: _Cache, folder: str, prior) -> tuple[Any, nn.Module | None, nn.Module | None]:
    """(prior, content UNet, style UNet) of a trained Style Appearance Module for ``prior``
    (StyleAppearanceModule.fusion); "" = none: ``prior`` and its own UNet writes both banks."""
    if not folder:
        return prior, None, None
    from headstyle.sfa.module import ModuleLoadError, StyleAppearanceModule

    def load() -> StyleAppearanceModule:
        try:
            return StyleAppearanceModule.load(folder, prior.unet)
        except ModuleLoadError as exc:
            raise AppError(str(exc)) from None

    module = cache.get(("style_module", folder, _stamp(folder), id(prior)), load)
    return module.fusion(prior)


class Models:
    """The configured models (app.toml): base generator, stylised generators, SD prior, LPIPS weights."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.workdir = Path(cfg.server.workdir)
        self.styles_dir = self.workdir / "styles"
        self._cache = _Cache()

    @property
    def render(self) -> RenderSection:
        return self.cfg.render

    def styles(self) -> dict[str, str]:
        """Stylised generators on offer: name -> checkpoint (trained here first, then the configured ones)."""
        return {**trained_styles(self.styles_dir), **self.cfg.styles}

    def reasons(self) -> dict[str, str | None]:
        return tab_reasons(self.cfg, self.styles())

    def device(self) -> torch.device:
        return device_from_name(self.cfg.server.device)

    def _generator(self, path: str, config: str | None, ray_start: float | None = None) -> Generator:
        from headstyle.generator.checkpoint import CheckpointError, load_generator

        r = self.cfg.render
        overrides: dict[str, float] = {}
        if r.depth_samples:
            overrides.update(depth_resolution=r.depth_samples, depth_resolution_importance=r.depth_samples)
        if ray_start is not None:
            overrides["ray_start"] = ray_start

        def load() -> Generator:
            try:
                return load_generator(path, self.device(), config, r.neural_rendering_resolution or None, overrides)
            except (CheckpointError, FileNotFoundError) as exc:
                raise AppError(str(exc)) from None

        return self._cache.get(("generator", path, _stamp(path), config, ray_start), load)

    def base(self, projection: bool = False) -> Generator:
        """The base generator; ``projection``: rendering from ray start 2.35 as PanoHead's projector does."""
        m = self.cfg.models
        if not m.generator:
            raise AppError("no base generator: set models.generator in the app config")
        return self._generator(m.generator, m.generator_config or None, PROJECTION_RAY_START if projection else None)

    def stylised(self, name: str) -> Generator:
        """A stylised generator by its style name, read with the base generator's configuration when bare."""
        styles = self.styles()
        if name not in styles:
            raise AppError(f"no style named {name!r}; choose one of: {', '.join(styles) or 'none yet'}")
        m = self.cfg.models
        S = self._generator(styles[name], m.generator_config or m.generator or None)
        G = self.base()
        if (S.num_ws, S.w_dim) != (G.num_ws, G.w_dim):
            raise AppError(f"style {name!r} takes {S.num_ws} ws of {S.w_dim} but the base generator {G.num_ws} of "
                           f"{G.w_dim}: it stylises another generator")  # fmt: skip
        return S

    def perceptual(self) -> nn.Module:
        """The projector's distance: LPIPS-VGG16 from models.vgg16 (+ lpips_lin), else the Laplacian-L1 fallback."""
        from headstyle.faces.perceptual import WeightsError, load_perceptual

        m = self.cfg.models

        def load() -> nn.Module:
            try:
                return load_perceptual(m.vgg16 or None, m.lpips_lin or None).to(self.device())
            except WeightsError as exc:
                raise AppError(str(exc)) from None

        return self._cache.get(("perceptual", m.vgg16, m.lpips_lin), load)

    def sfa_prior(self):
        """The SD 1.5-family prior for Style Fusion Attention (VAE posterior mean: a run is a function of its seeds),
        with the depth ControlNet when one is configured."""
        from headstyle.priors.diffusers_prior import PriorLoadError
        from headstyle.priors.loading import PriorSpec, load_prior

        m = self.cfg.models
        if not m.prior:
            raise AppError("no SD model: set models.prior in the app config")
        nets = {"depth": m.depth_controlnet} if m.depth_controlnet else {}
        spec = PriorSpec(m.prior, m.vae, nets, latent_sample="mean")

        def load():
            try:
                return load_prior(spec, self.device())
            except PriorLoadError as exc:
                raise AppError(str(exc)) from None

        return self._cache.get(("sd", m.prior, m.vae, m.depth_controlnet), load)

    def sfa_parts(self, prior) -> tuple[Any, nn.Module | None, nn.Module | None]:
        """The configured Style Appearance Module's (prior, content UNet, style UNet) for ``prior`` (None: its
        own UNet)."""
        return _style_module(self._cache, self.cfg.models.style_module, prior)


class Lab:
    """The synthetic head world: a base generator without weights to load, the ground-truth styles, styles
    trained here on the lab prior, and (once it ships) the learned lab prior for Style Fusion Attention."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg = cfg
        self.settings: LabSection = cfg.lab
        self.styles_dir = Path(cfg.server.workdir) / "lab" / "styles"
        self._cache = _Cache()

    @property
    def render(self) -> RenderSection:
        """The app's render settings at the lab's sizes (its generator renders 64 px images quickly)."""
        lab = self.settings
        return replace(self.cfg.render, turntable_frames=lab.turntable_frames, mesh_resolution=lab.mesh_resolution,
                       raw=False, neural_rendering_resolution=0, depth_samples=0)  # fmt: skip

    def styles(self) -> dict[str, str]:
        """Trained lab styles (name -> generator.safetensors), then each ground-truth style (name -> "")."""
        from headstyle.lab.world.heads import STYLES

        return {**trained_styles(self.styles_dir), **{f"{s}{GROUND_TRUTH}": "" for s in STYLES}}

    def new_generator(self, seed: int = 0, style: str | None = None, residual: bool = True) -> LabGenerator:
        from headstyle.lab.world.generator import LabGenerator

        lab = self.settings
        return LabGenerator(resolution=lab.resolution, sr_factor=lab.sr_factor, seed=seed, style=style,
                            residual=residual).eval()  # fmt: skip

    def base(self) -> Generator:
        return self._cache.get(("base",), self.new_generator)

    def stylised(self, name: str) -> Generator:
        """A ground-truth style (the world's own stylised heads) or a style trained here."""
        styles = self.styles()
        if name not in styles:
            raise AppError(f"no lab style named {name!r}; choose one of: {', '.join(styles)}")
        if not styles[name]:
            style = name.removesuffix(GROUND_TRUTH)
            return self._cache.get(("truth", style), lambda: self.new_generator(style=style, residual=False))
        return self._cache.get(("trained", styles[name], _stamp(styles[name])), lambda: self._trained(styles[name]))

    def _trained(self, path: str) -> LabGenerator:
        from safetensors.torch import load_file

        G = self.new_generator()
        try:
            G.load_state_dict(load_file(path))
        except (RuntimeError, OSError) as exc:
            raise AppError(f"{path} is not a lab generator of this size ({type(exc).__name__}); the lab settings "
                           "changed since it was trained") from None  # fmt: skip
        return G

    def sfa_reason(self) -> str | None:
        """None when the learned lab prior (an SD-shaped diffusers model) is there for Style Fusion Attention."""
        from headstyle.lab.prior.learned import SHIPPED

        if (SHIPPED / "model_index.json").is_file():
            return None
        return (f"the learned lab prior is not there yet ({SHIPPED}); `headstyle lab train-prior` trains it, "
                "and the lab's Style image runs on it")  # fmt: skip

    def sfa_prior(self):
        """The learned lab prior for Style Fusion Attention (fp32 on the CPU, VAE posterior means), with its depth
        ControlNet when it has one."""
        from headstyle.lab.prior.learned import CONTROLNETS, SHIPPED, learned_spec
        from headstyle.priors.loading import load_prior

        reason = self.sfa_reason()
        if reason:
            raise AppError(reason)
        nets = ("depth",) if (SHIPPED / CONTROLNETS["depth"]).is_dir() else ()
        spec = learned_spec(SHIPPED, controlnets=nets, latent_sample="mean")
        return self._cache.get(("sd",), lambda: load_prior(spec, "cpu"))

    def sfa_parts(self, prior) -> tuple[Any, nn.Module | None, nn.Module | None]:
        """lab.style_module's (prior, content UNet, style UNet) for the learned lab prior (None: its own UNet)."""
        return _style_module(self._cache, self.settings.style_module, prior)

