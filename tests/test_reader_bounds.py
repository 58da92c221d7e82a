"""Every weight reader checks what a file declares before it allocates (issue 38).

Each hostile file is a few hundred bytes to 2 MB that used to cost gigabytes before its one-line refusal:
a torch zip whose deflated storage inflates to 2 GiB (generator, face parser, ArcFace, FID Inception), a
TorchScript vgg16.pt whose stride-0 tensor was cloned (plain and deflated), CLIP / Depth Anything folders
whose config asks for weights the 68-byte model.safetensors lacks, an SD model folder whose UNet config asks
for wider layers than its weights hold, and Style Appearance Modules whose LoRA metadata asks for rank 131072
or a backtracking target pattern. Each is given to the real command line,
which must exit 2 with one line on stderr naming the file, no traceback, and a peak resident memory under
1.5 GiB.

The commands run one after another in one child process (importing torch, transformers and diffusers once),
its peak RSS reset before each (/proc/self/clear_refs) and read after (VmHWM), stderr captured at the file
descriptor; one case also runs as its own `python -m headstyle` process, measured by os.wait4's rusage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from headstyle import crafted
from headstyle.sfa.module import LORA_DIR, LORA_FILE, LORA_METADATA_KEY, StyleAppearanceModule, lora_problem
from headstyle.weight_files import (
    MAX_DEFLATE_RATIO,
    config_size_problem,
    coverage_problem,
    extent_problem,
    zip_problem,
)

PEAK_LIMIT = 3 << 29  # 1.5 GiB
INFLATED = 1 << 31  # what each deflated member inflates to: 2 GiB

BATCH = r"""
import json, os, resource, sys, tempfile, time, traceback
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a regression fails at 8 GiB, not on the whole machine
from headstyle.cli import main

def hwm():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1]) * 1024

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS
    err = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(err.fileno(), 2)
    sys.argv = ["headstyle", *argv]
    start = time.monotonic()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    err.seek(0)
    results[name] = {"code": code, "stderr": err.read().decode(errors="replace"), "peak": hwm(),
                     "seconds": time.monotonic() - start}
print(json.dumps(results))
"""


def _with_lora_metadata(module: Path, dest: Path, **changes: object) -> Path:
    """A copy of ``module`` whose LoRA file's LoraConfig metadata has ``changes`` (its weights unchanged)."""
    shutil.copytree(module, dest)
    file = dest / LORA_DIR / LORA_FILE
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata[LORA_METADATA_KEY]) | {f"unet.{k}": v for k, v in changes.items()}
    save_file(load_file(str(file)), str(file), metadata={**metadata, LORA_METADATA_KEY: json.dumps(config)})
    return dest


