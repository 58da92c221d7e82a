"""Crafted checkpoints that ask for more than they hold: refused before any network is built.

Files come from headstyle.crafted (pickles written opcode by opcode, JSON sidecars, stride-0
state dicts). Every one must end in a CheckpointError that names the file, in one line, and the
memory a load adds must stay within a small multiple of the file's size.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from headstyle import crafted, load_generator
from headstyle.generator.checkpoint import (
    CheckpointError,
    GeneratorConfig,
    build_generator,
    read_checkpoint,
    released_config,
    save_generator,
)
from headstyle.generator.triplane import TriPlaneGenerator

LAYERS_200K = crafted.released_kwargs(mapping_kwargs={"num_layers": 200_000})


def _rendering(**changes):
    return {**crafted.released_kwargs()["rendering_kwargs"], **changes}


def _write(folder: Path, name: str, data: bytes | str) -> Path:
    """Write a crafted file; a .json becomes the sidecar of a one-float NAME.safetensors, which is returned."""
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if path.suffix == ".json":
        save_file({"w": torch.zeros(1)}, str(path.with_suffix(".safetensors")))
        return path.with_suffix(".safetensors")
    return path


HOSTILE = {
    "layers200k.pkl": (crafted.kwargs_snapshot(LAYERS_200K), r"num_layers must be in \[1, 64\], got 200000"),
    "layers2000.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(mapping_kwargs={"num_layers": 2000})),
                       r"num_layers must be in \[1, 64\], got 2000"),
    "layers200k.json": (crafted.sidecar_json(LAYERS_200K), r"num_layers must be in \[1, 64\], got 200000"),
    "cyclic.pkl": (crafted.kwargs_snapshot(crafted.cyclic_dict()), "nests deeper than 6 levels"),
    "deep100k.pkl": (crafted.kwargs_snapshot(crafted.dict_ops({"z_dim": crafted.nested_list_ops(100_000)})),
                     r"_init_kwargs\.z_dim\[0\].* nests deeper than 6 levels"),
    "deep100k.json": (crafted.sidecar_json(crafted.deep_json(100_000)), "nests deeper than 64 levels"),
    "memo_bomb.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(sr_kwargs={"x": crafted.memo_bomb(50, 5)})),
                      "nests deeper than 6 levels"),
    "wide_memo.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(sr_kwargs={"x": [[[0] * 100] * 100] * 100})),
                      "holds more than 2048 values"),
    "module_cycle.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(),
                                                 _modules=crafted.dict_ops({"c": crafted.self_child_module_ops()})),
                         "malformed module tree in G_ema: module tree deeper than 32"),
    "kwargs_list.pkl": (crafted.kwargs_snapshot(crafted.ops([1, 2])), "malformed _init_args/_init_kwargs"),
    "unknown_key.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(num_ws=10**6)),
                        r"init_kwargs has an unknown setting 'num_ws'"),
    "z_dim_str.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(z_dim="512")),
                      r"init_kwargs\.z_dim must be an integer, got '512'"),
    "fused_int.json": (crafted.sidecar_json(crafted.released_kwargs(fused_modconv_default=1)),
                       r"fused_modconv_default must be one of True, False, 'inference_only', got 1"),
    "ray_nan.json": (crafted.sidecar_json(crafted.released_kwargs(rendering_kwargs=_rendering(ray_start=float("nan")))),
                     r"rendering_kwargs\.ray_start must be a finite number, got nan"),
    "ray_order.json": (crafted.sidecar_json(crafted.released_kwargs(rendering_kwargs=_rendering(ray_start=4.0))),
                       r"ray_start \(4\.0\) must be below ray_end \(3\.3\)"),
    "huge_planes.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(
        rendering_kwargs=_rendering(triplane_size=2**20))), r"triplane_size must be in \[4, 2048\]"),
    "nrr_list.pkl": (crafted.kwargs_snapshot(crafted.released_kwargs(), neural_rendering_resolution=crafted.ops([64])),
                     r"neural_rendering_resolution must be an integer, got \[64\]"),
    "module_kwarg.pkl": (crafted.kwargs_snapshot(crafted.dict_ops({
        **{k: crafted.ops(v) for k, v in crafted.released_kwargs().items()},
        "z_dim": b"ctorch.nn.modules.linear\nLinear\n)R",  # an allowed global (an inert record), not a plain value
    })), r"_init_kwargs\.z_dim is a Linear; only numbers, strings, lists and tables are allowed"),
    "sr_res.json": (crafted.sidecar_json(crafted.released_kwargs(img_resolution=256)),
                    r"does not describe a buildable generator \(SuperresolutionHybrid8XDC produces 512 px"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_config_is_a_one_line_checkpoint_error(tmp_path, name):
    data, message = HOSTILE[name]
    path = _write(tmp_path, name, data)
    with pytest.raises(CheckpointError, match=message) as err:
        load_generator(path)
    shown = str(err.value)
    # A sidecar's problem names the sidecar, or the .safetensors when only building shows it.
    assert shown.startswith(str(tmp_path / Path(name).stem) + ".") and "\n" not in shown and len(shown) < 600


def test_crafted_files_are_tiny():
    """The 200,000-layer request fits in ~1.5 KB: the reader, not the file, would spend the memory."""
    assert len(HOSTILE["layers200k.pkl"][0]) < 2000 and len(HOSTILE["layers200k.json"][0]) < 2500


MEASURE = r"""
import json, resource, sys, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails at 4 GiB, not on the whole machine
import torch
from headstyle.generator.checkpoint import CheckpointError, load_generator
torch.empty(1, device="meta") + 1  # torch imports its meta kernels (+ sympy) once per process: not the file's doing

