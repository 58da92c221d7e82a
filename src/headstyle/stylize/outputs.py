"""What a run writes for people: the metrics log, preview grids and turntables."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from headstyle import cameras, export
from headstyle.generator.base import Generator
from headstyle.input_files import MiB, field_problem, parse_json, read_text
from headstyle.io import atomic_write_text
from headstyle.stylize.checkpointing import ResumeError
from headstyle.stylize.config import StylizeConfig, conditioning_camera

# A resumed run's logs are read whole: a line per iteration, 10 000 iterations of a few hundred bytes each.
MAX_LOG_BYTES = 256 * MiB


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of a run's log.jsonl, one per logged iteration ([] before the first)."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in read_text(path, ResumeError, max_bytes=MAX_LOG_BYTES).splitlines() if line]


class MetricsLog:
    """JSONL + CSV log of per-iteration metrics, and TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, resume_iteration: int | None) -> None:
        self.jsonl = run_dir / "log.jsonl"
        self.csv = run_dir / "log.csv"
        if resume_iteration is not None:
            self._truncate(resume_iteration)
        else:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
        self._columns: list[str] | None = None
        if self.csv.is_file():
            with self.csv.open(newline="") as fh:
                self._columns = next(csv.reader(fh), None)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            pass
        else:
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _truncate(self, iteration: int) -> None:
        """Drop entries written after the checkpoint we resume from (they are recomputed)."""
        hint = "the file is torn: delete that line (or the log) and resume again"
        if self.jsonl.is_file():
            keep = []
            text = read_text(self.jsonl, ResumeError, max_bytes=MAX_LOG_BYTES)
            for number, line in enumerate(text.splitlines(), start=1):
                where = f"{self.jsonl}, line {number}: not a log entry"
                entry = parse_json(line, where, ResumeError, hint)
                problem = field_problem(entry, "iteration", int) if isinstance(entry, dict) else "not an object"
                if problem:
                    raise ResumeError(f"{where} ({problem}); {hint}")
                if entry["iteration"] <= iteration:
                    keep.append(line)
            atomic_write_text(self.jsonl, "".join(f"{line}\n" for line in keep))
        if self.csv.is_file():
            text = read_text(self.csv, ResumeError, max_bytes=MAX_LOG_BYTES)
            rows = list(csv.reader(io.StringIO(text, newline="")))
            torn = next((n for n, r in enumerate(rows[1:], start=1) if not (r and r[0].isascii() and r[0].isdigit())),
                        None)  # fmt: skip
            if torn is not None:
                raise ResumeError(f"{self.csv}, row {torn}: no iteration in its first cell; {hint}")
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= iteration])
            atomic_write_text(self.csv, out.getvalue())

    def write(self, metrics: dict[str, Any]) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        new_file = self._columns is None
        if new_file:
            self._columns = list(scalars)
        with self.csv.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new_file:
                writer.writerow(self._columns)
            writer.writerow([scalars.get(k, "") for k in self._columns])
        if self._tb is not None:
            for key, value in scalars.items():
                if key != "iteration":
                    self._tb.add_scalar(key, value, metrics["iteration"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
        return cameras.cameras(yaws, torch.full((len(r.sample_yaws),), math.radians(r.sample_pitch)))

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
        g = torch.Generator().manual_seed(self.cfg.run.seed + 12345)
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
            cams = cameras.turntable_cameras(r.turntable_frames, pitch=math.radians(r.sample_pitch))
            for i in range(len(ws)):
                frames = self._render_views(self.G, ws[i : i + 1], cams)
                paths += export.save_turntable(frames, self.run_dir / "turntable" / f"identity_{i}")
        return paths