def _with_config(folder: Path, dest: Path, update: dict[str, dict[str, int]]) -> Path:
    """A copy of a transformers folder with sub-configs updated; with "weights": {} its weights are one float."""
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    for key, values in update.items():
        if key != "weights":
            config[key].update(values)
    (dest / "config.json").write_text(json.dumps(config))
    if "weights" in update:
        save_file({"x": torch.zeros(1)}, str(dest / "model.safetensors"))  # 68 bytes
    return dest


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_sd, clip_dir, depth_dir, parity_dir) -> dict[str, tuple[list[str], Path]]:
    """Case name -> (the command's arguments, the hostile file or folder they name)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("hostile")
    bomb = root / "bomb.pth"
    bomb.write_bytes(crafted.deflate_bomb_pth(INFLATED))
    shutil.copy(bomb, root / "bomb.pkl")  # a zip named .pkl: the generator reader goes by content
    (root / "stride0.pt").write_bytes(crafted.stride0_script())
    (root / "stride0_deflated.pt").write_bytes(crafted.stride0_script(deflated=INFLATED))
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(root / "crop.png")
    (root / "dataset.json").write_text(json.dumps({"labels": [["crop.png", [0.0] * 25]]}))
    big = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 6}
    clip_big = _with_config(clip_dir, root / "clip_big", {"text_config": big, "vision_config": big, "weights": {}})
    wide = {"hidden_size": 4096, "intermediate_size": 16384}  # the stored tensors' count, not their shapes
    clip_wide = _with_config(clip_dir, root / "clip_wide", {"text_config": wide, "vision_config": wide})
    depth_big = _with_config(depth_dir, root / "depth_big", {"backbone_config": big, "weights": {}})
    sd_wide = root / "sd_wide"  # the tiny SD model whose UNet config asks for 1280 channels
    shutil.copytree(tiny_sd.model, sd_wide)
    config = json.loads((sd_wide / "unet" / "config.json").read_text())
    config.update(block_out_channels=[640, 1280, 1280], norm_num_groups=32, attention_head_dim=8)
    (sd_wide / "unet" / "config.json").write_text(json.dumps(config))
    sd_missing = root / "sd_missing"  # one weight short: diffusers would initialise it at random, and go on
    shutil.copytree(tiny_sd.model, sd_missing)
    weights = sd_missing / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if k != "conv_out.bias"}, str(weights))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd.model / "unet")
    module = StyleAppearanceModule.from_unet(unet, lora_rank=2).save(root / "module", {})
    rank = _with_lora_metadata(module, root / "module_rank", r=131072)
    pattern = _with_lora_metadata(module, root / "module_pattern", target_modules="([\\w.]|[\\w.])*!")

    out = str(root / "out")
    parity = str(parity_dir)
    views = ["style-views", "--generator", parity, "--style-image", str(root / "crop.png"), "--out", out]
    prior = ["--prior", str(tiny_sd.model), "--vae", "", "--controlnet-depth", ""]
    evaluate = ["eval", "--base", parity, "--stylized", parity, "--out", out, "--no-dlib"]
    project = ["project", "--generator", parity, "--image", str(root / "crop.png"), "--out", out]
    return {
        "generator .pth": (["render", "--generator", str(bomb), "--out", out], bomb),
        "generator .pkl": (["render", "--generator", str(root / "bomb.pkl"), "--out", out], root / "bomb.pkl"),
        "mask parser": ([*views, "--mask-parser", str(bomb), "--mask-regions", "hair"], bomb),
        "arcface": ([*evaluate, "--arcface", str(bomb)], bomb),
        "inception": ([*evaluate, "--inception", str(bomb)], bomb),
        "vgg16 stride 0": ([*project, "--vgg16", str(root / "stride0.pt")], root / "stride0.pt"),
        "vgg16 deflated": ([*project, "--vgg16", str(root / "stride0_deflated.pt")], root / "stride0_deflated.pt"),
        "clip layers": ([*evaluate, "--clip", str(clip_big)], clip_big),
        "clip shapes": ([*evaluate, "--clip", str(clip_wide)], clip_wide),
        "depth anything": ([*evaluate, "--depth-anything", str(depth_big)], depth_big),
        "sd model": ([*views, "--prior", str(sd_wide), "--vae", "", "--controlnet-depth", ""], sd_wide / "unet"),
        "sd missing weight": ([*views, "--prior", str(sd_missing), "--vae", "", "--controlnet-depth", ""],
                              sd_missing / "unet"),
        "lora rank": ([*views, *prior, "--style-module", str(rank)], rank),
        "lora pattern": ([*views, *prior, "--style-module", str(pattern)], pattern),
    }


def _assert_refused(name: str, path: Path, code: int, stderr: str, peak: int) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (name, code, stderr[-2000:])
    assert str(path) in lines[0], (name, lines[0])
    assert peak < PEAK_LIMIT, (name, f"{peak / 2**20:.0f} MiB", lines[0])


def test_hostile_weight_files_are_refused_in_one_line_within_the_memory_bound(hostile):
    """Measured, each command in its own process (MiB of peak RSS, imports included; in brackets before these
    checks): generator .pth and .pkl 313 (2361), mask parser 326 (2425), ArcFace and Inception 258 (2303, 2389),
    vgg16 stride 0 237 (2286) and deflated 236 (4347), CLIP 405 and 409 (2718), Depth Anything 398 (1648), the
    wide SD UNet 463 (466, refused by diffusers once built on the meta device), the SD UNet one weight short
    (initialised at random before, and used), LoRA rank 474 (1939, and 115 lines of stderr), LoRA pattern 474
    (still matching when killed after 90 s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cases = {name: argv for name, (argv, _) in hostile.items()}
    proc = subprocess.run([sys.executable, "-c", BATCH, json.dumps(cases)], capture_output=True, text=True, env=env,
                          timeout=300, check=True)  # fmt: skip
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, path) in hostile.items():
        row = results[name]
        _assert_refused(name, path, row["code"], row["stderr"], row["peak"])
        assert row["seconds"] < 30, (name, row["seconds"])  # the pattern is never matched


# A small intermediate process starts the command and reports its rusage (os.wait4): a child's peak counts the
# memory of the process it was started from (Linux records the parent's high-water mark at exec, for fork
# and vfork alike), so it must not be started from this test process, which holds torch and the fixtures.
SPAWN = r"""
import json, os, sys, time
argv, err = json.loads(sys.argv[1]), sys.argv[2]
files = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
         (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "headstyle", *argv], os.environ, file_actions=files)
deadline = time.monotonic() + 120
while not (waited := os.wait4(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
    time.sleep(0.05)
if not waited[0]:
    os.kill(pid, 9)
    waited = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(waited[1]), "peak": waited[2].ru_maxrss * 1024}))
"""


