"""A stylize iteration at real size: a full-size SD 1.5 folder and the released PanoHead architecture (random
weights, built here: nothing is downloaded), run through `headstyle stylize` as a user runs it.

Built once into --cache (about 3.7 GB in fp16 at full size):
  sd15/               model_index.json; unet/ (SD 1.5's UNet2DConditionModel: 320-640-1280-1280, 2 layers a block,
                      cross-attention 768, 8 heads); vae/ (SD's AutoencoderKL: 128-256-512-512, 4 latent channels);
                      text_encoder/ (CLIP ViT-L/14's text tower: 12 layers, width 768, 49408 tokens); tokenizer/ (a
                      byte-level BPE, headstyle.priors.sd_folder); scheduler/ (SD 1.5's DDIM)
  controlnet-canny/, controlnet-depth/    ControlNetModel.from_unet of that UNet (SD 1.5 ControlNets' shape)
  panohead.safetensors (+ .json)          the released PanoHead (53.7M parameters, 256 px tri-grid, 48 + 48 samples
                                          per ray, SR to 512)
Then, per --precision, one child process runs `headstyle stylize` for --iterations at 512 px (the preset's
LD recipe: single view + mirror + 2x2 grid, canny and depth ControlNets, the Tweedie MSE; no previews, turntables
or stopping-rule checks, so the iterations are what is timed) and reports seconds per iteration (from the run's
log.jsonl: the first, and the median of the rest), the child's peak RSS (wait4) and, on CUDA, the allocator's peak.
fp32: weights and autocast off; bf16 / fp16: run.mixed_precision and the prior's weights in that dtype (the prior
stays fp32 on CPU, as the CLI says in its note).

    OMP_NUM_THREADS=16 python benchmarks/full_size.py [--precision fp32,bf16] [--iterations 2] [--device cpu]
    python benchmarks/full_size.py --tiny         # the tiny SD family and a reduced PanoHead: a smoke check (~1 min)
    python benchmarks/full_size.py --device cuda --check-devices   # one step in-process: every module where it belongs
    python benchmarks/full_size.py --device cuda --precision fp16 --accelerate   # through `accelerate launch`

Not part of `make bench` (a full-size CPU iteration takes minutes and several GB): `make bench-full-size`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FULL = "full"
TINY = "tiny"
PROMPT_WORDS = ["portrait", "of", "a", "werewolf", "photo", "face"]


def _sd15_models(seed: int) -> dict[str, Any]:
    """SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder with random weights, and two ControlNets from the UNet."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        sample_size=512, scaling_factor=0.18215,
    )  # fmt: skip
    # CLIP ViT-L/14's text tower; the tokenizer's own ids (<|startoftext|> 0, <|endoftext|> 1) mark its ends.
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    ))  # fmt: skip
    nets = {name: ControlNetModel.from_unet(unet) for name in ("canny", "depth")}
    return {"unet": unet, "vae": vae, "text_encoder": text, "controlnets": nets}


