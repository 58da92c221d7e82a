"""DiffStyle360's reference distribution: SD img2img of the unedited views with the style prompt, cached.

For every unedited view x (resized to the prior's image size): z0 = E(x) (the VAE posterior mean),
noise to the 26th timestep of a 50-step DDIM schedule (index ``start`` = 25: t = 481 for SD 1.5's
leading spacing, i.e. strength 0.5), then the remaining 25 DDIM steps (eta 0, the scheduler's own
step) with classifier-free guidance omega = 7.5 on the style prompt, and decode. The result is the
"ground truth" set that DiffStyle360 compares stylised views with: FID against the set, CLIP
similarity against each view's own edit. Made by headstyle's DiffusersPrior (any SD 1.x-family model).

The images are cached under a key that is the sha256 of everything they depend on: the unedited
views' uint8 pixels, the settings and the model's fingerprint (hub id, or a local folder's file
names, sizes and small config files), so a second evaluation of the same base renders reads them
back instead of running the diffusion model (and does not load it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from headstyle.distill.objectives import guided_eps
from headstyle.distill.shaping import resize_to
from headstyle.export import save_image, to_uint8
from headstyle.input_files import InputError, read_image, read_json_object
from headstyle.io import atomic_dir
from headstyle.priors.base import NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.settings import MAX_DDIM_STEPS

CONFIG_SUFFIXES = (".json", ".txt", ".yaml", ".yml")
MANIFEST = "reference.json"


@dataclass(frozen=True)
class ReferenceSettings:
    """img2img of DiffStyle360's reference set: noise at step ``start`` of ``steps``, then the rest."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    start: int = 25
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_DDIM_STEPS.high:
            raise ValueError(f"reference steps must lie in [1, {MAX_DDIM_STEPS.high}] ({MAX_DDIM_STEPS.why}), "
                             f"got {self.steps}")
        if not 0 <= self.start < self.steps:
            raise ValueError(f"reference start step must lie in [0, {self.steps}), got {self.start}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"reference guidance must be a finite number, got {self.guidance_scale}")


def model_fingerprint(model: str | os.PathLike, vae: str | None) -> str:
    """A cheap identity of the diffusion model: hub ids as given; local folders by their files' names and
    sizes and the bytes of their small config files (not hashing gigabytes of weights)."""
    h = hashlib.sha256()
    for source in (os.fspath(model), vae or ""):
        path = Path(source)
        h.update(source.encode() + b"\0")
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                h.update(f"{f.relative_to(path).as_posix()}:{f.stat().st_size}".encode())
                if f.suffix in CONFIG_SUFFIXES:
                    h.update(f.read_bytes())
    return h.hexdigest()


def reference_key(images_u8: np.ndarray, settings: ReferenceSettings, fingerprint: str) -> str:
    h = hashlib.sha256(json.dumps({"settings": asdict(settings), "model": fingerprint}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(images_u8).tobytes())
    h.update(str(images_u8.shape).encode())
    return h.hexdigest()


@torch.no_grad()
def img2img(prior: DiffusersPrior, image: Tensor, settings: ReferenceSettings, generator: torch.Generator) -> Tensor:
    """One (1, 3, H, W) image in [-1, 1] -> its (1, 3, S, S) SD img2img edit (see the module docstring)."""
    prompt = prior.embed_prompts(settings.prompt, settings.negative_prompt)
    timesteps = prior.inference_timesteps(settings.steps)[settings.start :]
    x0 = prior.encode(resize_to(image, prior.image_size).to(prior.device))
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x = prior.add_noise(x0, eps, timesteps[:1])
    for t in timesteps:
        eps_u, eps_c = prior.predict_noise([NoiseQuery(x, t.reshape(1), prompt)])[0]
        x = prior.scheduler.step(guided_eps(eps_u, eps_c, settings.guidance_scale), t, x).prev_sample
    return prior.decode(x).cpu()


def _read_cached(folder: Path, key: str, count: int) -> Tensor | None:
    """The cached edits, or None when the folder holds no complete cache of ``key`` (a damaged one is rewritten)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        info = read_json_object(manifest, InputError)
        if info.get("key") != key or info.get("count") != count:
            return None
        arrays = [np.asarray(read_image(folder / f"ref_{i:04d}.png", InputError).convert("RGB")) for i in range(count)]
    except InputError:
        return None
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() - 128) / 127.5


def reference_set(
    images: Tensor,
    settings: ReferenceSettings,
    load_prior: Callable[[], DiffusersPrior],
    fingerprint: str,
    cache_dir: str | os.PathLike,
    advance: Callable[[], None] = lambda: None,
) -> tuple[Tensor, Path, bool]:
    """The reference edits of (N, 3, H, W) unedited images in [-1, 1]: (N, 3, S, S) images, their cache
    folder and whether they came from the cache. ``load_prior`` runs only on a cache miss."""
    u8 = to_uint8(images)
    key = reference_key(u8, settings, fingerprint)
    folder = Path(cache_dir) / key[:24]
    cached = _read_cached(folder, key, len(images))
    if cached is not None:
        return cached, folder, True
    prior = load_prior()
    generator = torch.Generator().manual_seed(settings.seed)
    with atomic_dir(folder) as tmp:  # a cache folder is complete or absent
        for i in range(len(images)):
            edit = img2img(prior, images[i : i + 1].float(), settings, generator)
            save_image(edit[0], tmp / f"ref_{i:04d}.png")
            advance()
        manifest = {"key": key, "count": len(images), "settings": asdict(settings), "model": fingerprint}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    # What a later run reads back: the PNGs' uint8 values.
    return _read_cached(folder, key, len(images)), folder, False
