"""Presets for the LD paper's six styles: the prompts and settings a user starts a run from.

The paper does not print its prompts; its training command (the script's README) passes "Portrait of a
werewolf" (train_LD.py's own --prompt default is empty), and the other five follow that form. Everything
else is the script's defaults (config.py; README, "Fidelity to the LD scripts") with 10,000 iterations and a
checkpoint every 250.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from headstyle.stylize.config import (
    ConfigError,
    StylizeConfig,
    apply_overrides,
    load_config,
    load_saved_config,
    resume_differences,
)
from headstyle.training.checkpointing import resolve_checkpoint, run_folder

PROMPTS: dict[str, str] = {
    "pixar": "Portrait of a Pixar character",
    "joker": "Portrait of the Joker",
    "zombie": "Portrait of a zombie",
    "statue": "Portrait of a marble statue",
    "werewolf": "Portrait of a werewolf",
    "sketch": "Portrait of a pencil sketch",
}


def preset_names() -> list[str]:
    return sorted(PROMPTS)


def preset(name: str, base: StylizeConfig | None = None) -> StylizeConfig:
    """The config for a named style on top of ``base`` (defaults if None)."""
    key = name.strip().lower()
    if key not in PROMPTS:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    cfg = base if base is not None else StylizeConfig()
    return dataclasses.replace(
        cfg,
        prompt=dataclasses.replace(cfg.prompt, prompt=PROMPTS[key], negative_prompt="", guidance_scale=7.5),
        run=dataclasses.replace(cfg.run, iterations=10_000, checkpoint_every=250, out=f"runs/{key}"),
    )


def resolve_config(
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: list[str] | None = None,
) -> StylizeConfig:
    """The run's config: defaults, or the resumed checkpoint's config; then a preset, a file, overrides.

    Later sources win. A resumed run keeps writing into the checkpoint's run folder unless run.out
    is overridden, and may change only how long it runs and what it writes (config.RESUMABLE): any
    other difference from the checkpoint's config is a ConfigError naming it. A new run without an
    output folder gets a fresh one, runs/stylize-<date>-<time>.
    """
    cfg = saved = StylizeConfig()
    if resume is not None:
        ckpt_dir = resolve_checkpoint(resume)
        saved = load_saved_config(ckpt_dir / "config.toml")
        cfg = dataclasses.replace(saved, run=dataclasses.replace(saved.run, out=str(run_folder(ckpt_dir))))
    if preset_name:
        try:
            cfg = preset(preset_name, cfg)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
    if config_file is not None:
        cfg = load_config(config_file, cfg)
    cfg = apply_overrides(cfg, overrides or [])
    if resume is not None:
        changed = resume_differences(saved, cfg)
        if changed:
            raise ConfigError(
                f"--resume would change settings that define the run ({'; '.join(changed)}): keep the checkpoint's "
                "values (only run.iterations, run.out and what the run writes may change) or start a new run"
            )
    elif not cfg.run.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=f"runs/stylize-{stamp}"))
    return cfg
