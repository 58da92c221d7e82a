"""The lab's score prior: exemplar mixtures of ground-truth style renders of OTHER identities.

The lab stands in for Stable Diffusion with an exact prior (headstyle.priors.analytic.ExemplarPrior):
each prompt's data distribution is a set of ground-truth renders of its style, made from
"prior" identities at random 360-degree cameras; the unstyled domain is one more prompt, and
the unconditional prompt "" is the pooled mixture of all of them. Images are the latents.

The trainer sends two kinds of images (headstyle.stylize.trainer): single views (the SR image
resized to the prior's size) and 2x2 grids of raw renders. A grid comes with the "depth"
control, and the lab prior models a grid as four independent views: p(grid) = prod_k p_tile(v_k),
whose exact eps is the per-tile eps of an exemplar prior over raw renders. So ``LabPrior``
holds two ExemplarPriors built from the same renders (single: SR-sized images; tile: raw
images) and routes each noise query by its layout.

``build_lab_prior`` refuses identities closer than ``min_distance`` to any held-out identity:
no term of the prior looks at the identities being evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.progress import track
from torch import Tensor

from headstyle.distill.shaping import tile_2x2, untile_2x2
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import STYLES, sample_z, style_prompt
from headstyle.lab.world.identities import check_disjoint, held_out_z, stratified_360_cameras
from headstyle.priors.analytic import ExemplarPrior
from headstyle.priors.base import NoiseQuery, PromptEmbeds

GRID_CONTROL = "depth"
PRIOR_SEED = 2_000
LATENT_SCALE = 1.0




@dataclass
class ExemplarData:
    """What the prior is built from: identities z (M, P), cameras (M * V, 25), and per domain
    (style name, None = unstyled) raw renders (M * V, 3, r, r) in [-1, 1]."""

    z: Tensor
    cams: Tensor
    raw: dict[str | None, Tensor]








@torch.no_grad()
def render_exemplars(
    z: Tensor,
    styles: tuple[str, ...],
    views: int,
    resolution: int = 32,
    seed: int = 0,
    truncation_psi: float = 0.75,
    chunk: int = 16,
    progress: bool = False,
) -> ExemplarData:
    """Ground-truth renders of identities z (mapped with ``truncation_psi`` like the trainer's) in
    every style and unstyled, at ``views`` random 360-degree cameras each."""
    cams = stratified_360_cameras(len(z), views, torch.Generator().manual_seed(seed))
    ws = truncation_psi * z.repeat_interleave(views, dim=0).unsqueeze(1)
    domains = (None, *styles)
    chunks = [(style, i) for style in domains for i in range(0, len(ws), chunk)]
    oracles = {s: LabGenerator(resolution=resolution, sr_factor=1, num_ws=1, style=s, residual=False) for s in domains}
    parts: dict[str | None, list[Tensor]] = {s: [] for s in domains}
    for style, i in track(chunks, description="prior exemplars", disable=not progress):
        parts[style].append(oracles[style].synthesis(ws[i : i + chunk], cams[i : i + chunk], render_sr=False).image_raw)
    return ExemplarData(z.clone(), cams, {s: torch.cat(p) for s, p in parts.items()})


class LabPrior:
    """ScorePrior over single views (``single``) and 2x2 grids of raw views (``tile``, per tile).

    Prompts are the style prompts of headstyle.lab.world.heads plus UNSTYLED_PROMPT; "" is the pooled
    mixture. ``identities`` holds the z of every identity the exemplars were rendered from.
    Latents are images times ``latent_scale`` (default 1: images are the latents; SD's VAE has its
    0.18215); the sub-priors hold scaled exemplars. A smaller scale brings the exemplars closer
    together relative to the noise, so that the posterior averages over more of them.
    """

    control_names = frozenset({GRID_CONTROL})
    takes_content = False
    predicts_cond_only = False

    def __init__(self, single: ExemplarPrior, tile: ExemplarPrior, identities: Tensor, latent_scale: float) -> None:
        if single.components != tile.components:
            raise ValueError("single-view and tile priors must share their prompts")
        self.latent_scale = latent_scale
        self.single = single
        self.tile = tile
        self.identities = identities
        self.alphas_cumprod = single.alphas_cumprod
        self.latent_channels = single.latent_channels
        self.image_shape = single.image_shape
        self.image_size = single.image_size
        self.device = single.device

    def inference_timesteps(self, num_inference_steps: int) -> Tensor:
        return self.single.inference_timesteps(num_inference_steps)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.single.add_noise(x0, eps, t)

    def encode(self, images: Tensor) -> Tensor:
        return self.latent_scale * images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float() / self.latent_scale

    def embed_prompts(self, prompt: str, negative_prompt: str = "") -> PromptEmbeds:
        return self.single.embed_prompts(prompt, negative_prompt)

    def predict_noise(self, queries: list[NoiseQuery]) -> list[tuple[Tensor, Tensor]]:
        """(eps_uncond, eps_cond) per query: single views from ``single``; grids tile by tile from ``tile``.

        Each sub-prior is evaluated once over all of its samples.
        """
        singles = [q for q in queries if not _is_grid(q)]
        grids = [q for q in queries if _is_grid(q)]
        single_out = iter(self.single.predict_noise(singles))
        tile_queries = [
            NoiseQuery(
                torch.cat(untile_2x2(q.x_t)),
                q.t.reshape(-1).expand(len(q.x_t)).repeat(4),
                _repeat(q.prompt, 4, len(q.x_t)),
            )
            for q in grids
        ]
        tile_out = iter(self.tile.predict_noise(tile_queries))
        out = []
        for q in queries:
            if not _is_grid(q):
                out.append(next(single_out))
                continue
            eps_u, eps_c = next(tile_out)
            out.append(tuple(tile_2x2(list(e.chunk(4))) for e in (eps_u, eps_c)))
        return out


def _is_grid(query: NoiseQuery) -> bool:
    return query.layout == "grid"


def _repeat(prompt: PromptEmbeds, times: int, n: int) -> PromptEmbeds:
    """Embeddings of n samples repeated for the ``times`` tiles stacked tile-major."""
    p = prompt.repeat(n)
    return PromptEmbeds(p.uncond.repeat(times, 1, 1), p.cond.repeat(times, 1, 1))


def build_lab_prior(
    styles: tuple[str, ...] = tuple(STYLES),
    identities: int = 6,
    views: int = 24,
    resolution: int = 32,
    sr_factor: int = 2,
    held_out: Tensor | None = None,
    bandwidth: float = 0.0,
    latent_scale: float = LATENT_SCALE,
    seed: int = PRIOR_SEED,
    progress: bool = False,
) -> tuple[LabPrior, ExemplarData]:
    """Render exemplars of ``identities`` prior identities (seeded by ``seed``) and build the LabPrior.

    held_out: identities that must not appear (LeakError otherwise); defaults to the lab's
    evaluation set of 16. Single-view exemplars are the raw renders upsampled by ``sr_factor``
    exactly as the lab generator's "super-resolution" does.
    """
    z = sample_z(identities, seed)
    check_disjoint(z, held_out_z(16) if held_out is None else held_out)
    data = render_exemplars(z, styles, views, resolution, seed=seed + 1, progress=progress)
    upsample = LabGenerator(resolution=resolution, sr_factor=sr_factor, residual=False).superresolution
    names = {style: style_prompt(style) for style in data.raw}
    k = latent_scale
    single = ExemplarPrior({names[s]: k * upsample(img) for s, img in data.raw.items()}, bandwidth=bandwidth)
    tile = ExemplarPrior({names[s]: k * img for s, img in data.raw.items()}, bandwidth=bandwidth)
    return LabPrior(single, tile, data.z, latent_scale), data
