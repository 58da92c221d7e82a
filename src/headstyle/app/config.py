"""The web app's settings: which models it may use (a small TOML file) and how it renders.

    [models]                       # paths or hub ids; "" = not configured
    generator = "easy-khair-180-gpc0.8-trans10-025000.pkl"
    prior = "models/realistic-vision"
    depth_controlnet = "models/sd-controlnet-depth"
    vgg16 = "models/vgg16.pt"

    [styles]                       # stylised generators offered in the style lists: name = checkpoint
    werewolf = "models/werewolf.pth"

    [photo]
    steps = 500

Every field is typed, with its least value, range or choices in its declaration (headstyle.settings); a
model that is not configured or not on this machine greys out the tabs that need it, each with its reason
(``tab_reasons``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from headstyle import settings
from headstyle.settings import (
    MAX_IDENTITIES,
    MAX_ITERATIONS,
    MAX_TURNTABLE_FRAMES,
    MAX_VIEWS,
    MAX_W_AVG_SAMPLES,
    ConfigError,
    param,
)

TAB_TITLES = {"photo": "Photo", "generate": "Generate", "style_image": "Style image", "train": "Train a style"}


@dataclass
class ModelsSection:
    """Model paths or hub ids ("" = none). generator: the base PanoHead (.pkl, .pth, .safetensors or a
    folder); generator_config: the base config of a bare .pth; prior: an SD 1.5-family diffusers folder
    (Style image, Train a style); vae: "" (the model's own), "auto" or a path; vgg16 / lpips_lin: the
    projector's LPIPS-VGG16 (without them it uses a Laplacian-pyramid L1 and says so); lpips_alexnet /
    lpips_linear: stylize's Tweedie LPIPS (optional); style_module: a trained Style Appearance Module for
    Style image (`headstyle sfa train`'s module/ folder, trained for prior)."""

    generator: str = ""
    generator_config: str = ""
    prior: str = ""
    vae: str = ""
    canny_controlnet: str = ""
    depth_controlnet: str = ""
    vgg16: str = ""
    lpips_lin: str = ""
    lpips_alexnet: str = ""
    lpips_linear: str = ""
    style_module: str = ""


@dataclass
class PhotoSection:
    """The projector (PanoHead's defaults): steps, W+ or W, w_avg samples; raw: fit the raw neural render
    (fast, low resolution); seed."""

    steps: int = param(500, at_least=1, budget=MAX_ITERATIONS)
    space: str = param("w+", choices=("w", "w+"))
    w_avg_samples: int = param(10_000, at_least=1, budget=MAX_W_AVG_SAMPLES)
    raw: bool = False
    seed: int = 303

    def __post_init__(self) -> None:
        settings.check_fields(self)


@dataclass
class RenderSection:
    """How results are rendered: the paper's five views (yaws and pitch in degrees), the turntable, the mesh
    (lattice points per axis of PanoHead's cube; its face budget and baked texture size as `headstyle mesh
    --faces/--texture`, 0 = every face and vertex colours), raw (no super-resolution), and overrides of the generator's
    raw render size and samples per ray (0 = its own)."""

    yaws: tuple[float, ...] = (-90.0, -30.0, 0.0, 30.0, 90.0)
    pitch: float = 10.0
    turntable_frames: int = param(60, at_least=2, budget=MAX_TURNTABLE_FRAMES)
    fps: float = param(24.0, positive=True)
    mesh_resolution: int = param(256, low=8, high=1024)
    mesh_faces: int = param(0, at_least=0)
    mesh_texture: int = param(0, at_least=0)
    raw: bool = False
    neural_rendering_resolution: int = 0
    depth_samples: int = 0

    def __post_init__(self) -> None:
        if not self.yaws or any(abs(a) > 360 for a in (*self.yaws, self.pitch)):
            raise ValueError("yaws (at least one) and pitch are degrees within [-360, 360]")
        if len(self.yaws) > MAX_VIEWS.high:
            raise ValueError(f"yaws holds {len(self.yaws)} views, more than {MAX_VIEWS.high}: {MAX_VIEWS.why}")
        settings.check_fields(self)
        from headstyle.mesh.heads import texture_options_problem  # the meshing libraries load only here

        problem = texture_options_problem(("glb",), self.mesh_faces, self.mesh_texture, "render: mesh_")
        if problem is not None:
            raise ValueError(problem)


@dataclass
class LabSection:
    """The synthetic lab (no weights): its generator's size, the prior's exemplar identities and views,
    training iterations offered by default, how its results are rendered, and a Style Appearance Module
    trained for the learned lab prior (style_module, "" = none) for its Style image. prior: what lab styles
    train on: "" = the shipped learned lab prior, "exemplar" = the analytic exemplar prior, or an SD folder
    (headstyle.lab.prior.learned)."""

    # the lab world renders on a CPU: its raw size and upsampling stay small (the lab's own is 32 x 2)
    resolution: int = param(32, at_least=1, high=512, why="the lab renders on a CPU; its own size is 32")
    sr_factor: int = param(2, at_least=1, high=16, why="the lab's upsampling; its own is 2")
    prior_identities: int = param(6, at_least=1, budget=MAX_IDENTITIES)
    prior_views: int = param(24, at_least=1, budget=MAX_VIEWS)
    iterations: int = param(100, at_least=1, budget=MAX_ITERATIONS)
    lr: float = 0.002
    turntable_frames: int = param(36, at_least=2, budget=MAX_TURNTABLE_FRAMES)
    mesh_resolution: int = param(96, low=8, high=1024)
    style_module: str = ""
    prior: str = ""

    def __post_init__(self) -> None:
        settings.check_fields(self)


@dataclass
class ServerSection:
    """workdir: where jobs and trained styles are written; device: "" = cuda when available, else cpu;
    threads: torch CPU threads (0 = torch's default)."""

    workdir: str = "runs/app"
    device: str = ""
    threads: int = 0


def _styles_section(values: Mapping[str, Any], current: dict[str, str]) -> dict[str, str]:
    """[styles]: name = checkpoint path (a table of strings)."""
    styles = dict(current)
    for name, path in values.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"styles.{name}: expected a checkpoint path, got {path!r}")
        styles[name] = path
    return styles


@dataclass
class AppConfig:
    models: ModelsSection = field(default_factory=ModelsSection)
    styles: dict[str, str] = field(default_factory=dict)
    photo: PhotoSection = field(default_factory=PhotoSection)
    render: RenderSection = field(default_factory=RenderSection)
    lab: LabSection = field(default_factory=LabSection)
    server: ServerSection = field(default_factory=ServerSection)


def load_app_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Defaults, then the TOML/JSON file, then ``section.field=value`` overrides; ConfigError names the problem."""
    cfg = AppConfig()
    readers = {"styles": _styles_section}
    if path is not None:
        cfg = settings.from_dict(cfg, settings.read_file(path), readers)
    data = settings.overrides_dict(cfg, overrides or [])
    return settings.from_dict(cfg, data, readers)


def dumps(cfg: AppConfig) -> str:
    """The config as TOML (what --print-config shows)."""
    sections = {name: settings.plain(getattr(cfg, name)) for name in ("models", "photo", "render", "lab", "server")}
    return settings.dumps({**sections, "styles": dict(cfg.styles)})


def with_workdir(cfg: AppConfig, workdir: str) -> AppConfig:
    return replace(cfg, server=replace(cfg.server, workdir=workdir))


# ---------------------------------------------------------------------------------------------- availability


def model_missing(ref: str) -> str | None:
    """None when ``ref`` is a local file/folder or a hub id already in the local Hugging Face cache,
    else why it cannot be used (the app never downloads)."""
    path = Path(ref).expanduser()
    if path.exists():
        return None
    parts = ref.split("/")
    if len(parts) == 2 and all(parts) and not ref.startswith((".", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot_download(ref, local_files_only=True)
            return None
        except (LocalEntryNotFoundError, OSError, ValueError):
            return f"{ref} is neither a local path nor in the Hugging Face cache"
    return f"{ref} does not exist"


def _need(cfg: AppConfig, key: str, purpose: str) -> str | None:
    ref = getattr(cfg.models, key)
    if not ref:
        return f"set models.{key} ({purpose}) in the app config"
    problem = model_missing(ref)
    return f"models.{key}: {problem}" if problem else None


def tab_reasons(cfg: AppConfig, styles: Mapping[str, str]) -> dict[str, str | None]:
    """Per tab (photo, generate, style_image, train): None when it can run, else why not (one line naming the
    setting to fix).

    ``styles``: the stylised generators on offer (name -> path), configured and trained here.
    """
    generator = _need(cfg, "generator", "the base PanoHead generator")
    sd = _need(cfg, "prior", "an SD 1.5-family diffusers folder")
    no_style = None if styles else "no stylised generator yet: add one under [styles] or train one in 'Train a style'"
    broken = [f"styles.{name}: {problem}" for name, path in styles.items() if (problem := model_missing(path))]
    style_problem = no_style or (broken[0] if len(broken) == len(styles) else None)
    return {
        "photo": generator or style_problem,
        "generate": generator or style_problem,
        "style_image": generator or sd,
        "train": generator or sd,
    }
