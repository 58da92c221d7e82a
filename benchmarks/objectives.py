"""Cost of one gradient per distillation objective on the tiny diffusers models (headstyle.testing).

For each objective: predict_noise calls, UNet and ControlNet forwards, backward passes through
the UNet, median wall and process-CPU time per gradient (CPU time is robust to other processes
sharing the machine) and peak memory above the baseline (CUDA: allocator peak; CPU: peak of the
running allocation total recorded by torch.profiler). Ratios are to LD within the same run, so
they compare across machines better than absolute times. On CPU torch runs --threads threads.

    .venv/bin/python benchmarks/objectives.py [--repeats 5] [--device cpu] [--threads 1] [--fpr-iterations 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from headstyle.distill.objectives import DistillTarget, dds, ids, ld, nfsd, sds
from headstyle.priors.base import Control
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.priors.loading import PriorSpec, load_prior
from headstyle.testing import IMAGE_SIZE, build_tiny_sd


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _counter(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _targets(prior: DiffusersPrior, grid: bool) -> list[DistillTarget]:
    """A 1-sample single view with canny control (+ a 1-sample 2x2 grid with depth control)."""
    g = torch.Generator().manual_seed(0)
    emb = prior.embed_prompts("portrait of a werewolf")
    src_emb = prior.embed_prompts("portrait of a face")
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    with torch.no_grad():
        latents = prior.encode(images.to(prior.device))
    controls = [
        Control("canny", (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.8).float()),
        Control("depth", torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g)),
    ]
    out = []
    for i in range(2 if grid else 1):
        lat = latents[i : i + 1]
        out.append(
            DistillTarget(
                latents=lat,
                prompt=emb,
                t=torch.tensor([281], device=prior.device),
                noise=torch.randn(lat.shape, generator=g).to(prior.device),
                control=controls[i],
                step_index=torch.tensor([35]),
                source_latents=lat + 0.1 * torch.randn(lat.shape, generator=g).to(prior.device),
                source_prompt=src_emb,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fpr-iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--root", type=Path, default=None, help="folder for the tiny models (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_sd(args.root or tmp)
        prior = load_prior(PriorSpec(tiny.model, "", tiny.controlnets, dtype=torch.float32), device)
        neg = prior.embed_prompts("blurry", "")
        n = args.fpr_iterations
        cases: list[tuple[str, Callable, bool, dict, int]] = [
            ("ld", ld, False, {}, 0),
            ("ld view+grid (2 branches)", ld, True, {}, 0),
            ("sds", sds, False, {}, 0),
            ("nfsd (+negative prompt)", nfsd, False, {"negative_prompt": neg}, 0),
            ("dds", dds, False, {}, 0),
            ("ids N=1", ids, False, {"fpr_iterations": 1}, 1),
            (f"ids N={n}", ids, False, {"fpr_iterations": n}, n),
        ]
        unet = _counter(prior.unet)
        cnets = [_counter(net) for net in prior.controlnets.values()]
        rows = []
        for name, fn, grid, hyper, backward in tqdm(cases, desc="objectives", unit="objective"):
            targets = _targets(prior, grid)
            fn(prior, targets, **hyper)  # warm-up (lazy kernels, caches)
            unet[0] = 0
            for c in cnets:
                c[0] = 0
            results = fn(prior, targets, **hyper)
            counts = (results[0].diagnostics["prior_calls"], unet[0], sum(c[0] for c in cnets))
            wall, cpu = [], []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(prior, targets, **hyper)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            peak = _peak_bytes(lambda fn=fn, targets=targets, hyper=hyper: fn(prior, targets, **hyper), device)
            ms = (statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3)
            rows.append((name, *counts, backward, *ms, peak / 2**20))

    base_cpu, base_mem = rows[0][6], max(rows[0][7], 1e-9)
    table = Table(title=f"one gradient per objective, tiny SD family, {device.type}, median of {args.repeats}")
    columns = ("objective", "prior calls", "UNet fwd", "ControlNet fwd", "UNet bwd", "wall ms", "CPU ms", "CPU x LD")
    for col in (*columns, "peak MiB", "mem x LD"):
        table.add_column(col, justify="left" if col == "objective" else "right")
    for name, calls, unet_fwd, cn_fwd, bwd, ms, cpu_ms, mem in rows:
        table.add_row(
            name, str(calls), str(unet_fwd), str(cn_fwd), str(bwd), f"{ms:.1f}", f"{cpu_ms:.1f}",
            f"{cpu_ms / base_cpu:.2f}", f"{mem:.2f}", f"{mem / base_mem:.2f}",
        )  # fmt: skip
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
