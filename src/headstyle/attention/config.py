"""Settings of Style Fusion Attention and of style-views, kept apart from the processors (no diffusers
import), so configs can validate them before any model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Pairing = Literal["paper", "matched"]
PAIRINGS: tuple[str, ...] = ("paper", "matched")
LayerSet = Literal["all", "decoder"]
LAYER_SETS: tuple[str, ...] = ("all", "decoder")
REFERENCE_MODES: tuple[str, ...] = ("noised", "clean")


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
class StyleViewsConfig:
    """img2img settings: strength (fraction of the DDIM schedule re-noised), steps (full-schedule DDIM
    steps; strength * steps are run), guidance_scale (CFG w), an optional text prompt, the depth
    ControlNet's scale, the seed of all noise, the view pitch (radians), the turntable's fps, and
    render_sr: stylise the super-resolved image (True) or the raw neural render, upsampled."""

    fusion: StyleFusionConfig = field(default_factory=StyleFusionConfig)
    strength: float = 0.6
    steps: int = 30
    guidance_scale: float = 3.0
    prompt: str = ""
    negative_prompt: str = ""
    control_scale: float = 1.0
    seed: int = 0
    pitch: float = 0.0
    fps: float = 4.0
    render_sr: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {self.strength}")
        if self.steps < 1 or int(self.steps * self.strength) < 1:
            raise ValueError(f"steps * strength must be at least 1 denoising step, got {self.steps} * {self.strength}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
