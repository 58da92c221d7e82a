"""The typed config of a `headstyle sfa train` run (TOML + --set, saved beside the run and its checkpoints).

Sections: data (the paired dataset), model (the SD 1.5-family model the banks feed), train (the Style
Appearance Module's optimisation), fusion (Style Fusion Attention while training) and run (the folder and
its intervals). A field's least value, range or choices sit in its declaration (headstyle.settings.param).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from headstyle import settings
from headstyle.attention.config import StyleFusionConfig
from headstyle.priors.defaults import DEFAULT_MODEL
from headstyle.settings import MAX_ITERATIONS, MAX_VIEWS, param
from headstyle.sfa.module import MAX_LORA_RANK


@dataclass
class DataSection:
    """path: the dataset folder (`headstyle sfa dataset`); held_out_per_style: its last samples per style
    validate (other identities, never trained on)."""

    path: str = ""
    held_out_per_style: int = param(2, at_least=0)

    def __post_init__(self) -> None:
        settings.check_fields(self)


@dataclass
class ModelSection:
    """The SD 1.5-family model whose UNet the banks feed (paths or hub ids); controlnet_depth "" = none;
    vae as style-views ("" = its own, "auto" or a path); device "" = cuda when available."""

    prior: str = DEFAULT_MODEL
    vae: str = ""
    controlnet_depth: str = ""
    device: str = ""


@dataclass
class TrainSection:
    """role: "style" (a Style Appearance Module beside the frozen content module) or "shared" (one
    fine-tuned module for both banks). lora_rank: LoRA on the main UNet's attention trained with the
    module (0 = off, the main UNet stays frozen). AdamW lr / weight_decay, iterations, views per batch (at
    most the dataset's), the text prompt of the main UNet, the depth ControlNet's scale and the seed."""

    role: Literal["style", "shared"] = "style"
    lora_rank: int = param(0, low=0, high=MAX_LORA_RANK)
    iterations: int = param(800, at_least=0, budget=MAX_ITERATIONS)
    lr: float = param(1e-5, positive=True)
    weight_decay: float = 1e-2
    views: int = param(16, at_least=1, budget=MAX_VIEWS)
    prompt: str = ""
    control_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        settings.check_fields(self)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if problem := settings.seed_problem("seed", self.seed):
            raise ValueError(problem)


@dataclass
class RunSection:
    """out: the run folder; checkpoint, log and validation intervals (iterations); checkpoints kept."""

    out: str = ""
    checkpoint_every: int = param(100, at_least=1)
    keep_last: int = param(2, at_least=1)
    log_every: int = param(10, at_least=1)
    validate_every: int = param(100, at_least=1)

    def __post_init__(self) -> None:
        settings.check_fields(self)


def _training_fusion() -> StyleFusionConfig:
    # Key scaling is an inference-time knob (Sec. 3.5): the module learns at tau = 1.
    return StyleFusionConfig(tau=1.0)


@dataclass
class SFATrainConfig:
    """A `headstyle sfa train` run (typed, TOML + --set)."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    fusion: StyleFusionConfig = field(default_factory=_training_fusion)
    run: RunSection = field(default_factory=RunSection)


def dumps(cfg: SFATrainConfig) -> str:
    """The config as TOML (config.toml, --print-config)."""
    return settings.dumps({k: settings.plain(v) for k, v in vars(cfg).items()})
