"""The domain-adaptation trainer (`headstyle stylize`): config, presets, regularisers, checkpoints, the loop."""

from headstyle.stylize.config import (
    ConfigError,
    StylizeConfig,
    apply_overrides,
    load_config,
    save_config,
)
from headstyle.stylize.factory import build_from_config, run_stylize
from headstyle.stylize.presets import PROMPTS, preset, preset_names, resolve_config
from headstyle.stylize.regularisers import relative_distance
from headstyle.stylize.trainer import Stylizer, TrainResult

__all__ = [
    "PROMPTS",
    "ConfigError",
    "StylizeConfig",
    "Stylizer",
    "TrainResult",
    "apply_overrides",
    "build_from_config",
    "load_config",
    "preset",
    "preset_names",
    "relative_distance",
    "resolve_config",
    "run_stylize",
    "save_config",
]
