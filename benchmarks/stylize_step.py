"""Cost of one stylize iteration, by stage: headstyle's step against the LD script's structure (train_LD.py).

ours:    Stylizer.step() as shipped: each generator's tri-grid computed ONCE per identity and every camera
         (single view, mirror, 2x2 grid; trainable and frozen) rendered from it; the frozen generator renders
         only what is read; ONE VAE encode, ONE UNet call (each branch with its ControlNet), ONE backward.
script:  the training script's structure, written out here with the same library pieces: the single view and
         its mirror each rendered by the trainable generator (a backbone pass each), the frozen SR render for
         the canny control, two VAE encodes and a UNet CFG call, a backward; then the grid: per camera a
         trainable and a frozen render (a backbone pass each), a VAE encode, a UNet CFG call, a backward.
Stages are timed with hooks, in process CPU time on CPU (run it with OMP_NUM_THREADS=1; other processes
on the machine then do not skew the ratio) and wall time on CUDA: backbone (the tri-grid), render
(synthesis minus backbone and SR), SR, VAE encode, ControlNets, UNet, backward, optimizer, other; plus
call counts and peak memory (CUDA: allocator peak; CPU: torch.profiler running allocation peak).
Medians over --steps after one warm-up step, the two variants alternating step by step; the ratio is
ours / script within this run. --mixed-precision bf16 runs ours as run.mixed_precision=bf16 runs it (bf16
autocast for generator and prior, fp32 loss math and optimizer); the script keeps fp32, as train_LD.py runs
the generator.

    .venv/bin/python benchmarks/stylize_step.py [--steps 3] [--generator lab|panohead|panohead-full] [--device cpu]
        [--mixed-precision no|bf16]
"""

from __future__ import annotations

import argparse
import copy
import math
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

from headstyle import cameras
from headstyle.distill import shaping
from headstyle.distill.inject import inject
from headstyle.distill.objectives import DistillTarget, ld
from headstyle.distill.timesteps import sample_ddim_steps
from headstyle.generator.checkpoint import RELEASED_INIT_KWARGS, GeneratorConfig, build_generator
from headstyle.lab.world.generator import LabGenerator
from headstyle.priors import controls
from headstyle.priors.base import Control
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.priors.loading import PriorSpec, load_prior
from headstyle.stylize.branches import grid_image
from headstyle.stylize.config import StylizeConfig, apply_overrides
from headstyle.stylize.regularisers import relative_distance
from headstyle.stylize.trainer import Stylizer
from headstyle.testing import build_tiny_sd
from objectives import _peak_bytes


def clock_now() -> float:
    """Process CPU seconds on CPU runs (robust to other processes sharing the cores; run with one thread), wall
    seconds on CUDA (the GPU's work is not CPU time)."""
    return time.process_time() if CPU_TIME else time.perf_counter()


