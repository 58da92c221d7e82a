"""The lab prior's training data: ground-truth renders of the prior identities in every domain, and batches of
single views and 2x2 grids with their controls and prompts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.distill.shaping import tile_2x2
from headstyle.lab.prior.recipe import DOMAINS, IDENTITY_SEED, PHRASINGS, TRUNCATION_PSI, TrainPriorConfig, domain_name
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import sample_z
from headstyle.lab.world.identities import check_disjoint, held_out_z
from headstyle.priors.controls import canny_control, depth_control


@dataclass
class LabData:
    """The cached renders: per domain (DOMAINS order) raw views (D, N, 3, r, r) and depth controls
    (D, N, 1, r, r) as uint8 levels, Canny edges of the single view (D, N, 1, 2r, 2r) as uint8 0/1;
    N = identities * views (identity-major)."""

    raw: Tensor
    depth: Tensor
    canny: Tensor
    views: int

    @property
    def identities(self) -> int:
        return self.raw.shape[1] // self.views


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] -> uint8 (rounded)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def single_view(raw: Tensor) -> Tensor:
    """The lab generator's SR image of raw renders: bilinear x2 (headstyle.lab.world.generator.Upsample)."""
    return F.interpolate(raw, scale_factor=2, mode="bilinear", align_corners=False)


@torch.no_grad()
def render_domain(z: Tensor, cams: Tensor, domain: str | None, resolution: int, chunk: int) -> Iterator[dict]:
    """Render identities z (M, P) at cams (M * V, 25) in ``domain``, chunk by chunk: uint8 raw, depth, canny."""
    views = len(cams) // len(z)
    ws = TRUNCATION_PSI * z.repeat_interleave(views, dim=0).unsqueeze(1)
    oracle = LabGenerator(resolution=resolution, sr_factor=1, num_ws=1, style=domain, residual=False)
    for i in range(0, len(ws), chunk):
        out = oracle.synthesis(ws[i : i + chunk], cams[i : i + chunk], render_sr=False)
        raw = out.image_raw.clamp(-1, 1)
        yield {
            "raw": to_uint8((raw + 1) / 2),
            "depth": to_uint8(depth_control(out.depth, out.mask)[:, :1]),
            "canny": canny_control(single_view(raw))[:, :1].to(torch.uint8),
        }


def prior_identities(cfg: TrainPriorConfig) -> Tensor:
    """The prior's identities z (M, P); raises LeakError if any is a held-out identity."""
    z = sample_z(cfg.identities, IDENTITY_SEED + cfg.seed)
    check_disjoint(z, held_out_z(16))
    return z


def load_data(out: Path) -> LabData:
    """The cached renders of stage_data."""
    from safetensors.torch import load_file

    parts = [load_file(str(out / "data" / f"{domain_name(d)}.safetensors")) for d in DOMAINS]
    views = parts[0]["cams"].shape[0] // parts[0]["z"].shape[0]
    return LabData(*(torch.stack([p[k] for p in parts]) for k in ("raw", "depth", "canny")), views=views)


@dataclass
class Batch:
    """Training images in [-1, 1] (B, 3, 64, 64), their controls in [0, 1] (B, 3, 64, 64: depth for grids,
    Canny for single views), domain indices (B,) and which samples are 2x2 grids (B,)."""

    images: Tensor
    controls: Tensor
    domains: Tensor
    grid: Tensor


def sample_batch(data: LabData, n: int, grid_share: float, gen: torch.Generator) -> Batch:
    """n random samples: single views (raw x2 with their Canny) or 2x2 grids of four distinct raw views of one
    identity in one domain (with the tiled depth controls), each with probability ``grid_share``."""
    d_count, n_views = data.raw.shape[0], data.raw.shape[1]
    domains = torch.randint(d_count, (n,), generator=gen)
    grid = torch.rand(n, generator=gen) < grid_share
    index = torch.randint(n_views, (n,), generator=gen)
    picks = torch.stack([torch.randperm(data.views, generator=gen)[:4] for _ in range(n)])
    images, controls = [], []
    for k in range(n):
        d = int(domains[k])
        if grid[k]:
            rows = (int(index[k]) // data.views) * data.views + picks[k]
            raw = data.raw[d, rows].float() / 127.5 - 1
            images.append(tile_2x2(list(raw.unsqueeze(1))))
            controls.append(tile_2x2(list(data.depth[d, rows].float().unsqueeze(1) / 255)))
        else:
            raw = data.raw[d, index[k : k + 1]].float() / 127.5 - 1
            images.append(single_view(raw))
            controls.append(data.canny[d, index[k : k + 1]].float())
    return Batch(torch.cat(images), torch.cat(controls).expand(-1, 3, -1, -1), domains, grid)


def sample_prompts(domains: Tensor, dropout: float, gen: torch.Generator) -> Tensor:
    """Indices into prompt_table(): a random phrasing of each sample's domain, or "" (index 0) with prob. dropout."""
    per = len(PHRASINGS[None])
    phrase = torch.randint(per, domains.shape, generator=gen)
    drop = torch.rand(domains.shape, generator=gen) < dropout
    return torch.where(drop, torch.zeros_like(domains), 1 + domains * per + phrase)
