"""Projector speed on the parity fixture's generator (PanoHead's architecture, reduced channels): seconds per
projection step and per PTI step at three render settings, and the whole `headstyle photo` journey.

Per step: best of --repeats timed steps after one warm-up step (the least disturbed by other load on a
shared machine), with the Laplacian-L1 fallback distance and, when --vgg16 is given, LPIPS-VGG16.
The journey (align skimage's astronaut, w_avg over 10k samples, --journey-steps projection steps,
5 stylised views and an 8-frame turntable, all raw) is timed once and extrapolated to PanoHead's
500 steps with the measured per-step time.

    .venv/bin/python benchmarks/projector.py [--device cpu] [--repeats 2] [--journey-steps 20] [--vgg16 vgg16.pt]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from skimage import data

from headstyle.cameras import cameras
from headstyle.export import render_view
from headstyle.faces.align import align_photo
from headstyle.faces.detect import detect_faces
from headstyle.faces.perceptual import load_perceptual
from headstyle.faces.projector import ProjectConfig, PTIConfig, pivotal_tuning, project, w_statistics
from headstyle.generator.checkpoint import load_generator
from headstyle.generator.latents import Latent

PARITY = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "panohead_parity"
# (name, raw render size, samples per ray (coarse = importance), super-resolution)
SETTINGS = (("raw 16 px, 6+6 samples", 16, 6, False), ("raw 32 px, 12+12 (fixture)", 32, 12, False),
            ("512 px SR, 12+12 (fixture)", 32, 12, True))


def load(nrr: int, samples: int, device: str) -> torch.nn.Module:
    return load_generator(PARITY, device=device, neural_rendering_resolution=nrr,
                          rendering_overrides={"depth_resolution": samples, "depth_resolution_importance": samples,
                                               "ray_start": 2.35})


def per_step(fn, steps: int, repeats: int, sync) -> float:
    fn(1)
    best = math.inf
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn(steps)
        sync()
        best = min(best, (time.perf_counter() - t) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    parser.add_argument("--journey-steps", type=int, default=20)
    parser.add_argument("--vgg16", default=None, help="NVIDIA's vgg16.pt, to time LPIPS-VGG16 as well")
    args = parser.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    distances = [load_perceptual()] + ([load_perceptual(args.vgg16)] if args.vgg16 else [])
    c = cameras(0.2, -0.1).to(dev)

    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}")
    print("| render | distance | s / projection step | s / PTI step |")
    print("|---|---|---|---|")
    for name, nrr, samples, sr in SETTINGS:
        G = load(nrr, samples, args.device)
        size = G.img_resolution if sr else nrr
        target = torch.rand(1, 3, size, size, device=dev) * 2 - 1
        ws = G.mapping(torch.randn(1, G.z_dim, device=dev), c).detach()
        for dist in distances:
            dist = dist.to(dev)

            def proj(n, G=G, target=target, dist=dist, sr=sr):
                project(G, target, c, dist, ProjectConfig(steps=n, w_avg_samples=100, raw=not sr), show_progress=False)

            def pti(n, G=G, target=target, dist=dist, ws=ws, sr=sr):
                pivotal_tuning(G, target, ws, c, dist, PTIConfig(steps=n), raw=not sr, show_progress=False)

            print(f"| {name} | {dist.name.split(' ')[0]} | {per_step(proj, args.steps, args.repeats, sync):.3f} "
                  f"| {per_step(pti, args.steps, args.repeats, sync):.3f} |", flush=True)

    # The whole journey, raw at the fixture's 32 px.
    t0 = time.perf_counter()
    photo = data.astronaut()
    aligned = align_photo(photo, detect_faces(photo))
    t_align = time.perf_counter() - t0
    G = load(32, 12, args.device)
    t = time.perf_counter()
    w_statistics(G, 10_000)
    t_wavg = time.perf_counter() - t
    target = torch.from_numpy(aligned.crop.copy()).permute(2, 0, 1)[None].float().to(dev) / 127.5 - 1
    target = torch.nn.functional.interpolate(target, size=(32, 32), mode="area")
    cam = torch.from_numpy(aligned.camera)[None].to(dev)
    t = time.perf_counter()
    result = project(G, target, cam, distances[0], ProjectConfig(steps=args.journey_steps, raw=True),
                     show_progress=False)
    t_proj = time.perf_counter() - t
    t = time.perf_counter()
    latent = Latent("x", result.ws, 0)
    for yaw in (-90, -30, 0, 30, 90):
        render_view(G, latent, cameras(math.radians(yaw), math.radians(10)).to(dev), render_sr=False)
    for i in range(8):
        render_view(G, latent, cameras(i * math.pi / 4, 0.0).to(dev), render_sr=False)
    t_render = time.perf_counter() - t
    # project() computes w_avg itself: its steps are what remains.
    step = max(t_proj - t_wavg, 0.0) / args.journey_steps
    total = t_align + t_proj + t_render
    print(f"\njourney (raw 32 px): align {t_align:.1f} s, w_avg (10k samples) {t_wavg:.1f} s, "
          f"{args.journey_steps} steps {step:.3f} s each, 13 renders {t_render:.1f} s; total {total:.1f} s; "
          f"with PanoHead's 500 steps about {total + (500 - args.journey_steps) * step:.0f} s")


if __name__ == "__main__":
    main()
