"""Typed configuration of a stylisation run, saved as TOML/JSON beside every run and checkpoint.

Defaults follow the LD paper's training script (train_LD.py); see
../shared/reference/likelihood-distillation.md. Every switch of an ablation is a field, and
``apply_overrides`` turns ``section.field=value`` strings (CLI flags) into a new config.

A field's range, choices and unit sit in its declaration (``settings.param``); every angle is in
degrees, as the CLI's flags, and a saved TOML config prints each field's unit beside it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from headstyle import cameras, settings
from headstyle.attention.config import StyleFusionConfig
from headstyle.distill.objectives import OBJECTIVES, LDParams, ObjectiveParams, SDSParams
from headstyle.io import atomic_write_text
from headstyle.priors.defaults import DEFAULT_CONTROLNETS, DEFAULT_MODEL
from headstyle.settings import (
    MAX_DDIM_STEPS,
    MAX_ITERATIONS,
    MAX_TRUNCATION_CUTOFF,
    MAX_TURNTABLE_FRAMES,
    MAX_VIEWS,
    SEED_END,
    TRUNCATION_PSI,
    ConfigError,
    param,
)


@dataclass
class ModelConfig:
    """Where the generator and the prior come from. Empty strings mean "not used"."""

    generator: str = ""
    # An SD 1.5-family diffusers folder or hub id (code using other priors passes them to Stylizer).
    prior: str = DEFAULT_MODEL
    # "" = the model's own vae/, as the scripts (pipe.vae); "auto" = the model folder's own vae/ when it has one,
    # else sd-vae-ft-mse; or a VAE folder or hub id.
    vae: str = ""
    canny_controlnet: str = DEFAULT_CONTROLNETS["canny"]  # "" = no ControlNet on the single view
    depth_controlnet: str = DEFAULT_CONTROLNETS["depth"]  # "" = no ControlNet on the grid
    # A local Depth Anything folder (transformers) for the grid's depth control, as the script's Depth Anything V2
    # ViT-B; "" uses the frozen generator's rendered depth (the run prints that it deviates from the script).
    depth_estimator: str = ""
    # Renders are resized to this size before prior.encode; 0 = the prior's own (SD 1.5: 512).
    prior_image_size: int = 0
    # The script renders without PanoHead's background network (synthesis(..., generate_background=False));
    # passed to generators whose synthesis takes that argument.
    background: bool = False
    # Weights dtype of the prior's UNet/ControlNets/text encoder and of its VAE on a GPU (the script: fp16 for
    # all); on CPU both run in fp32.
    prior_dtype: str = param("fp16", choices=("fp32", "fp16", "bf16"))
    vae_dtype: str = param("fp16", choices=("fp32", "fp16", "bf16"))


@dataclass
class PromptConfig:
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float = param(7.5, low=0.0, high=100.0, unit="omega, diffusers CFG form")
    # What the frozen renders show: DDS and IDS use it as the source prompt y_src.
    source_prompt: str = "a photo of a face"


@dataclass
class CameraConfig:
    """Where every camera of a run looks: the single view and its mirror, the grid, the mapping's conditioning
    camera, the stopping rule's probes, previews and turntables. The LD scripts look at (0, 0, 0)
    (cameras.LD_PIVOT); (0, 0, 0.2) is PanoHead's avg_camera_pivot (cameras.PIVOT, the lab's cameras)."""

    pivot: tuple[float, ...] = param(cameras.LD_PIVOT, unit="look-at point (x, y, z), world units")

    def __post_init__(self) -> None:
        if len(self.pivot) != 3 or not all(abs(v) <= 1 for v in self.pivot):  # written so that NaN is refused
            raise ValueError(f"pivot must be 3 numbers within [-1, 1] (x, y, z), got {list(self.pivot)}")


@dataclass
class LatentConfig:
    """z ~ N(0, I) -> ws through the frozen mapping, conditioned on a fixed camera."""

    truncation_psi: float = param(0.75, budget=TRUNCATION_PSI)
    truncation_cutoff: int = param(14, low=0, budget=MAX_TRUNCATION_CUTOFF)
    cond_yaw: float = param(0.0, low=-180.0, high=180.0, unit="degrees, 0 = front")
    cond_pitch: float = param(math.degrees(0.2), low=-90.0, high=90.0, unit="degrees")  # the script's 0.2 rad


@dataclass
class ObjectiveConfig:
    """Which distillation gradient and at which timesteps.

    ``params`` holds the chosen objective's own hyper-parameters (distill/objectives.py: LDParams,
    SDSParams, NFSDParams, DDSParams, IDSParams). In files and overrides they are fields of the
    objective section beside the shared ones (``objective.weighting``), read after ``name``.
    """

    name: str = "ld"  # ld | sds | nfsd | dds | ids (distill/objectives.py)
    params: ObjectiveParams = field(default_factory=LDParams)
    num_inference_steps: int = param(50, at_least=1, budget=MAX_DDIM_STEPS)
    min_step_index: int = 35
    max_step_index: int = 49
    # random: fresh eps; fixed: one eps per batch slot and rank; mv_nrs: multi-view noise resampling
    # on the grid (anchor noise warped cell to cell with the frozen depth, resampled candidate and
    # anchor in the same prior call, the better-aligned gradient kept per cell).
    noise: str = param("random", choices=("random", "fixed", "mv_nrs"))
    mv_nrs_sigma: float = param(0.5, low=0.0, high=1.0)


@dataclass
class ShapingConfig:
    """Post-processing of every latent gradient, as the script does it."""

    use_mask: bool = True
    scale: float = param(1000.0, positive=True, unit="divisor of every latent gradient")  # grad /= scale
    clamp: float = param(1.0, low=0.0)  # grad = clamp(grad, -clamp, clamp)


@dataclass
class SingleViewConfig:
    """The 512 px single view with canny control, rank re-weighting and mirror injection."""

    enabled: bool = True
    weight: float = param(1.0, low=0.0)
    yaw_range: float = param(60.0, low=0.0, high=180.0, unit="degrees, +- around the front")
    pitch_range: float = param(30.0, low=0.0, high=90.0, unit="degrees, +-")
    canny_low: float = 50.0
    canny_high: float = 250.0
    control_scale: float = 1.0
    rank_weights: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # () disables rank re-weighting
    restandardize: bool = True
    mirror: bool = True
    base_weight: float = param(0.75, low=0.0)
    mirror_weight: float = param(0.25, low=0.0)


@dataclass
class GridConfig:
    """2x2 grid of raw (pre-SR) renders from 360-degree cameras with depth control."""

    enabled: bool = True
    weight: float = param(1.0, low=0.0)
    pitch_range: float = param(30.0, low=0.0, high=90.0, unit="degrees, +-")
    control_scale: float = 1.0


@dataclass
class RegulariserConfig:
    relative_distance: float = param(1.0, low=0.0)
    # The script's 0.1 * MSE(Tweedie target x0_hat of the single view, render); 0 turns it off.
    tweedie_mse: float = param(0.1, low=0.0)
    # The script's 0.05 * LPIPS-alex(Tweedie target, render), from local weights: lpips_alexnet (a torchvision
    # AlexNet state dict), else torchvision's file in the torch hub cache; lpips_linear (the lpips package's
    # weights/v0.1/alex.pth), else the installed lpips package's own (.pth or .safetensors). Without them the
    # run prints that it deviates from the script and trains without the term.
    lpips: float = param(0.05, low=0.0)
    lpips_alexnet: str = ""
    lpips_linear: str = ""


@dataclass
class OptimConfig:
    """The optimiser of the trainable weights, and an optional stopping rule.

    name: "adam" (the paper's; lr, beta1, beta2) or "sgd" (with ``momentum``: the step is lr times the
    velocity, so it shrinks with the gradient). sgd_step > 0 sets SGD's lr at the first step with a
    non-zero gradient g1 so that the steady step of a constant g1, lr * g1 / (1 - momentum), has RMS
    sgd_step over the weights (Adam's steady step is about lr per weight); the lr then stays
    (checkpointed in the optimizer's param group).
    stop_rule "classifier" (the default; stylize/stopping.py): every stop_every iterations the diffusion
    classifier margin of the current renders (Stylizer.classifier_margin: eps error under the source
    prompt vs the style prompt on stop_probes fixed single views) is measured; once it exceeds
    stop_margin the run ends ("stop") or its learning rate is multiplied by stop_decay once ("decay").
    In the lab LD peaks where the 8-probe margin crosses 0 and runs away after it (README; 4 probes
    crossed about 600 iterations late at lr 1e-4); "none" trains run.iterations as the paper's script
    does. Every run logs the margin at its checkpoints (signals.csv).
    """

    lr: float = param(1e-4, positive=True, unit="learning rate (Adam; SGD: step = lr * velocity)")
    beta1: float = param(0.9, low=0.0, high=0.999999)
    beta2: float = param(0.999, low=0.0, high=0.999999)
    train_modules: tuple[str, ...] = ("backbone.synthesis", "superresolution")
    train_biases: bool = False
    name: str = param("adam", choices=("adam", "sgd"))
    momentum: float = param(0.9, low=0.0, high=0.999999)
    sgd_step: float = param(0.0, low=0.0)
    stop_rule: str = param("classifier", choices=("none", "classifier"))
    stop_margin: float = param(
        0.0, low=-1.0, high=1.0, unit="(E_source - E_style) / (E_source + E_style) of eps errors, in [-1, 1]"
    )
    stop_every: int = param(10, at_least=1)
    stop_action: str = param("stop", choices=("stop", "decay"))
    stop_decay: float = param(0.1, low=0.0, high=1.0)
    stop_probes: int = param(8, at_least=1)


@dataclass
class RunConfig:
    out: str = ""  # "" = a fresh folder runs/stylize-<date>-<time> (presets: runs/<preset>)
    iterations: int = param(10_000, at_least=1, budget=MAX_ITERATIONS)
    # identities per process per iteration; each one holds a full render and its gradients in memory
    batch_size: int = param(1, at_least=1, high=64, why="identities per iteration, each a full render in memory")
    # numpy's SeedSequence (each process's seed) refuses a negative one
    seed: int = param(0, low=0, high=SEED_END - 1)
    checkpoint_every: int = param(250, at_least=1)
    keep_last: int = param(3, at_least=1)
    sample_every: int = 250
    sample_identities: int = param(4, low=0, high=64, why="each is rendered at every sample yaw per preview")
    sample_yaws: tuple[float, ...] = param((-90.0, -30.0, 0.0, 30.0, 90.0), unit="degrees, 0 = front")
    sample_pitch: float = param(10.0, low=-90.0, high=90.0, unit="degrees")
    turntable_identities: int = param(2, low=0, high=64, why="each is a turntable of every frame per preview")
    # Previews and turntables through the super-resolution (slow on CPU); false shows the raw renders.
    preview_sr: bool = True
    turntable_frames: int = param(36, low=0, budget=MAX_TURNTABLE_FRAMES)
    mixed_precision: str = param("no", choices=("no", "fp16", "bf16"))
    max_nonfinite_in_row: int = param(10, at_least=1)
    log_every: int = 1
    device: str = ""  # "" = accelerate's choice; "cpu" forces CPU


@dataclass
class StyleImageConfig:
    """A style IMAGE as the distillation target: DiffStyle360's Style Fusion Attention on the prior's UNet.

    image = "" distils the text prompt alone (the LD paper). An image needs SDS with a w(t) weighting
    (eps_cfg - eps keeps eps_uncond, through which the style acts). Every sample's content
    reference is the frozen generator's render of the same view, so the target keeps the identity;
    image_2 blends a second style with alpha. tau, pairing, layers, reference: attention/prior.py.
    """

    image: str = ""
    image_2: str = ""
    alpha: float = 0.5
    tau: float = 1.05
    pairing: str = "paper"
    layers: str = "all"
    reference: str = "noised"


@dataclass
class StylizeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    single: SingleViewConfig = field(default_factory=SingleViewConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    regularisers: RegulariserConfig = field(default_factory=RegulariserConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    style: StyleImageConfig = field(default_factory=StyleImageConfig)


def conditioning_camera(cfg: StylizeConfig) -> Tensor:
    """The (1, 25) camera label the frozen mapping is conditioned on (latent.cond_yaw / cond_pitch, degrees), looking
    at cameras.pivot."""
    return view_cameras(cfg, math.radians(cfg.latent.cond_yaw), math.radians(cfg.latent.cond_pitch))


def view_cameras(cfg: StylizeConfig, yaw: Tensor | float, pitch: Tensor | float) -> Tensor:
    """(N, 25) labels of the run's cameras at ``yaw`` / ``pitch`` (radians), looking at cameras.pivot."""
    return cameras.cameras(yaw, pitch, lookat=cfg.cameras.pivot)


def to_dict(cfg: StylizeConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples become lists) for TOML/JSON; the objective's params sit in its section."""
    out: dict[str, dict[str, Any]] = {}
    for section in dataclasses.fields(cfg):
        out[section.name] = settings.plain(getattr(cfg, section.name))
    objective = {k: v for k, v in out["objective"].items() if k != "params"}
    out["objective"] = {"name": objective.pop("name"), **settings.plain(cfg.objective.params), **objective}
    return out


def _objective_section(values: Mapping[str, Any], current: ObjectiveConfig) -> ObjectiveConfig:
    """The objective section: shared fields, then the chosen objective's own ones (a new name starts from
    that objective's defaults)."""
    name = settings.coerce(values.get("name", current.name), str, "objective.name")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name = {name!r} is not one of {', '.join(OBJECTIVES)}")
    params_type = OBJECTIVES[name].params
    params = current.params if name == current.name else params_type()
    shared = {k: v for k, v in typing.get_type_hints(ObjectiveConfig).items() if k not in ("name", "params")}
    own = typing.get_type_hints(params_type)
    changes: dict[str, Any] = {}
    own_changes: dict[str, Any] = {}
    for key, value in values.items():
        if key == "name":
            continue
        if key in shared:
            changes[key] = settings.coerce(value, shared[key], f"objective.{key}")
        elif key in own:
            own_changes[key] = settings.coerce(value, own[key], f"objective.{key}")
        else:
            known = ", ".join(["name", *own, *shared])
            raise ConfigError(f"unknown config field objective.{key} for objective {name}; known: {known}")
    try:
        params = dataclasses.replace(params, **own_changes)
    except ValueError as exc:
        raise ConfigError(f"objective ({name}): {exc}") from None
    return dataclasses.replace(current, name=name, params=params, **changes)


def _field_type(cfg: StylizeConfig, data: Mapping[str, Mapping[str, Any]], section: str, name: str) -> Any:
    """The type of section.name; in the objective section, the fields of the objective named so far."""
    hint = settings.field_type(cfg, data, section, name)
    objective = data.get("objective", {}).get("name", cfg.objective.name)
    if hint is None and section == "objective" and objective in OBJECTIVES:
        hint = typing.get_type_hints(OBJECTIVES[objective].params).get(name)
    return hint


def from_dict(data: Mapping[str, Any], base: StylizeConfig | None = None) -> StylizeConfig:
    """Build a config from a (possibly partial) nested dict on top of ``base`` (defaults if None)."""
    cfg = settings.from_dict(base if base is not None else StylizeConfig(), data, {"objective": _objective_section})
    validate(cfg)
    return cfg


def validate(cfg: StylizeConfig) -> None:
    """Raise ConfigError for values that are well-typed but meaningless: first a field outside its declared range or
    choices (its ``param``), then settings that do not fit together."""
    settings.check_sections(cfg)
    o = cfg.objective
    if not 0 <= o.min_step_index <= o.max_step_index < o.num_inference_steps:
        raise ConfigError(
            f"objective step indices must satisfy 0 <= min_step_index <= max_step_index < num_inference_steps, "
            f"got {o.min_step_index}, {o.max_step_index}, {o.num_inference_steps}"
        )
    if not (cfg.single.enabled or cfg.grid.enabled):
        raise ConfigError("single.enabled and grid.enabled are both false: nothing to distil; enable one of them")
    if cfg.single.mirror and cfg.cameras.pivot[0] != 0:
        raise ConfigError(
            f"cameras.pivot = {list(cfg.cameras.pivot)} lies off the plane x = 0 that single.mirror mirrors the "
            "camera in (x -> -x): set its x to 0 or single.mirror=false"
        )
    if cfg.style.image_2 and not cfg.style.image:
        raise ConfigError("style.image_2 is set without style.image: give the first style image too")
    s = cfg.style
    try:
        StyleFusionConfig(tau=s.tau, alpha=s.alpha, pairing=s.pairing, layers=s.layers, reference=s.reference)
    except ValueError as exc:
        raise ConfigError(f"style: {exc}") from None
    sds_weighting = o.params.weighting if isinstance(o.params, SDSParams) else None
    if cfg.style.image and sds_weighting in (None, "script"):
        # LD and the script's SDS keep only omega (eps_c - eps_u): the fused style shifts both and cancels.
        raise ConfigError(
            "style.image needs objective.name=sds with objective.weighting sds, uniform or fantasia3d "
            f"(got {o.name}{'/' + sds_weighting if sds_weighting else ''}): LD and the script's SDS use only "
            "eps_cond - eps_uncond, where the style image, fused into both predictions, cancels"
        )
    if not all(math.isfinite(y) and abs(y) <= 360 for y in cfg.run.sample_yaws):
        raise ConfigError(f"run.sample_yaws are degrees within [-360, 360], got {list(cfg.run.sample_yaws)}")
    if len(cfg.run.sample_yaws) > MAX_VIEWS.high:
        raise ConfigError(f"run.sample_yaws holds {len(cfg.run.sample_yaws)} yaws, more than {MAX_VIEWS.high}: "
                          f"{MAX_VIEWS.why}")
    if cfg.optim.sgd_step > 0 and cfg.optim.name != "sgd":
        raise ConfigError(f"optim.sgd_step sets SGD's learning rate: set optim.name=sgd (got {cfg.optim.name})")
    if not cfg.optim.train_modules:
        raise ConfigError("optim.train_modules is empty: name the modules to train, e.g. ['backbone.synthesis']")
    if len(cfg.single.rank_weights) > 0 and any(w < 0 for w in cfg.single.rank_weights):
        raise ConfigError(f"single.rank_weights must be >= 0, got {cfg.single.rank_weights}")


# Settings a resumed run may change: how long it runs and what it writes, not what it computes.
RESUMABLE = frozenset(
    f"run.{name}"
    for name in (
        "out", "iterations", "checkpoint_every", "keep_last", "sample_every", "sample_identities",
        "turntable_identities", "preview_sr", "turntable_frames", "max_nonfinite_in_row", "log_every",
    )
)  # fmt: skip


def resume_differences(saved: StylizeConfig, new: StylizeConfig) -> list[str]:
    """'section.field: old -> new' for every setting that differs and that a resumed run may not change."""
    a, b = ({f"{s}.{k}": v for s, vs in to_dict(c).items() for k, v in vs.items()} for c in (saved, new))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
            and k not in RESUMABLE]  # fmt: skip


def apply_overrides(cfg: StylizeConfig, overrides: list[str]) -> StylizeConfig:
    """Apply ``section.field=value`` overrides in order; a str field takes the raw text as is."""
    return from_dict(settings.overrides_dict(cfg, overrides, _field_type), cfg)


def dumps(cfg: StylizeConfig, fmt: str = "toml") -> str:
    """The config as JSON, or as TOML with each unit-bearing field's unit in a comment."""
    text = settings.dumps(to_dict(cfg), fmt)
    return text if fmt == "json" else settings.comment_units(text, settings.units(cfg))


def save_config(cfg: StylizeConfig, path: str | Path) -> None:
    """Save as TOML (.toml) or JSON (.json)."""
    path = Path(path)
    fmt = "json" if path.suffix == ".json" else "toml"
    atomic_write_text(path, dumps(cfg, fmt))


def load_config(path: str | Path, base: StylizeConfig | None = None) -> StylizeConfig:
    """Load a TOML or JSON config (partial files fill in from ``base`` or the defaults)."""
    return from_dict(settings.read_file(path), base)


def _earlier_runs(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What a run saved before cameras.pivot and model.vae_dtype existed did: PanoHead's pivot, and the VAE in fp32
    under fp16 weights (else in the weights' dtype)."""
    model = data.get("model")
    prior_dtype = model.get("prior_dtype", "fp16") if isinstance(model, dict) else "fp16"
    return {"cameras": {"pivot": list(cameras.PIVOT)},
            "model": {"vae_dtype": "fp32" if prior_dtype == "fp16" else prior_dtype}}  # fmt: skip


def load_saved_config(path: str | Path) -> StylizeConfig:
    """A run's saved config.toml; a field it lacks (saved before the field existed) reads as that run ran."""
    data = settings.read_file(path)
    for section, values in _earlier_runs(data).items():
        if isinstance(data.setdefault(section, {}), dict):
            data[section] = {**values, **data[section]}
    return from_dict(data)
