"""Render speed and memory of the PanoHead generator on CPU: raw only vs with super-resolution.

Prints, per configuration, wall-clock ms per single-view render (best of --repeats after one
warm-up: the least disturbed by other load on a shared machine), the process CPU ms of that
render (all threads), and the peak resident memory a render adds (ru_maxrss after rendering minus the RSS before
the first render; each measurement runs in a fresh process because ru_maxrss only grows).

    .venv/bin/python benchmarks/render.py [--repeats 3] [--configs reduced,mid]

Configurations: "reduced" is the parity fixture's generator (its weights); "mid" is a mid-size
generator with random weights (channel_base 8192, channel_max 256, tri-grid 128, 24 + 24 samples,
raw 64 px). The SR module (SuperresolutionHybrid8XDC, 512 px) has the released shapes in both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from headstyle.cameras import cameras, conditioning_camera
from headstyle.generator.checkpoint import build_generator, load_generator, read_config

PARITY = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "panohead_parity"
MID = {"channel_base": 8192, "channel_max": 256, "triplane_size": 128, "samples": 24, "nrr": 64}


def make_generator(name: str) -> torch.nn.Module:
    if name == "reduced":
        return load_generator(PARITY)
    if name == "mid":
        cfg = copy.deepcopy(read_config(PARITY / "config.json"))
        cfg.init_kwargs.update(channel_base=MID["channel_base"], channel_max=MID["channel_max"])
        for rk in (cfg.init_kwargs["rendering_kwargs"], cfg.rendering_kwargs):
            rk.update(triplane_size=MID["triplane_size"], depth_resolution=MID["samples"],
                      depth_resolution_importance=MID["samples"])
        cfg.neural_rendering_resolution = MID["nrr"]
        torch.manual_seed(0)
        return build_generator(cfg)
    raise SystemExit(f"unknown configuration {name!r} (reduced, mid)")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(name: str, render_sr: bool, repeats: int) -> dict:
    """Time `repeats` renders of one view in this process; report ms and the peak RSS they added."""
    G = make_generator(name)
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(0)), conditioning_camera(),
                       truncation_psi=0.7, truncation_cutoff=14)
        c = cameras(0.3, 0.1)
        before = rss_mb()
        times, cpu = [], []
        for i in range(repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            G.synthesis(ws, c, render_sr=render_sr, generator=torch.Generator().manual_seed(i))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    best = min(range(1, repeats + 1), key=times.__getitem__)  # index 0 is the warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rk = G.rendering_kwargs
    return {
        "config": name,
        "sr": render_sr,
        "params_m": sum(p.numel() for p in G.parameters()) / 1e6,
        "nrr": G.neural_rendering_resolution,
        "samples": f"{rk['depth_resolution']}+{rk['depth_resolution_importance']}",
        "trigrid": rk["triplane_size"],
        "ms": 1000 * times[best],
        "cpu_ms": 1000 * cpu[best],
        "peak_mb": max(0.0, peak - before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default="reduced,mid")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "SR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "sr", args.repeats)))
        return

    rows = []
    for name in args.configs.split(","):
        for mode in ("raw", "sr"):
            proc = subprocess.run([sys.executable, __file__, "--worker", name, mode, "--repeats", str(args.repeats)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, batch 1, "
          f"best of {args.repeats} after 1 warm-up; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'config':8} {'params':>8} {'tri-grid':>8} {'raw px':>6} {'samples':>7} "
              f"{'raw ms':>8} {'SR ms':>8} {'SR/raw':>6} {'raw cpu-ms':>10} {'SR cpu-ms':>10} "
              f"{'peak MB raw':>11} {'peak MB SR':>10}")
    print(header)
    print("-" * len(header))
    for name in args.configs.split(","):
        raw, sr = (next(r for r in rows if r["config"] == name and r["sr"] == s) for s in (False, True))
        print(f"{name:8} {raw['params_m']:7.2f}M {raw['trigrid']:8d} {raw['nrr']:6d} {raw['samples']:>7} "
              f"{raw['ms']:8.0f} {sr['ms']:8.0f} {sr['ms'] / raw['ms']:6.1f} "
              f"{raw['cpu_ms']:10.0f} {sr['cpu_ms']:10.0f} "
              f"{raw['peak_mb']:11.0f} {sr['peak_mb']:10.0f}")


if __name__ == "__main__":
    main()
