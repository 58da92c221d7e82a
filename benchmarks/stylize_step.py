"""Cost of one stylize iteration, broken down by stage, fused (headstyle) vs per-branch (the LD script).

fused:      Stylizer.step() as shipped: the single view (+ mirror) and the 2x2 grid share ONE VAE
            encode, ONE UNet call (each branch with its own ControlNet) and ONE backward.
per-branch: the paper script's order: the single view and the grid each get their own encode,
            UNet call and backward (two Stylizers with one branch each, relative distance on the
            single view only), as train_LD.py does.
Stages are timed with hooks: render (generator synthesis minus SR), SR, VAE encode, ControlNets,
UNet, backward, optimizer, other; plus UNet/ControlNet/backward call counts and peak memory
(CUDA: allocator peak; CPU: torch.profiler running allocation peak). Medians over --steps after
one warm-up step; the ratio is per-branch / fused within this run, the two variants alternating step by step.

    .venv/bin/python benchmarks/stylize_step.py [--steps 3] [--generator lab|panohead] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from headstyle.generator.checkpoint import RELEASED_INIT_KWARGS, GeneratorConfig, build_generator
from headstyle.lab.generator import LabGenerator
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.stylize.config import StylizeConfig, apply_overrides
from headstyle.stylize.trainer import Stylizer
from headstyle.testing import build_tiny_sd
from objectives import _peak_bytes

STAGES = ("render", "SR", "VAE encode", "ControlNets", "UNet", "backward", "optimizer", "other")


class StageClock:
    """Accumulates wall time and calls per stage from module hooks and method wrappers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def module(self, module: torch.nn.Module, stage: str) -> None:
        start: list[float] = []

        def pre(*_: Any) -> None:
            self._sync()
            start.append(time.perf_counter())

        def post(*_: Any) -> None:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start.pop()
            self.calls[stage] += 1

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo += [h.remove for h in handles]

    def method(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[stage] += time.perf_counter() - t0
                self.calls[stage] += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()


@contextmanager
def timed_backward(clock: StageClock) -> Iterator[None]:
    """Time every Tensor.backward (the trainer's single backward, or the per-branch ones)."""
    original = torch.Tensor.backward

    def backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        clock._sync()
        t0 = time.perf_counter()
        original(self, *args, **kwargs)
        clock._sync()
        clock.seconds["backward"] += time.perf_counter() - t0
        clock.calls["backward"] += 1

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


def make_generator(kind: str) -> torch.nn.Module:
    if kind == "lab":
        G = LabGenerator(resolution=16, sr_factor=4, seed=0)
        G.rendering_kwargs["depth_resolution"] = 12
        return G
    init = copy.deepcopy(RELEASED_INIT_KWARGS)
    init.update(channel_base=1024, channel_max=64)
    init["rendering_kwargs"].update(triplane_size=32, depth_resolution=12, depth_resolution_importance=12)
    torch.manual_seed(0)
    return build_generator(GeneratorConfig.from_init_kwargs(init, 32))


def instrument(stylizers: list[Stylizer], prior: DiffusersPrior, clock: StageClock) -> None:
    for st in stylizers:
        for G in (st.G, st.frozen):
            clock.method(G, "synthesis", "synthesis")
            clock.module(G.superresolution, "SR")
        clock.method(st.optimizer, "step", "optimizer")
    clock.method(prior, "encode", "VAE encode")
    clock.module(prior.unet, "UNet")
    for net in prior.controlnets.values():
        clock.module(net, "ControlNets")


def measure(variants: dict[str, list[Stylizer]], prior: DiffusersPrior, steps: int, device: torch.device) -> dict:
    """Per variant: median ms per stage, calls per iteration and peak memory. Variants alternate step by step,
    so a machine whose load drifts slows both alike."""
    clock = StageClock(device)
    instrument([st for sts in variants.values() for st in sts], prior, clock)
    totals: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in variants}
    calls: dict[str, dict[str, int]] = {}
    with timed_backward(clock):
        for sts in variants.values():  # warm-up
            for st in sts:
                st.step()
        for _ in tqdm(range(steps), desc="iterations", leave=False):
            for name, sts in variants.items():
                clock.reset()
                t0 = time.perf_counter()
                for st in sts:
                    st.step()
                clock._sync()
                total = time.perf_counter() - t0
                s = clock.seconds
                stage = {
                    "render": s["synthesis"] - s["SR"],
                    "SR": s["SR"],
                    "VAE encode": s["VAE encode"],
                    "ControlNets": s["ControlNets"],
                    "UNet": s["UNet"],
                    "backward": s["backward"],
                    "optimizer": s["optimizer"],
                }
                stage["other"] = total - sum(stage.values())
                stage["total"] = total
                for k, v in stage.items():
                    totals[name][k].append(v)
                calls[name] = {k: clock.calls[k] for k in ("UNet", "ControlNets", "VAE encode", "backward")}
        peaks = {name: _peak_bytes(lambda sts=sts: [st.step() for st in sts], device) for name, sts in variants.items()}
    clock.remove()
    return {
        name: {
            "ms": {k: 1000 * statistics.median(v) for k, v in totals[name].items()},
            "calls": calls[name],
            "peak": peaks[name],
        }
        for name in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--generator",
        choices=("lab", "panohead"),
        default="lab",
        help="lab: the synthetic lab generator (fast); panohead: a reduced PanoHead with its 512 px SR",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        sd = build_tiny_sd(Path(tmp) / "sd")
        prior = DiffusersPrior.from_pretrained(sd.model, vae=None, controlnets=sd.controlnets, device=device)
        base = apply_overrides(
            StylizeConfig(),
            [
                "prompt.prompt=portrait of a werewolf",
                f"run.out={tmp}/run",
                f"run.device={device.type}",
            ],
        )
        if args.generator == "lab":
            base = apply_overrides(base, ["single.rank_weights=[1, 0.75, 0.5]"])  # the lab prior sees 3 channels
        variants = {
            "fused": [Stylizer(base, make_generator(args.generator), prior)],
            "per-branch": [
                Stylizer(apply_overrides(base, ["grid.enabled=false"]), make_generator(args.generator), prior),
                Stylizer(
                    apply_overrides(base, ["single.enabled=false", "regularisers.relative_distance=0"]),
                    make_generator(args.generator),
                    prior,
                ),
            ],
        }
        results = measure(variants, prior, args.steps, device)

    table = Table(
        title=f"stylize iteration on {device.type} ({args.generator} generator, tiny SD + 2 ControlNets), "
        f"median of {args.steps}"
    )
    table.add_column("stage")
    for name in results:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("per-branch / fused", justify="right")
    for stage in (*STAGES, "total"):
        f, p = results["fused"]["ms"][stage], results["per-branch"]["ms"][stage]
        table.add_row(stage, f"{f:.1f}", f"{p:.1f}", f"{p / f:.2f}" if f > 0.05 else "-")
    for what in ("UNet", "ControlNets", "VAE encode", "backward"):
        f, p = results["fused"]["calls"][what], results["per-branch"]["calls"][what]
        table.add_row(f"{what} calls", str(f), str(p), f"{p / f:.2f}" if f else "-")
    f, p = results["fused"]["peak"], results["per-branch"]["peak"]
    table.add_row("peak memory MiB", f"{f / 2**20:.1f}", f"{p / 2**20:.1f}", f"{p / f:.2f}" if f else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
