"""The lab prior's recipe: its domains and prompts, its sizes and schedules (TrainPriorConfig, CONFIGS), its
random streams and its scheduler."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from headstyle.input_files import read_json_object
from headstyle.lab.world.heads import STYLES, style_prompt

# The prior's identities: a new seed, disjoint from HELD_OUT_SEED (checked) and the exemplar prior's.
IDENTITY_SEED = 3_000
TRUNCATION_PSI = 0.75  # as the lab trainer and evaluation map identities
DOMAINS: tuple[str | None, ...] = (None, *STYLES)


CONTROLNETS = ("depth", "canny")  # depth: on 2x2 grids (the grid branch); canny: on single views
# What a damaged run folder's refusal suggests.
RUN_HINT = "the run folder was changed by hand: start again in a new --out"
# A run's random streams: cfg.seed + the offset of each (the data's cameras, a model's initial weights, a stage's
# training draws, the VAE's latent-scale estimate); a ControlNet's init and training streams add its index.
STREAM_OFFSETS = {"cameras": 1, "init.text": 10, "init.vae": 11, "init.unet": 12, "init.controlnet": 13,
                  "train.vae": 21, "vae.scale": 22, "train.decoder": 23, "train.unet": 31, "train.controlnet": 41}
# Several phrasings per domain; the first is the lab's prompt (world.style_prompt).
PHRASINGS: dict[str | None, tuple[str, ...]] = {
    None: (style_prompt(None), "a head", "a photo of a person"),
    "statue": (style_prompt("statue"), "a statue", "a stone sculpture of a head"),
    "zombie": (style_prompt("zombie"), "a zombie head", "a photo of a zombie"),
    "toon": (style_prompt("toon"), "a cartoon head", "a toon character with big eyes"),
    "gold": (style_prompt("gold"), "a gold statue", "a head made of gold"),
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class TrainPriorConfig:
    """Sizes, steps and seeds of every stage (see CONFIGS)."""

    identities: int = 240
    views: int = 8
    resolution: int = 32  # raw renders; single views are x2 (64 px), grids 2x2 raw (64 px)
    seed: int = 0
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 1500  # decoder fine-tune, encoder frozen (as SD's ft-MSE VAE)
    decoder_lr: float = 1e-3
    text_width: int = 64
    text_layers: int = 2
    train_text: bool = False  # train the text encoder with the UNet (else it stays frozen at its random init)
    # The pooled prompt added to the timestep embedding (diffusers' addition_embed_type="text", as DeepFloyd IF's
    # UNet): every ResNet block then sees the prompt, not only the cross-attention layers.
    text_pool: bool = False
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_steps: int = 1800
    unet_horizon: int = 2400  # the cosine schedule's length; training stops at unet_steps (lr then 0.25 x peak)
    unet_batch: int = 16
    unet_lr: float = 1e-3
    prompt_dropout: float = 0.15
    grid_share: float = 0.5
    controlnet_channels: tuple[int, ...] = (16, 32, 32)
    controlnet_steps: int = 200
    controlnet_batch: int = 16
    controlnet_lr: float = 5e-4
    warmup: int = 100
    checkpoint_seconds: float = 180.0
    log_every: int = 10
    render_chunk: int = 64
    scale_samples: int = 512  # images whose latents set the VAE's scaling factor

    @classmethod
    def read(cls, out: Path) -> TrainPriorConfig:
        """The config a run saved in out/config.json (JSON lists back to tuples); ValueError in one line when that
        is not a JSON object of this config's fields."""
        values = read_json_object(out / "config.json", ValueError, RUN_HINT)
        if unknown := sorted(set(values) - {f.name for f in fields(cls)}):
            raise ValueError(f"{out / 'config.json'}: unknown field {unknown[0]!r}; {RUN_HINT}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


CONFIGS: dict[str, TrainPriorConfig] = {
    "full": TrainPriorConfig(),
    # The frozen random text encoder left "a zombie", "a golden sculpture of a head" and the unstyled prompt
    # nearly interchangeable for the UNet after 1800 steps: train it with the UNet, to the schedule's end.
    "full-text": TrainPriorConfig(train_text=True, unet_steps=2400),
    # Against full-text's unstyled-for-zombie confusion (classifier 0.82 of single views, 4 draws): the pooled
    # prompt in the timestep embedding of every ResNet block did not help (0.83 after 2400 steps, the same
    # confusion); 2.5x the UNet steps did (0.70 at step 2453, 0.975 at 3800, 0.988 at 6000). The shipped prior.
    "full-long": TrainPriorConfig(train_text=True, unet_steps=6000, unet_horizon=8000, controlnet_steps=400),
    "full-pooled": TrainPriorConfig(train_text=True, text_pool=True, unet_steps=2400),
    # Tests: a few steps of every stage on tiny models.
    "tiny": TrainPriorConfig(
        identities=2,
        views=4,
        resolution=16,
        vae_channels=(8, 8, 8),
        vae_steps=6,
        decoder_steps=4,
        vae_batch=4,
        text_width=16,
        text_layers=1,
        unet_channels=(8, 16, 16),
        unet_steps=6,
        unet_horizon=6,
        unet_batch=4,
        controlnet_channels=(8, 8, 8),
        controlnet_steps=4,
        controlnet_batch=4,
        warmup=2,
        log_every=2,
        render_chunk=16,
        scale_samples=16,
    ),
}


def stream(cfg: TrainPriorConfig, name: str) -> int:
    """The seed of the run's random stream ``name`` (STREAM_OFFSETS)."""
    return cfg.seed + STREAM_OFFSETS[name]


def domain_name(domain: str | None) -> str:
    return "unstyled" if domain is None else domain


def prompt_table() -> list[str]:
    """Every prompt the model is trained on: "" (the unconditional prompt) first, then each domain's phrasings."""
    return ["", *(p for d in DOMAINS for p in PHRASINGS[d])]
