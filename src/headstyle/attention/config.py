"""Settings of Style Fusion Attention and of style-views, kept apart from the processors (no diffusers
import), so configs can validate them before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from headstyle.priors.defaults import DEFAULT_CONTROLNETS, DEFAULT_MODEL
from headstyle.settings import (
    MAX_DDIM_STEPS,
    MAX_IDENTITIES,
    MAX_TRUNCATION_CUTOFF,
    MAX_VIEWS,
    TRUNCATION_PSI,
    check_fields,
    param,
    seed_problem,
)

Pairing = Literal["paper", "matched"]
PAIRINGS: tuple[str, ...] = ("paper", "matched")
LayerSet = Literal["all", "decoder"]
LAYER_SETS: tuple[str, ...] = ("all", "decoder")
REFERENCE_MODES: tuple[str, ...] = ("noised", "clean")
# The appearance modules' two reference views of a head, front and back (radians, pitch 0): DiffStyle360 feeds
# I_content / I_content_back and I_style / I_style_back (Sec. 3.2), in training and at inference.
REFERENCE_YAWS = (0.0, math.pi)
ContentReference = Literal["front_back", "view"]
CONTENT_REFERENCES: tuple[str, ...] = ("front_back", "view")


@dataclass
class StyleFusionConfig:
    """Settings of Style Fusion Attention (DiffStyle360 defaults).

    tau: style key scaling (1.05; larger = stronger style, less identity). alpha: blend of two styles.
    pairing: "paper" (K_hat with V_s, tau K_s with V_c, as Sec. 3.5 writes) or "matched".
    layers: "all" self-attention layers or the "decoder" only. reference: the appearance module
    sees the reference latent "noised" to the current timestep or "clean".
    reference_prompt: the text conditioning of the write passes.
    """

    tau: float = 1.05
    alpha: float = 0.5
    pairing: Pairing = "paper"
    layers: LayerSet = "all"
    reference: Literal["noised", "clean"] = "noised"
    reference_prompt: str = ""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("pairing", self.pairing, PAIRINGS),
            ("layers", self.layers, LAYER_SETS),
            ("reference", self.reference, REFERENCE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")


@dataclass
class SamplingConfig:
    """img2img settings: strength (fraction of the DDIM schedule re-noised), steps (full-schedule DDIM
    steps; strength * steps are run), guidance_scale (CFG w), an optional text prompt, the depth
    ControlNet's scale and the seed of all noise."""

    strength: float = 0.6
    # past the schedule's 1000 timesteps the DDIM scheduler fails with a traceback
    steps: int = param(30, low=1, budget=MAX_DDIM_STEPS)
    guidance_scale: float = 3.0
    prompt: str = ""
    negative_prompt: str = ""
    control_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {self.strength}")
        check_fields(self)
        if self.steps < 1 or int(self.steps * self.strength) < 1:
            raise ValueError(f"steps * strength must be at least 1 denoising step, got {self.steps} * {self.strength}")
        if not (math.isfinite(self.guidance_scale) and math.isfinite(self.control_scale)):
            raise ValueError("guidance_scale and control_scale must be finite")
        if problem := seed_problem("seed", self.seed):
            raise ValueError(problem)


