"""What a run writes for people: preview grids and turntables (the metrics log: training/log.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headstyle import cameras, export
from headstyle.generator.base import Generator
from headstyle.stylize.config import StylizeConfig, conditioning_camera, view_cameras

# The previews' identities: the run seed plus this, a stream apart from the training streams.
PREVIEW_STREAM = 12_345


class Previews:
    """Preview grids (frozen vs trainable renders of fixed identities) and turntables of the trainable generator.

    Identities come from their own seeded stream, so every preview shows the same heads whatever the training
    RNG; the frozen row is rendered once.
    """

    def __init__(self, cfg: StylizeConfig, G: Generator, frozen: Generator, device: torch.device,
                 render_kwargs: dict[str, Any]) -> None:
        self.cfg = cfg
        self.G = G
        self.frozen = frozen
        self.device = device
        self.render_kwargs = render_kwargs
        self.run_dir = Path(cfg.run.out)
        self._frozen_samples: Tensor | None = None

    def _sample_cameras(self) -> Tensor:
        r = self.cfg.run
        yaws = torch.tensor([math.radians(y) for y in r.sample_yaws])
        return view_cameras(self.cfg, yaws, torch.full((len(r.sample_yaws),), math.radians(r.sample_pitch)))

    @torch.no_grad()
    def _render_views(self, G: Generator, ws: Tensor, cams: Tensor) -> Tensor:
        """(identities * views, 3, H, W) images in [-1, 1], one identity at a time."""
        rows = []
        for w in ws:
            sr = self.cfg.run.preview_sr
            out = G.synthesis(
                w[None].expand(len(cams), -1, -1),
                cams.to(self.device),
                noise_mode="const",
                render_sr=sr,
                **self.render_kwargs,
            )
            rows.append((out.image if sr else out.image_raw).float().cpu())
        return torch.cat(rows)

    def _sample_ws(self, count: int) -> Tensor:
        g = torch.Generator().manual_seed(self.cfg.run.seed + PREVIEW_STREAM)
        z = torch.randn(count, self.G.z_dim, generator=g).to(self.device)
        c = conditioning_camera(self.cfg).expand(count, -1).to(self.device)
        with torch.no_grad():
            return self.frozen.mapping(z, c, self.cfg.latent.truncation_psi, self.cfg.latent.truncation_cutoff)

    def _fork_rng(self) -> Any:
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def write_samples(self, iteration: int) -> Path:
        """PNG grid: per identity a row of frozen renders then a row of trainable renders at fixed views."""
        with self._fork_rng():
            ws = self._sample_ws(self.cfg.run.sample_identities)
            cams = self._sample_cameras()
            if self._frozen_samples is None:
                self._frozen_samples = self._render_views(self.frozen, ws, cams)
            trained = self._render_views(self.G, ws, cams)
        v = len(cams)
        rows = []
        for i in range(len(ws)):
            rows += [self._frozen_samples[i * v : (i + 1) * v], trained[i * v : (i + 1) * v]]
        path = self.run_dir / "samples" / f"iter_{iteration:07d}.png"
        export.save_grid(torch.cat(rows), path, cols=v)
        return path

    def write_turntables(self) -> list[Path]:
        r = self.cfg.run
        paths: list[Path] = []
        with self._fork_rng():
            ws = self._sample_ws(r.turntable_identities)
            cams = cameras.turntable_cameras(r.turntable_frames, math.radians(r.sample_pitch), self.cfg.cameras.pivot)
            for i in range(len(ws)):
                frames = self._render_views(self.G, ws[i : i + 1], cams)
                paths += export.save_turntable(frames, self.run_dir / "turntable" / f"identity_{i}")
        return paths