def status(key):
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":")).split()[1]) * 1024

def load(path):
    try:
        load_generator(path)
        return "loaded"
    except CheckpointError as exc:
        return type(exc).__name__

out = {}
for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    rss = status("VmRSS")
    outcome = load(path)
    rss_added = status("VmHWM") - rss
    tracemalloc.start()  # a second pass: tracemalloc's own records would count in the RSS of the first
    load(path)
    out[path] = {"outcome": outcome, "rss_added": rss_added, "python_peak": tracemalloc.get_traced_memory()[1]}
    tracemalloc.stop()
print(json.dumps(out))
"""


def test_peak_memory_of_hostile_files_is_bounded(tmp_path):
    """Each load adds at most 64 x the bytes read + 16 MiB, in resident memory and in Python allocations.

    Measured here: 9.3 MiB of Python objects (8.9 MiB resident) for the 200 KB pickle of 100k nested
    lists (unpickling builds them before anything can look), 3.4 MiB resident for the in-range
    released.json (the meta-device network), kilobytes for the rest. Before the
    meta-device check, released.json (2 KB) built the 54M-parameter network (+213 MB) before "weights
    do not fit", stride0.pth (33 KB) would have loaded into it, and the 200,000- and 2,000-layer
    files grew to the 4 GiB cap or 2.2 GB (benchmarks/hostile_checkpoints.py prints both).
    Measured in a fresh process, with VmHWM reset through /proc/self/clear_refs before each load.
    """
    paths = [_write(tmp_path, name, HOSTILE[name][0]) for name in
             ("layers200k.pkl", "layers200k.json", "cyclic.pkl", "deep100k.pkl", "memo_bomb.pkl")]
    paths.append(_write(tmp_path, "released.json", crafted.sidecar_json(crafted.released_kwargs())))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TriPlaneGenerator(**released_config().init_kwargs).state_dict().items()}
    torch.save(crafted.stride0_state_dict(shapes), tmp_path / "stride0.pth")
    paths.append(tmp_path / "stride0.pth")
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, paths)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=True)
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in paths:
        size = path.stat().st_size + (path.with_suffix(".json").stat().st_size if path.suffix == ".safetensors" else 0)
        row = measured[str(path)]
        bound = 64 * size + (16 << 20)
        assert row["outcome"] == "CheckpointError", (path.name, row)
        assert row["rss_added"] <= bound and row["python_peak"] <= bound, (path.name, size, row)


# ------------------------------------------------------------------------------------------------
# The meta-device load itself


def test_load_checks_on_meta_then_materialises_exact_trainable_weights(parity_dir, tmp_path):
    ckpt = read_checkpoint(parity_dir)
    G = load_generator(parity_dir)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in ckpt.state_dict.items())
    assert not any(t.is_meta for t in G.state_dict().values()) and not G.training
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in G.parameters())
    # Stored fp16 loads into the fp32 network (cast, as load_state_dict does); integers are refused.
    half = {k: v.half() for k, v in ckpt.state_dict.items()}
    torch.save(half, tmp_path / "half.pth")
    G16 = load_generator(tmp_path / "half.pth", config=ckpt.config)
    assert all(v.dtype == torch.float32 for v in G16.state_dict().values())
    assert all(torch.equal(G16.state_dict()[k], v.float()) for k, v in half.items())
    torch.save({**ckpt.state_dict, "decoder.net.0.bias": torch.zeros(64, dtype=torch.int32)}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"int\.pth: .*dtype mismatch .*decoder\.net\.0\.bias torch\.int32"):
        load_generator(tmp_path / "int.pth", config=ckpt.config)


def test_shared_storage_is_refused(parity_dir, tmp_path):
    """Entries that view one storage claim more bytes than the file holds (a stride-0 view: a huge network)."""
    sd = dict(read_checkpoint(parity_dir).state_dict)
    a, b = "backbone.synthesis.b32.conv0.noise_const", "backbone.synthesis.b32.conv1.noise_const"
    assert sd[a].shape == sd[b].shape == (32, 32)
    sd[b] = sd[a]  # torch.save stores the storage once
    torch.save(sd, tmp_path / "alias.pth")
    with pytest.raises(CheckpointError, match=r"alias\.pth: its tensors claim (\d+) bytes but hold only") as err:
        load_generator(tmp_path / "alias.pth", config=parity_dir / "config.json")
    claimed, held = map(int, re.findall(r"\d+", str(err.value).split("claim")[1])[:2])
    assert claimed - held == 32 * 32 * 4


def test_overrides_are_validated_and_do_not_touch_the_callers_config(parity_dir):
    base = read_checkpoint(parity_dir).config
    before = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match=r"with the requested rendering overrides\): malformed generator config: "
                                              r"rendering_kwargs\.depth_resolution must be in \[1, 4096\]"):
        load_generator(parity_dir, rendering_overrides={"depth_resolution": 10**6})
    with pytest.raises(CheckpointError, match=r"neural_rendering_resolution must be in \[4, 1024\], got 100000"):
        load_generator(parity_dir, neural_rendering_resolution=100_000)
    assert base == before
    G = load_generator(parity_dir, neural_rendering_resolution=16, rendering_overrides={"depth_resolution": 5})
    assert G.neural_rendering_resolution == 16 and G.rendering_kwargs["depth_resolution"] == 5


def test_build_generator_validates(parity_dir):
    cfg = read_checkpoint(parity_dir).config
    bad = GeneratorConfig({**cfg.init_kwargs, "mapping_kwargs": {"num_layers": 200_000}}, cfg.rendering_kwargs, 32)
    with pytest.raises(CheckpointError, match=r"generator config: malformed generator config: .*num_layers"):
        build_generator(bad)


def test_saves_get_the_usual_permissions(parity_dir, tmp_path):
    """safetensors' save_file writes 0600; saves through atomic_path get 0666 less the umask, like any file."""
    umask = os.umask(0o022)
    os.umask(umask)
    weights, side = save_generator(load_generator(parity_dir), tmp_path / "G.safetensors")
    for path in (weights, side):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