@dataclass
class ViewsConfig:
    """Which heads and views: latent seeds (truncated with psi / cutoff), yaws and pitch in DEGREES (yaw 0 =
    front), the output folder, the turntable's fps, and render_sr: stylise the super-resolved image (True)
    or the raw neural render, upsampled. content: the content bank of every view is written from the head's
    "front_back" renders (REFERENCE_YAWS; the paper's pairing, what a trained Style Appearance Module saw) or
    from the "view" being stylised."""

    seeds: tuple[int, ...] = (0,)
    yaws: tuple[float, ...] = (-90.0, -45.0, 0.0, 45.0, 90.0, 180.0)
    pitch: float = 0.0
    truncation_psi: float = param(0.7, budget=TRUNCATION_PSI)
    truncation_cutoff: int = param(14, low=0, budget=MAX_TRUNCATION_CUTOFF)
    out: str = ""
    fps: float = 4.0
    render_sr: bool = True
    content: ContentReference = "front_back"

    def __post_init__(self) -> None:
        if self.content not in CONTENT_REFERENCES:
            raise ValueError(f"content must be one of {CONTENT_REFERENCES}, got {self.content!r}")
        if not self.seeds or any(not 0 <= s < 2**32 for s in self.seeds):
            raise ValueError(f"seeds must be integers in [0, 2**32), got {list(self.seeds)}")
        angles = (*self.yaws, self.pitch)
        if not self.yaws or not all(math.isfinite(a) and abs(a) <= 360 for a in angles):
            raise ValueError(f"yaws and pitch are degrees within [-360, 360], got {list(self.yaws)}, {self.pitch}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be positive, got {self.fps}")
        if len(self.seeds) > MAX_IDENTITIES.high or len(self.yaws) > MAX_VIEWS.high:
            raise ValueError(f"at most {MAX_IDENTITIES.high} seeds ({MAX_IDENTITIES.why}) and {MAX_VIEWS.high} yaws "
                             f"({MAX_VIEWS.why}), got {len(self.seeds)} and {len(self.yaws)}")
        check_fields(self)


@dataclass
class ViewsModelConfig:
    """Where the generator and the SD 1.5-family model come from (paths or hub ids).

    generator_config: the base config of a bare .pth ("" = released PanoHead). vae: "" (the model's own
    vae/, the default), "auto" (the model folder's vae/ when it has one, else sd-vae-ft-mse) or a path.
    controlnet_depth: "" = none. device: "" = cuda when available, else cpu.
    neural_rendering_resolution / depth_samples: 0 = the generator's own. style_module: a trained Style
    Appearance Module folder (`headstyle sfa train`'s module/; "" = the model's own UNet writes both banks).
    """

    generator: str = ""
    generator_config: str = ""
    prior: str = DEFAULT_MODEL
    vae: str = ""
    controlnet_depth: str = DEFAULT_CONTROLNETS["depth"]
    device: str = ""
    neural_rendering_resolution: int = 0
    depth_samples: int = 0
    style_module: str = ""


@dataclass
class StyleImagesConfig:
    """The style reference image, optionally its back view (``image_back``: the style bank then holds front and
    back, as DiffStyle360's I_style / I_style_back), an optional second style (blended with fusion.alpha) and
    an optional mask (white = stylise there, black = keep the content), painted (``mask``) or parsed:
    ``parser``, a face parser checkpoint (face-parsing.PyTorch's 79999_iter.pth), finds ``regions`` (e.g. hair,
    lips; see headstyle.faces.parser) in each content reference and in the style image(s)."""

    image: str = ""
    image_back: str = ""
    image_2: str = ""
    mask: str = ""
    parser: str = ""
    regions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.parser) != bool(self.regions):
            raise ValueError("a face parser needs the regions to stylise and regions need the parser: give both "
                             "style.parser and style.regions (--mask-parser and --mask-regions)")  # fmt: skip
        if self.parser and self.mask:
            raise ValueError("give a painted mask or a face parser, not both")
        if self.image_back and self.image_2:
            raise ValueError("a style's back view (style.image_back) and a blended second style (style.image_2) "
                             "do not combine: the two styles' banks must hold the same views; drop one")  # fmt: skip


@dataclass
class StyleViewsConfig:
    """A `headstyle style-views` run: Style Fusion Attention img2img of rendered views (typed, TOML + --set)."""

    model: ViewsModelConfig = field(default_factory=ViewsModelConfig)
    style: StyleImagesConfig = field(default_factory=StyleImagesConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    fusion: StyleFusionConfig = field(default_factory=StyleFusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
