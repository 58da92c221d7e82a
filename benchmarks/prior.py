"""Cost of DiffusersPrior.predict_noise on the tiny diffusers models (headstyle.testing), or on real ones.

Table 1: ms per predict_noise call (one UNet forward over [uncond; cond]) for batch 2, 4, 8, without
and with a canny ControlNet. Table 2: a two-branch call (canny single views + depth grid) in ONE
batched UNet forward versus two separate predict_noise calls: same result, time ratio. Median wall
and process-CPU time (CPU time is robust to other processes sharing the machine).

    .venv/bin/python benchmarks/prior.py [--repeats 20] [--device cpu] [--threads 1] [--dtype float32]
    .venv/bin/python benchmarks/prior.py --model DIR --vae DIR --canny DIR --depth DIR  # real SD 1.5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from headstyle.priors.base import Control, NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.priors.loading import PriorSpec, load_prior
from headstyle.testing import build_tiny_sd


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median (wall ms, process-CPU ms) of fn over repeats, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(1e3 * (time.perf_counter() - w0))
        cpus.append(1e3 * (time.process_time() - c0))
    return statistics.median(walls), statistics.median(cpus)


def _query(prior: DiffusersPrior, n: int, control: str | None, g: torch.Generator) -> NoiseQuery:
    size = prior.unet.config.sample_size
    x = torch.randn(n, prior.latent_channels, size, size, generator=g).to(prior.device)
    t = torch.randint(1, 1000, (n,), generator=g).to(prior.device)
    emb = prior.embed_prompts("portrait of a werewolf")
    image = torch.rand(1, 3, prior.image_size, prior.image_size, generator=g).to(prior.device)
    return NoiseQuery(x, t, emb, None if control is None else Control(control, image))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--model", help="SD 1.x folder (default: build the tiny test models)")
    ap.add_argument("--vae")
    ap.add_argument("--canny")
    ap.add_argument("--depth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, vae, nets = args.model, args.vae or "", {"canny": args.canny, "depth": args.depth}
        else:
            tiny = build_tiny_sd(tmp)
            model, vae, nets = tiny.model, "", tiny.controlnets
        prior = load_prior(PriorSpec(model, vae, nets, dtype=dtype, channels_last=args.channels_last), device)
    g = torch.Generator().manual_seed(0)
    console = Console(width=120)
    name = "tiny test models" if not args.model else args.model
    console.print(f"{name} on {device} ({args.dtype}, {args.threads} CPU threads), median of {args.repeats}")

    rows = []
    with torch.no_grad():
        cases = [(n, c) for n in (2, 4, 8) for c in (None, "canny")]
        for n, control in tqdm(cases, desc="batch sizes"):
            query = _query(prior, n, control, g)
            rows.append((n, control or "-", *_time(lambda q=query: prior.predict_noise([q]), args.repeats, device)))
    table = Table(title="predict_noise: one UNet forward over [uncond; cond]")
    for col in ("batch", "control", "wall ms", "cpu ms", "wall ms / sample"):
        table.add_column(col, justify="right")
    for n, control, wall, cpu in rows:
        table.add_row(str(n), control, f"{wall:.1f}", f"{cpu:.1f}", f"{wall / n:.2f}")
    console.print(table)

    table = Table(title="two branches (canny views + depth grid): one batched call vs separate calls")
    for col in (
        "samples/branch",
        "batched wall ms",
        "separate wall ms",
        "speed-up (wall)",
        "speed-up (cpu)",
        "max |diff|",
    ):
        table.add_column(col, justify="right")
    with torch.no_grad():
        for n in tqdm((1, 2, 4), desc="two-branch"):
            a, b = _query(prior, n, "canny", g), _query(prior, n, "depth", g)
            bw, bc = _time(lambda a=a, b=b: prior.predict_noise([a, b]), args.repeats, device)
            sw, sc = _time(lambda a=a, b=b: (prior.predict_noise([a]), prior.predict_noise([b])), args.repeats, device)
            joint = prior.predict_noise([a, b])
            alone = prior.predict_noise([a]) + prior.predict_noise([b])
            diff = max(
                (x - y).abs().max().item() for p, q in zip(joint, alone, strict=True) for x, y in zip(p, q, strict=True)
            )
            table.add_row(str(n), f"{bw:.1f}", f"{sw:.1f}", f"{sw / bw:.2f}x", f"{sc / bc:.2f}x", f"{diff:.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
