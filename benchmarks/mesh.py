"""Mesh extraction speed and memory: volume sampling, marching cubes, components, vertex colours.

Prints, per resolution (lattice points per axis of PanoHead's extraction cube), the wall-clock
seconds of each stage for one head, the process CPU seconds of the whole extraction (all threads;
with one thread the figure least disturbed by other load on a shared machine), the field
evaluation rate (points per CPU second of sampling), the peak resident memory the extraction adds
(ru_maxrss after minus the RSS before; each resolution runs in a fresh process because ru_maxrss
only grows) and, on CUDA, the peak allocated GPU memory. Defaults: PanoHead's trim (30/256 of
the cube per face, never evaluated) and batches of 2**16 points.

    .venv/bin/python benchmarks/mesh.py [--resolutions 128,256,512] [--device cpu]
        [--textures 1024,2048] [--faces 50000]

A second table times what makes the files an artist uses, per resolution and texture size: decimation
to the face budget (pymeshlab), the UV atlas (xatlas) and the texture baked from the field, each with
its CPU seconds, and the peak resident memory they add to the marching-cubes mesh (each row in a
fresh process).

The generator is the parity fixture's (reduced PanoHead: tri-grid 32, the released decoder and
torgb shapes; the field's cost per point is the decoder's and the same at full size). Its density
peaks at 8.4, below PanoHead's level 10, so the surface is taken at level 4.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from headstyle.generator.checkpoint import load_generator
from headstyle.generator.latents import latents_from_seeds
from headstyle.mesh import extraction_cube, isosurface, largest_component, sample_volume
from headstyle.mesh.decimate import decimate
from headstyle.mesh.surface import vertex_colours
from headstyle.mesh.texture import bake_texture, texel_coverage, unwrap

PARITY = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "panohead_parity"
LEVEL = 4.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(resolution: int, device: str) -> dict:
    """Extract one head's mesh at ``resolution`` in this process; time each stage."""
    G = load_generator(PARITY, device=device)
    ws = latents_from_seeds(G, [0])[0].ws
    before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        sampler = G.field_sampler(ws)
    cube = extraction_cube(resolution, G.box_warp)
    volume = sample_volume(sampler, cube, device)
    t1, c1 = time.perf_counter(), time.process_time()
    mesh = isosurface(volume, LEVEL)
    t2 = time.perf_counter()
    mesh = largest_component(mesh)
    t3 = time.perf_counter()
    vertex_colours(sampler, mesh.vertices, device)
    t4, c4 = time.perf_counter(), time.process_time()
    return {
        "resolution": resolution,
        "points_m": cube.inner**3 / 1e6,
        "sample_s": t1 - t0,
        "mc_s": t2 - t1,
        "component_s": t3 - t2,
        "colour_s": t4 - t3,
        "total_s": t4 - t0,
        "cpu_s": c4 - c0,
        "mpts_per_cpu_s": cube.inner**3 / (c1 - c0) / 1e6,
        "vertices_k": len(mesh.vertices) / 1e3,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
        "gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


def texture_worker(resolution: int, texture: int, faces: int, device: str) -> dict:
    """Decimate one head's mesh at ``resolution`` to ``faces``, unwrap it and bake a ``texture`` texture; time each."""
    G = load_generator(PARITY, device=device)
    ws = latents_from_seeds(G, [0])[0].ws
    with torch.no_grad():
        sampler = G.field_sampler(ws)
    volume = sample_volume(sampler, extraction_cube(resolution, G.box_warp), device)
    mesh = largest_component(isosurface(volume, LEVEL))
    del volume
    before = rss_mb()
    stages = {}

    def timed(name: str, fn):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        stages[f"{name}_s"], stages[f"{name}_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        return result

    small = timed("decimate", lambda: decimate(mesh, faces))
    atlas = timed("unwrap", lambda: unwrap(small, texture))
    coverage = texel_coverage(atlas, texture)
    timed("bake", lambda: bake_texture(sampler, small, atlas, coverage, texture, device))
    return {
        "resolution": resolution,
        "texture": texture,
        "faces_k": len(mesh.faces) / 1e3,
        "kept_k": len(small.faces) / 1e3,
        "texels_m": len(coverage.pixel) / 1e6,
        **stages,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before,
    }


def texture_table(resolutions: list[int], textures: list[int], faces: int, device: str) -> None:
    """Print the decimation, unwrapping and baking table, one fresh process per row."""
    print(f"\ndecimation to {faces} faces, xatlas unwrapping and baking, {device}\n")
    print("| resolution | texture | faces (k) | kept (k) | texels baked (M) | decimate s (CPU) | unwrap s (CPU) "
          "| bake s (CPU) | peak RSS added (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in resolutions:
        for size in textures:
            out = subprocess.run([sys.executable, __file__, "--texture-worker", f"{res},{size},{faces}",
                                  "--device", device], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            cells = " | ".join(f"{r[f'{k}_s']:.1f} ({r[f'{k}_cpu_s']:.1f})" for k in ("decimate", "unwrap", "bake"))
            print(f"| {res} | {size} | {r['faces_k']:.0f} | {r['kept_k']:.0f} | {r['texels_m']:.2f} | {cells} "
                  f"| {r['peak_mb']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", default="128,256,512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--textures", default="1024,2048")
    parser.add_argument("--faces", type=int, default=50_000)
    parser.add_argument("--texture-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.device)))
        return
    if args.texture_worker is not None:
        res, size, faces = (int(v) for v in args.texture_worker.split(","))
        print(json.dumps(texture_worker(res, size, faces, args.device)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(f"mesh extraction, parity-fixture generator, {args.device}, {threads} torch threads, level {LEVEL}\n")
    print("| resolution | points evaluated (M) | sample s | marching cubes s | component s | colours s | total s "
          "| total CPU s | M points / CPU s | vertices (k) | peak RSS added (MB) | peak GPU (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in (int(r) for r in args.resolutions.split(",")):
        out = subprocess.run([sys.executable, __file__, "--worker", str(res), "--device", args.device],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        gpu = "-" if r["gpu_mb"] is None else f"{r['gpu_mb']:.0f}"
        print(f"| {res} | {r['points_m']:.2f} | {r['sample_s']:.1f} | {r['mc_s']:.1f} | {r['component_s']:.1f} "
              f"| {r['colour_s']:.2f} | {r['total_s']:.1f} | {r['cpu_s']:.1f} | {r['mpts_per_cpu_s']:.2f} "
              f"| {r['vertices_k']:.0f} "
              f"| {r['peak_mb']:.0f} | {gpu} |", flush=True)
    texture_table([int(r) for r in args.resolutions.split(",")], [int(t) for t in args.textures.split(",")],
                  args.faces, args.device)


if __name__ == "__main__":
    main()