def test_a_refusal_in_its_own_process(hostile):
    """The batch's measurement against a plain child: `python -m headstyle`, its rusage from os.wait4."""
    argv, path = hostile["generator .pth"]
    err = path.parent / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SPAWN, json.dumps(argv), str(err)], capture_output=True, text=True,
                          env=env, timeout=180, check=True)  # fmt: skip
    row = json.loads(proc.stdout)
    _assert_refused("own process", path, row["code"], err.read_text(), row["peak"])
    assert "inflates" in err.read_text()


# ------------------------------------------------------------------------------------------------
# The pure checks behind the refusals


def _member(name: str, stored: int, inflated: int, method: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type, info.compress_size, info.file_size = method, stored, inflated
    return info


def test_zip_directory_within_budget_and_ratio():
    budget = 100 << 20
    assert zip_problem([_member("a/data.pkl", 200, 200, zipfile.ZIP_STORED), _member("a/data/0", 9 << 20, 10 << 20)],
                       budget) is None  # fmt: skip
    assert zip_problem([_member("a/data/0", 100, 4000)], budget) is None  # small members may compress any amount
    bomb = zip_problem([_member("a/data/0", 2 << 20, 2 << 30)], 4 << 30)
    assert "inflates 1024-fold" in bomb
    assert zip_problem([_member("a/data/0", 1 << 20, MAX_DEFLATE_RATIO << 20)], budget) is None
    assert "declare 209715200 bytes, more than the 104857600" in zip_problem(
        [_member(f"a/data/{i}", 50 << 20, 50 << 20, zipfile.ZIP_STORED) for i in range(4)], budget)
    assert "compression method 14" in zip_problem([_member("a/data/0", 10, 10, zipfile.ZIP_LZMA)], budget)


def test_tensor_extents():
    w = torch.zeros(4, 3)
    fine = {"w": w, "b": torch.zeros(4), "transposed": torch.zeros(3, 4).t(), "slice": torch.zeros(10)[2:5]}
    assert extent_problem(fine) is None
    assert "claims 4000 bytes but its storage holds only 4" in extent_problem({"x": torch.zeros(()).expand(1000)})
    assert "claim 96 bytes but hold only 48" in extent_problem({"a": w, "b": w})  # one storage twice
    assert "not dense CPU tensors: m" in extent_problem({"m": torch.empty(3, device="meta")})


def test_config_against_stored_tensors():
    assert coverage_problem([(4, 4), (4,), (4,)], [(4,), (4, 4), (4,), (1, 77)]) is None  # extras are free
    problem = coverage_problem([(4096, 4096), (4096, 4096), (4,)], [(4,), (4, 4)])
    assert "asks for 3 tensors (33554436 values) but the weights lack 2 of them: 2 x (4096, 4096)" in problem
    assert config_size_problem({"text_config": {"num_hidden_layers": 12}}, 100) is None
    assert config_size_problem({"text_config": {"num_hidden_layers": 10**6}}, 100) == (
        "config.text_config.num_hidden_layers is 1000000, but the weights hold only 100 tensors")
    assert "config.neck lists 101 entries" in config_size_problem({"neck": [8] * 101}, 100)


@pytest.mark.parametrize(("change", "message"), [
    ({"r": 131072}, "r 131072 is not the manifest's lora_rank 2"),
    ({"r": True}, "r True is not"),
    ({"lora_alpha": math.nan}, "lora_alpha nan is not a finite positive number"),
    ({"lora_alpha": -2}, "lora_alpha -2"),
    ({"target_modules": "to_q|to_k"}, "is not a list of module names"),
    ({"target_modules": ["to_(q|k)"]}, "is not a list of module names"),
    ({"rank_pattern": {"^down.*": 64}}, "settings rank_pattern differ from peft's defaults"),
    ({"exclude_modules": ".*"}, "settings exclude_modules differ"),
    ({"surprise": 1}, "unknown LoraConfig settings surprise"),
])  # fmt: skip
def test_lora_metadata_is_range_checked(change, message):
    from peft import LoraConfig

    defaults = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]).to_dict()
    saved = json.loads(json.dumps(defaults, default=sorted)) | {"r": 2, "lora_alpha": 2.0, "target_modules": ["to_q"]}
    assert lora_problem(saved, defaults, 2) is None
    assert message in lora_problem(saved | change, defaults, 2)