CPU_TIME = True
STAGES = ("backbone", "render", "SR", "VAE encode", "ControlNets", "UNet", "backward", "optimizer", "other")


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
            start.append(clock_now())

        def post(*_: Any) -> None:
            self._sync()
            self.seconds[stage] += clock_now() - start.pop()
            self.calls[stage] += 1

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo += [h.remove for h in handles]

    def method(self, owner: Any, name: str, stage: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = clock_now()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self.seconds[stage] += clock_now() - t0
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
        t0 = clock_now()
        original(self, *args, **kwargs)
        clock._sync()
        clock.seconds["backward"] += clock_now() - t0
        clock.calls["backward"] += 1

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


def make_generator(kind: str) -> torch.nn.Module:
    """lab: the synthetic lab generator; panohead: a reduced PanoHead with the 512 px SR; panohead-full: the
    released PanoHead's architecture (53.7M parameters, 256 px tri-grid, 48 + 48 samples per ray) with
    random weights."""
    if kind == "lab":
        G = LabGenerator(resolution=16, sr_factor=4, seed=0)
        G.rendering_kwargs["depth_resolution"] = 12
        return G
    init = copy.deepcopy(RELEASED_INIT_KWARGS)
    if kind == "panohead":
        init.update(channel_base=1024, channel_max=64)
        init["rendering_kwargs"].update(triplane_size=32, depth_resolution=12, depth_resolution_importance=12)
    torch.manual_seed(0)
    return build_generator(GeneratorConfig.from_init_kwargs(init, 32 if kind == "panohead" else 64))


class ScriptStep:
    """One iteration with train_LD.py's structure (see the module docstring), on the same generator, prior,
    config and maths as the Stylizer it is built beside (its optimizer, frozen copy and prompt)."""

    def __init__(self, stylizer: Stylizer) -> None:
        self.st = stylizer
        self.G, self.frozen, self.prior, self.cfg = stylizer.G, stylizer.frozen, stylizer.prior, stylizer.cfg
        self.optimizer = stylizer.optimizer
        self.rng = torch.Generator().manual_seed(1)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None
        self.size = stylizer.ctx.image_size

    def _target(self, latents: torch.Tensor, control: Control | None) -> DistillTarget:
        o = self.cfg.objective
        ts = sample_ddim_steps(1, o.min_step_index, o.max_step_index, timesteps=self.st.timesteps, generator=self.rng)
        return DistillTarget(latents, self.st.prompt, ts.t, torch.randn(latents.shape, generator=self.rng),
                             control=control, step_index=ts.step_index)  # fmt: skip

    def _shape(self, grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sh = self.cfg.shaping
        return shaping.postprocess(grad, mask, sh.scale, sh.clamp)[0]

    def step(self) -> None:
        cfg, dev, kw = self.cfg, self.st.device, {"generate_background": False}
        s = cfg.single
        ws = self.st._mapping(1)
        self.optimizer.zero_grad(set_to_none=False)
        # Single view and mirror: each camera its own synthesis (backbone + SR), the frozen SR render for canny.
        c = cameras.sample_front_cameras(1, self.rng, math.radians(s.yaw_range), math.radians(s.pitch_range))[0]
        out = self.G.synthesis(ws, c.to(dev), **kw)
        out_m = self.G.synthesis(ws, cameras.mirror(c).to(dev), **kw)
        with torch.no_grad():
            fro = self.frozen.synthesis(ws, c.to(dev), **kw)
        lat = self.prior.encode(shaping.resize_to(out.image, self.size)).float()
        lat_m = self.prior.encode(shaping.resize_to(out_m.image, self.size)).float()
        canny = None
        if "canny" in self.prior.control_names:
            canny = Control("canny", controls.canny_control(shaping.resize_to(fro.image, self.size), 50.0, 250.0))
        (res,) = ld(self.prior, [self._target(lat, canny)], guidance_scale=cfg.prompt.guidance_scale)
        grad = shaping.rank_reweight(res.grad, s.rank_weights, s.restandardize) if s.rank_weights else res.grad
        g, g_m = shaping.mirror_gradients(grad, s.base_weight, s.mirror_weight)
        loss = inject(lat, self._shape(g, out.mask)) + inject(lat_m, self._shape(g_m, out_m.mask))
        if self.prev is not None:
            loss = loss + relative_distance(self.prev[0], fro.planes, self.prev[1], out.planes)
        self.prev = (fro.planes.detach(), out.planes.detach())
        loss.backward()
        # Grid: four cameras, each a trainable raw render and a frozen one (backbone each), one encode, one call.
        cams = cameras.sample_360_cameras(4, self.rng, math.radians(cfg.grid.pitch_range))[0].to(dev)
        raws, frozen = [], []
        for k in range(4):
            raws.append(self.G.synthesis(ws, cams[k : k + 1], render_sr=False, **kw))
            with torch.no_grad():
                frozen.append(self.frozen.synthesis(ws, cams[k : k + 1], render_sr=False, **kw))
        lat_g = self.prior.encode(grid_image(torch.cat([r.image_raw for r in raws]), self.size)).float()
        mask = torch.cat([f.mask for f in frozen])
        depth = None
        if "depth" in self.prior.control_names:
            depth = Control("depth", grid_image(controls.depth_control(torch.cat([f.depth for f in frozen]), mask),
                                                self.size))  # fmt: skip
        (res_g,) = ld(self.prior, [self._target(lat_g, depth)], guidance_scale=cfg.prompt.guidance_scale)
        inject(lat_g, self._shape(res_g.grad, grid_image(mask, 2 * mask.shape[-1]))).backward()
        self.optimizer.step()


def instrument(stylizers: list[Stylizer], prior: DiffusersPrior, clock: StageClock) -> None:
    for st in stylizers:
        for G in (st.G, st.frozen):
            clock.method(G, "synthesis", "synthesis")
            clock.method(G, "trigrid", "backbone")
            clock.module(G.superresolution, "SR")
        clock.method(st.optimizer, "step", "optimizer")
    clock.method(prior, "encode", "VAE encode")
    clock.module(prior.unet, "UNet")
    for net in prior.controlnets.values():
        clock.module(net, "ControlNets")


def measure(variants: dict[str, Any], prior: DiffusersPrior, steps: int, device: torch.device) -> dict:
    """Per variant: median ms per stage, calls per iteration and peak memory. Variants alternate step by step,
    so a machine whose load drifts slows both alike."""
    clock = StageClock(device)
    instrument([v.st if isinstance(v, ScriptStep) else v for v in variants.values()], prior, clock)
    totals: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in variants}
    calls: dict[str, dict[str, int]] = {}
    with timed_backward(clock):
        for variant in variants.values():  # warm-up
            variant.step()
        for _ in tqdm(range(steps), desc="iterations", leave=False):
            for name, variant in variants.items():
                clock.reset()
                t0 = clock_now()
                variant.step()
                clock._sync()
                total = clock_now() - t0
                s = clock.seconds
                # A synthesis call that computes its own tri-grid calls trigrid inside: backbone time is in both.
                stage = {
                    "backbone": s["backbone"],
                    "render": s["synthesis"] - s["SR"] - s["backbone"],
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
                calls[name] = {k: clock.calls[k] for k in ("backbone", "UNet", "ControlNets", "VAE encode", "backward")}
        peaks = {name: _peak_bytes(variant.step, device) for name, variant in variants.items()}
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
    parser.add_argument("--generator", choices=("lab", "panohead", "panohead-full"), default="lab")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no", help="ours' run.mixed_precision")
    args = parser.parse_args()
    device = torch.device(args.device)
    global CPU_TIME
    CPU_TIME = device.type == "cpu"

    with tempfile.TemporaryDirectory() as tmp:
        sd = build_tiny_sd(Path(tmp) / "sd")
        prior = load_prior(PriorSpec(sd.model, "", sd.controlnets), device)
        overrides = ["prompt.prompt=portrait of a werewolf", f"run.device={device.type}", "regularisers.tweedie_mse=0",
                     f"run.mixed_precision={args.mixed_precision}"]  # fmt: skip
        if args.generator == "lab":
            overrides.append("single.rank_weights=[1, 0.75, 0.5]")  # the lab prior sees 3 channels
        ours = Stylizer(apply_overrides(StylizeConfig(), [*overrides, f"run.out={tmp}/ours"]),
                        make_generator(args.generator), prior)  # fmt: skip
        script = Stylizer(apply_overrides(StylizeConfig(), [*overrides, f"run.out={tmp}/script"]),
                          make_generator(args.generator), prior)  # fmt: skip
        results = measure({"ours": ours, "script": ScriptStep(script)}, prior, args.steps, device)

    table = Table(
        title=f"stylize iteration on {device.type} ({args.generator} generator, tiny SD + 2 ControlNets), "
        f"median of {args.steps}, {'process CPU' if CPU_TIME else 'wall'} ms; ours in "
        f"{'bf16 autocast' if args.mixed_precision == 'bf16' else 'fp32'}, script in fp32"
    )
    table.add_column("stage")
    for name in results:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("ours / script", justify="right")
    for stage in (*STAGES, "total"):
        o, sc = results["ours"]["ms"][stage], results["script"]["ms"][stage]
        table.add_row(stage, f"{o:.1f}", f"{sc:.1f}", f"{o / sc:.2f}" if sc > 0.05 else "-")
    for what in ("backbone", "UNet", "ControlNets", "VAE encode", "backward"):
        o, sc = results["ours"]["calls"][what], results["script"]["calls"][what]
        table.add_row(f"{what} calls", str(o), str(sc), f"{o / sc:.2f}" if sc else "-")
    o, sc = results["ours"]["peak"], results["script"]["peak"]
    table.add_row("peak memory MiB", f"{o / 2**20:.1f}", f"{sc / 2**20:.1f}", f"{o / sc:.2f}" if sc else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
