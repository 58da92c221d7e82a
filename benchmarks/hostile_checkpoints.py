"""Memory and time the generator and W+ code readers spend on crafted hostile files.

Each case crafts a small file (headstyle.crafted) and loads it in a fresh process: the table shows
the size of the files read, what the reader answered, the peak resident memory the load added
(the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs just before the load,
minus the RSS then) and the wall time. torch's meta-device kernels (with sympy, ~76 MB and ~2 s,
imported by the first meta-device op of a process) are loaded before measuring: a constant of the
first load, not something a file can grow. The loading process runs under an address-space cap
(--cap-gb), so a reader that would balloon fails at the cap instead of exhausting a shared machine.

    .venv/bin/python benchmarks/hostile_checkpoints.py [--src OTHER_CHECKOUT/src] [--cap-gb 4]

--src loads with another checkout's headstyle (e.g. `git archive HEAD~5 src | tar -x -C /tmp/old`)
while the files are still crafted with this one, for before/after numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from headstyle import crafted
from headstyle.generator.checkpoint import released_config
from headstyle.generator.triplane import TriPlaneGenerator

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
cap = int(float(sys.argv[4]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from headstyle.generator.latents import latents_from_npz
from headstyle.generator.checkpoint import load_generator
import torch
torch.empty(1, device="meta") + 1
kind, path = sys.argv[2], sys.argv[3]
def status(key):
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
rss = status("VmRSS")
t = time.perf_counter()
try:
    latents_from_npz(path, 14) if kind == "npz" else load_generator(path)
    outcome = "loaded"
except BaseException as exc:
    outcome = f"{type(exc).__name__}: {str(exc).split(': ', 1)[-1]}"
wall = time.perf_counter() - t
print(json.dumps({"outcome": outcome, "added_mb": (status("VmHWM") - rss) / 2**20, "wall_s": wall}))
"""


def craft(folder: Path) -> list[tuple[str, str, Path]]:
    """(case = the crafted file's name, reader kind, path to load) for every hostile file, written into ``folder``.

    For a JSON sidecar the path to load is the .safetensors beside it (one zero float).
    """
    cases: list[tuple[str, str, Path]] = []

    def add(name: str, data: bytes | str, kind: str = "ckpt", load: str | None = None) -> None:
        path = folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        cases.append((name, kind, folder / (load or name)))

    for layers in (200_000, 2_000):
        kwargs = crafted.released_kwargs(mapping_kwargs={"num_layers": layers})
        add(f"layers{layers}.pkl", crafted.kwargs_snapshot(kwargs))
    save_file({"w": torch.zeros(1)}, str(folder / "layers200000.safetensors"))
    add("layers200000.json", crafted.sidecar_json(crafted.released_kwargs(mapping_kwargs={"num_layers": 200_000})),
        load="layers200000.safetensors")
    # In range, but the weights are the reduced fixture's: the released network must not be built to see that.
    save_file({"w": torch.zeros(1)}, str(folder / "released.safetensors"))
    add("released.json", crafted.sidecar_json(crafted.released_kwargs()), load="released.safetensors")
    add("cyclic.pkl", crafted.kwargs_snapshot(crafted.cyclic_dict()))
    add("deep100k.pkl", crafted.kwargs_snapshot(crafted.dict_ops({"z_dim": crafted.nested_list_ops(100_000)})))
    save_file({"w": torch.zeros(1)}, str(folder / "deep.safetensors"))
    add("deep.json", crafted.sidecar_json(crafted.deep_json(100_000)), load="deep.safetensors")
    add("memo_bomb.pkl", crafted.kwargs_snapshot(crafted.released_kwargs(sr_kwargs={"x": crafted.memo_bomb(1000, 6)})))
    add("module_cycle.pkl", crafted.kwargs_snapshot(
        crafted.released_kwargs(), _modules=crafted.dict_ops({"child": crafted.self_child_module_ops()})))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TriPlaneGenerator(**released_config().init_kwargs).state_dict().items()}
    torch.save(crafted.stride0_state_dict(shapes), folder / "stride0.pth")
    cases.append(("stride0.pth", "ckpt", folder / "stride0.pth"))
    add("deflate_2GiB.pth", crafted.deflate_bomb_pth(1 << 31))  # a 2 MB zip whose storage record inflates to 2 GiB
    add("declared_28GB.npz", crafted.npz_declaring((10**6, 14, 512), data=b"\0" * 64), kind="npz")
    add("declared_2.7GB.npz", crafted.npz_declaring((10**5, 14, 512), data=b"\0" * 64), kind="npz")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    parser.add_argument("--cap-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"headstyle from {args.src}; address space capped at {args.cap_gb} GiB per load\n")
    print(f"| {'case':<22} | {'file':>9} | {'added MB':>8} | {'wall s':>6} | outcome")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 60}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, path in craft(Path(tmp)):
            size = sum({p: p.stat().st_size for p in (Path(tmp) / name, path)}.values())
            try:
                proc = subprocess.run([sys.executable, "-c", CHILD, args.src, kind, str(path), str(args.cap_gb)],
                                      capture_output=True, text=True, env=env, timeout=args.timeout)
                row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
                    "outcome": f"process died (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1][:80]}",
                    "added_mb": float("nan"), "wall_s": float("nan")}
            except subprocess.TimeoutExpired:
                row = {"outcome": f"still running after {args.timeout:.0f} s (killed)", "added_mb": float("nan"),
                       "wall_s": args.timeout}
            outcome = row["outcome"].replace("\n", " ")
            print(f"| {name:<22} | {size:>9,} | {row['added_mb']:>8.1f} | {row['wall_s']:>6.2f} | {outcome[:110]}")


if __name__ == "__main__":
    main()