def build_sd15(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The full-size SD 1.5 folder and its two ControlNets under ``folder`` (fp16 safetensors), built once."""
    from diffusers import DDIMScheduler

    from headstyle.io import atomic_dir
    from headstyle.priors.sd_folder import write_clip_tokenizer, write_model_index

    paths = {"model": folder / "sd15", "canny": folder / "controlnet-canny", "depth": folder / "controlnet-depth"}
    done = folder / "sd15.done"
    if done.is_file():
        return paths
    t0 = time.perf_counter()
    models = _sd15_models(seed)
    with atomic_dir(paths["model"]) as tmp:
        write_clip_tokenizer(tmp / "tokenizer", PROMPT_WORDS)
        for name in ("unet", "vae", "text_encoder"):
            models[name].half().save_pretrained(tmp / name)
        DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False).save_pretrained(tmp / "scheduler")
        write_model_index(tmp)
    for name, net in models["controlnets"].items():
        with atomic_dir(paths[name]) as tmp:
            net.half().save_pretrained(tmp)
    done.write_text("built\n")
    print(f"built the SD 1.5 folder in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    return paths


def build_panohead(path: Path, kind: str) -> Path:
    """The released PanoHead architecture with random weights (``kind`` tiny: fewer channels, a 32 px tri-grid)."""
    from headstyle.generator.checkpoint import RELEASED_INIT_KWARGS, GeneratorConfig, build_generator, save_generator

    if path.is_file():
        return path
    init = copy.deepcopy(RELEASED_INIT_KWARGS)
    if kind == TINY:
        init.update(channel_base=1024, channel_max=64)
        init["rendering_kwargs"].update(triplane_size=32, depth_resolution=12, depth_resolution_importance=12)
    torch.manual_seed(0)
    save_generator(build_generator(GeneratorConfig.from_init_kwargs(init, 32 if kind == TINY else 64)), path)
    return path


def build_models(cache: Path, kind: str) -> dict[str, Path]:
    """Paths of the prior's folders and the generator for ``kind`` (full or tiny), built once into ``cache``."""
    from headstyle.testing import build_tiny_sd

    cache.mkdir(parents=True, exist_ok=True)
    if kind == TINY:
        tiny = build_tiny_sd(cache / "tiny-sd")
        sd = {"model": tiny.model, "canny": tiny.controlnets["canny"], "depth": tiny.controlnets["depth"]}
    else:
        sd = build_sd15(cache)
    return {**sd, "generator": build_panohead(cache / f"panohead-{kind}.safetensors", kind)}


def stylize_args(models: dict[str, Path], out: Path, precision: str, iterations: int, device: str) -> list[str]:
    """`headstyle stylize` of the werewolf preset on these models, timing only the iterations."""
    return [
        "stylize", "--preset", "werewolf", "--generator", str(models["generator"]), "--prior", str(models["model"]),
        "--canny-controlnet", str(models["canny"]), "--depth-controlnet", str(models["depth"]), "--out", str(out),
        "--iterations", str(iterations), "--device", device, "--no-progress",
        "--mixed-precision", "no" if precision == "fp32" else precision,
        "--set", f"model.prior_dtype={precision}", "--set", f"model.vae_dtype={precision}",
        "--set", "optim.stop_rule=none", "--set", "optim.stop_probes=1", "--set", "run.sample_identities=1",
        "--set", "run.sample_yaws=[0]", "--set", "run.turntable_identities=0", "--set", "run.keep_last=1",
    ]  # fmt: skip


def worker(argv: list[str]) -> None:
    """Run the command line in this process, then print the CUDA allocator's peak (MiB) as one JSON line."""
    from headstyle.cli import main

    sys.argv = ["headstyle", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(json.dumps({"cuda_peak_mib": peak}), flush=True)
    raise SystemExit(code)


# `accelerate launch` with one process, as the README's multi-GPU command with --num_processes 1.
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no", "-m", "headstyle"]  # fmt: skip


def measure(
    models: dict[str, Path], out: Path, precision: str, iterations: int, device: str, accelerate: bool = False
) -> dict[str, Any]:
    """One child process's stylize run: seconds per iteration, peak RSS and (not under accelerate) CUDA peak."""
    args = stylize_args(models, out, precision, iterations, device)
    command = [*ACCELERATE, *args] if accelerate else [sys.executable, __file__, "--worker", *args]
    t0 = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    stdout = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    print(stdout, end="", flush=True)
    if child.returncode != 0:
        raise SystemExit(f"stylize ({precision}) exited {child.returncode}: {' '.join(command)}")
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    seconds = [float(e["seconds"]) for e in lines if "seconds" in e]
    cuda = None if accelerate else json.loads(stdout.strip().splitlines()[-1])["cuda_peak_mib"]
    return {
        "precision": precision + (" (accelerate launch)" if accelerate else ""), "iterations": len(seconds),
        "first_s": seconds[0],
        "s_per_it": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "peak_rss_mib": usage.ru_maxrss / 1024, "cuda_peak_mib": cuda, "wall_s": wall,
    }  # fmt: skip


def check_devices(models: dict[str, Path], out: Path, device: str) -> None:
    """One step of the trainer built as the CLI builds it on ``device``: every parameter and buffer of the two
    generators, the UNet, the VAE, the ControlNets and the LPIPS lies there (the text encoder waits on the CPU
    by design); on CPU nothing was allocated on a GPU."""
    from headstyle.stylize.factory import build_from_config
    from headstyle.stylize.presets import resolve_config

    args = stylize_args(models, out, "fp32", 1, device)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    overrides += [f"model.generator={models['generator']}", f"model.prior={models['model']}",
                  f"model.canny_controlnet={models['canny']}", f"model.depth_controlnet={models['depth']}",
                  f"run.out={out}", f"run.device={device}"]  # fmt: skip
    trainer = build_from_config(resolve_config("werewolf", overrides=overrides))
    trainer.step()
    want = torch.device(device).type
    modules = {"G": trainer.G, "frozen": trainer.frozen, "unet": trainer.prior.unet, "vae": trainer.prior.vae,
               **{f"controlnet {k}": v for k, v in trainer.prior.controlnets.items()}}  # fmt: skip
    if trainer.ctx.lpips is not None:
        modules["lpips"] = trainer.ctx.lpips
    wrong = [f"{name}.{key} on {t.device}" for name, module in modules.items()
             for key, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type != want]  # fmt: skip
    if want == "cpu" and torch.cuda.is_available() and torch.cuda.memory_allocated() > 0:
        wrong.append(f"{torch.cuda.memory_allocated()} bytes allocated on CUDA by a CPU run")
    print(json.dumps({"device": device, "modules": sorted(modules), "misplaced": wrong[:10]}), flush=True)
    if wrong:
        raise SystemExit(f"device mismatch: {len(wrong)} tensors, e.g. {wrong[0]}")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--iterations", type=int, default=2, help="per run; the first is reported apart (warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "headstyle-full-size")
    parser.add_argument("--out", type=Path, default=None, help="run folders and results.json (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="tiny SD and a reduced PanoHead: checks the script only")
    parser.add_argument("--check-devices", action="store_true", help="one in-process step; every module on --device")
    parser.add_argument("--accelerate", action="store_true", help="run each through `accelerate launch` (1 process)")
    args = parser.parse_args()
    kind = TINY if args.tiny else FULL
    models = build_models(args.cache / kind, kind)
    out = args.out or Path(tempfile.mkdtemp(prefix="headstyle-full-size-"))
    if args.check_devices:
        check_devices(models, out / f"devices-{args.device}", args.device)
        return
    results = []
    for precision in [p.strip() for p in args.precision.split(",") if p.strip()]:
        if precision not in ("fp32", "bf16", "fp16"):
            raise SystemExit(f"--precision {precision!r}: choose fp32, bf16 or fp16")
        folder = out / f"{kind}-{precision}{'-accelerate' if args.accelerate else ''}"
        results.append(measure(models, folder, precision, args.iterations, args.device, args.accelerate))
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    print(f"\n{kind} size on {args.device} ({threads} threads), {args.iterations} iterations a run:")
    print("| precision | first iteration | s/iteration | peak RSS | CUDA peak |\n|---|---:|---:|---:|---:|")
    for r in results:
        cuda = "-" if r["cuda_peak_mib"] is None else f"{r['cuda_peak_mib']:.0f} MiB"
        rss = f"{r['peak_rss_mib']:.0f} MiB"
        print(f"| {r['precision']} | {r['first_s']:.1f} s | {r['s_per_it']:.1f} s | {rss} | {cuda} |")
    (out / "results.json").write_text(json.dumps({"kind": kind, "device": args.device, "runs": results}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
