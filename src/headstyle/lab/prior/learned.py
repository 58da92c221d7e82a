"""Which prior the lab's demo, bench and app run on, and the lab recipe's constants for it.

- the learned lab prior (the default): an SD 1.5-layout folder (``headstyle lab train-prior``)
  loaded through the production path, load_prior (``learned_spec``), with its depth ControlNet on
  the grid and its canny ControlNet on the single view. The shipped one lives in
  headstyle/lab/learned_prior/; ``--prior PATH`` takes any such folder;
- ``exemplar``: the analytic exemplar prior of headstyle.lab.prior.exemplar (the closed-form test bed).

``LabPriorSpec`` is resolved from the option text with cheap checks only (folders exist), so bad
input fails before any model loads; ``load`` builds the prior and its ``PriorProfile``: the image
size the recipe renders for and LD's gradient shaping for that prior's latents.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from headstyle.priors.base import ScorePrior
from headstyle.priors.loading import PriorSpec, load_prior

EXEMPLAR = "exemplar"
# The shipped learned prior (its card and figures: headstyle.lab.prior.card).
SHIPPED = Path(__file__).with_name("learned_prior")
CONTROLNETS = {"depth": "controlnet-depth", "canny": "controlnet-canny"}  # grid branch, single branch


class LabPriorError(ValueError):
    """The lab's prior cannot be used; the message names the option that fixes it."""


@dataclass(frozen=True)
class PriorProfile:
    """What the lab recipe needs to know about its prior.

    image_size: the side of the images the prior takes (single views and 2x2 grids alike);
    shaping_scale: LD's ``grad /= scale`` (the script's 1000 on SD latents);
    rank_weights: LD's rank re-weighting of the (C, H*W) score, one weight per latent channel at most.
    """

    name: str
    image_size: int
    shaping_scale: float
    rank_weights: tuple[float, ...]


# The exemplar prior's latents are its images (3 channels, std 0.745); its historical /10 (raw LD gradient RMS
# 6-22, max up to 290: the clamp cuts 5-18% of the entries, benchmarks/lab_shaping.py).
EXEMPLAR_SHAPING = (10.0, (1.0, 0.75, 0.5))
# The shipped learned prior, measured by headstyle.lab.prior.shaping_calibration (benchmarks/lab_shaping.py, 8 held-out
# identities x 4 styles): latent std 1.015 (SD's convention, 1), so the script's divisor is 1000 * 1.015 ~ 1000;
# raw LD gradient RMS 0.86-1.61, max 11.4 (the clamp never cuts); 4 latent channels whose score ranks hold
# 75-83% / 15-22% / 1-2% / about 1% of the energy: the script's 4 weights.
LEARNED_SHAPING = (1000.0, (1.0, 0.75, 0.5, 0.25))


@dataclass(frozen=True)
class LabPriorSpec:
    """A resolved ``--prior``: folder None = the exemplar prior, else an SD folder with both ControlNets."""

    folder: Path | None

    @property
    def name(self) -> str:
        return EXEMPLAR if self.folder is None else str(self.folder)

    def weights_sha256(self) -> str:
        """sha256 over the folder's weight files (names and bytes; "" for the exemplar prior): a prior retrained into
        the same folder is another prior. The lab's priors are megabytes, so hashing them is cheap."""
        if self.folder is None:
            return ""
        h = hashlib.sha256()
        for f in sorted(self.folder.rglob("*.safetensors")):
            h.update(f.relative_to(self.folder).as_posix().encode() + b"\0" + f.read_bytes())
        return h.hexdigest()

    def profile(self, resolution: int, sr_factor: int) -> PriorProfile:
        """The recipe's constants for a lab generator of raw ``resolution`` and ``sr_factor`` (its single views are
        the prior's images; ``load`` checks that a learned prior takes that size)."""
        if self.folder is None:
            return PriorProfile(EXEMPLAR, resolution * sr_factor, *EXEMPLAR_SHAPING)
        return PriorProfile("learned", resolution * sr_factor, *LEARNED_SHAPING)

    def load(self, resolution: int, sr_factor: int, identities: int, views: int, progress: bool = False):
        """(prior, profile) for a lab generator of raw ``resolution`` and ``sr_factor``; the exemplar prior is
        built from ``identities`` x ``views`` renders, the learned one must work at the lab's render sizes."""
        if self.folder is None:
            from headstyle.lab.prior.exemplar import build_lab_prior

            prior, _ = build_lab_prior(
                identities=identities, views=views, resolution=resolution, sr_factor=sr_factor, progress=progress
            )
            return prior, self.profile(resolution, sr_factor)
        prior = load_learned(self.folder)
        # Single views are the raw render x sr_factor; grids are 2x2 raw renders: both must be the prior's size.
        if not prior.image_size == resolution * sr_factor == 2 * resolution:
            raise LabPriorError(
                f"the prior {self.folder} works at {prior.image_size} px, but the lab renders "
                f"{resolution * sr_factor} px single views ({resolution} px raw x{sr_factor}) and "
                f"{2 * resolution} px grids; use a prior trained at {resolution * sr_factor} px or --prior exemplar"
            )
        return prior, self.profile(resolution, sr_factor)


def resolve_prior(text: str) -> LabPriorSpec:
    """``""`` -> the shipped learned prior; ``exemplar`` -> the exemplar prior; else an SD folder. Checks only
    that the folders exist (one-line LabPriorError otherwise)."""
    if text == EXEMPLAR:
        return LabPriorSpec(None)
    if not text:
        if not (SHIPPED / "model_index.json").is_file():
            raise LabPriorError(
                f"the learned lab prior is not shipped yet ({SHIPPED} is missing): pass --prior PATH (an SD folder "
                "from `headstyle lab train-prior`, e.g. RUN/model) or --prior exemplar (the analytic exemplar prior)"
            )
        return LabPriorSpec(SHIPPED)
    folder = Path(text).expanduser()
    if not (folder / "model_index.json").is_file():
        raise LabPriorError(
            f"--prior {text}: not an SD model folder (no model_index.json); give the model/ folder of a "
            "`headstyle lab train-prior` run, or --prior exemplar"
        )
    missing = [sub for sub in CONTROLNETS.values() if not (folder / sub / "config.json").is_file()]
    if missing:
        raise LabPriorError(
            f"--prior {text} has no {' or '.join(missing)}/: the grid branch needs the depth ControlNet and the "
            "single view the canny one; finish its `headstyle lab train-prior --stage controlnet` first"
        )
    return LabPriorSpec(folder)


def learned_spec(
    folder: str | os.PathLike,
    controlnets: Sequence[str] = tuple(CONTROLNETS),
    latent_sample: Literal["sample", "mean"] = "sample",
) -> PriorSpec:
    """The PriorSpec of an SD-layout lab prior folder: its own VAE, fp32 weights, the ``controlnets`` named
    (of CONTROLNETS: "depth", "canny") from their subfolders."""
    nets = {name: Path(folder) / CONTROLNETS[name] for name in controlnets}
    return PriorSpec(folder, vae="", controlnets=nets, dtype=torch.float32, latent_sample=latent_sample)


def load_learned(folder: Path) -> ScorePrior:
    """The learned prior through the production path, fp32 on the CPU, with its depth and canny ControlNets."""
    from headstyle.priors.diffusers_prior import PriorLoadError

    try:
        return load_prior(learned_spec(folder), "cpu")
    except PriorLoadError as exc:
        raise LabPriorError(f"--prior {folder}: {exc}") from None
