"""Training-state checkpoints that resume a run exactly, with no pickle anywhere.

A checkpoint is a folder ``<run>/checkpoints/iter_XXXXXXX/``:
  trainable.safetensors   the trainable generator parameters, by name
  optimizer.safetensors   the optimizer's per-parameter tensors (Adam: step, exp_avg, exp_avg_sq)
  state.json              iteration, counters, the optimizer's param_groups and non-tensor state
  rank{r}.safetensors     per process: torch CPU/CUDA RNG states, owned torch.Generators, and
                          tensors the trainer carries over (the previous identity's tri-grids)
  rank{r}.json            per process: numpy and python RNG states
  config.toml             the resolved config
  checksums.json          sha256 of every file above, written last
Every process writes into a hidden temp folder; after a barrier the main process renames it
into place (os.replace), so a checkpoint folder either is complete or does not exist. A resume
from a run folder takes the newest checkpoint whose files match their checksums.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from headstyle.input_files import InputError, read_json_object
from headstyle.io import atomic_path, atomic_write_text, content_digest

CHECKPOINT_DIR = "checkpoints"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"^iter_(\d{7})$")
# What a run writes into its folder (``clear_run`` removes exactly these).
RUN_FILES = ("config.toml", "log.jsonl", "log.csv", "generator.safetensors", "generator.json")
RUN_FOLDERS = (CHECKPOINT_DIR, "samples", "turntable", "tensorboard")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (other process count, other trainable parameters)."""


class RunExistsError(ResumeError):
    """A fresh run was asked to write into a folder that holds another run."""


def run_exists(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: its config, logs or checkpoints."""
    run_dir = Path(run_dir)
    return any((run_dir / name).exists() for name in ("config.toml", "log.jsonl", "log.csv", CHECKPOINT_DIR))


def check_fresh_run_dir(run_dir: str | Path) -> None:
    """Refuse to start a new run in a folder that holds one (its logs and checkpoints would mix)."""
    if run_exists(run_dir):
        raise RunExistsError(
            f"{run_dir} already holds a run: continue it with --resume {run_dir}, choose another --out, "
            "or pass --overwrite to clear it first"
        )


def clear_run(run_dir: str | Path) -> None:
    """Remove what a run wrote into ``run_dir`` (and nothing else) so a new run can start there."""
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint matches checksums.json, else what is wrong."""
    try:
        expected = read_json_object(path / CHECKSUMS, InputError)
    except InputError as exc:
        return f"{CHECKSUMS} is missing or unreadable ({str(exc).removeprefix(f'{path / CHECKSUMS}: ')})"
    if "state.json" not in expected:
        return f"{CHECKSUMS} does not list the checkpoint's files"
    for name, digest in expected.items():
        file = path / str(name)
        if not file.is_file():
            return f"{name} is missing"
        if content_digest(file) != digest:
            return f"{name} does not match its checksum"
    return None


@dataclass
class RankState:
    """What one process carries between iterations besides the shared weights and optimizer."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def capture_rng(generators: dict[str, torch.Generator]) -> RankState:
    """Every RNG state a run draws from: torch CPU (the renderer's jitter), CUDA, numpy, python, owned generators."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    # The legacy global numpy RNG is what libraries draw from, so its state is what a resume needs.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    return RankState(tensors, meta)


def restore_rng(state: RankState, generators: dict[str, torch.Generator]) -> None:
    """Inverse of capture_rng; a generator missing from the checkpoint is an error, not a silent reseed."""
    torch.set_rng_state(state.tensors["rng.torch_cpu"])
    cuda = sorted(k for k in state.tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.tensors[k] for k in cuda])
    for name, g in generators.items():
        key = f"rng.gen.{name}"
        if key not in state.tensors:
            raise KeyError(f"checkpoint has no RNG state for generator {name!r}")
        g.set_state(state.tensors[key])
    n = state.meta["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))  # noqa: NPY002
    p = state.meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["plain_state"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def on_cadence(iteration: int, every: int, last: int) -> bool:
    """Whether a checkpoint at ``iteration`` is on its run's cadence: every ``every`` iterations, and at ``last``
    (where the run ends); one a signal forced elsewhere is not."""
    return iteration % every == 0 or iteration == last


def run_folder(path: str | Path) -> Path:
    """The run folder of a checkpoint folder (RUN/checkpoints/iter_N), or ``path`` itself when it is a run folder."""
    path = Path(path)
    return path.parent.parent if (path / "state.json").is_file() else path


def resolve_checkpoint(path: str | Path, skipped: list[tuple[Path, str]] | None = None) -> Path:
    """A checkpoint folder (verified), or a run folder: its newest checkpoint that verifies; the corrupt newer
    ones are appended to ``skipped`` as (path, problem). Raises FileNotFoundError or ResumeError with the fix."""
    path = Path(path)
    if (path / "state.json").is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ResumeError(f"{path} is corrupt ({problem}); resume from its run folder to fall back to an older one")
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder (with state.json) nor a run folder with {CHECKPOINT_DIR}/iter_*; "
            "pass the --out folder of an earlier run or one of its checkpoints"
        )
    problems = []
    for ckpt in reversed(found):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            (skipped if skipped is not None else []).extend(problems)
            return ckpt
        problems.append((ckpt, problem))
    raise ResumeError(f"no checkpoint of {path} verifies (newest: {found[-1].name}: {problems[0][1]})")


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors through atomic_path: the file gets the usual permissions (save_file alone writes 0600)."""
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def save_checkpoint(
    run_dir: Path,
    iteration: int,
    trainable: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    rank_state: RankState,
    shared_meta: dict[str, Any],
    config_text: str,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 3,
) -> Path:
    """Write one checkpoint (all processes call this); returns its final path."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(iteration)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    _save_tensors(rank_state.tensors, tmp / f"rank{rank}.safetensors")
    atomic_write_text(tmp / f"rank{rank}.json", json.dumps(rank_state.meta))
    if rank == 0:
        _save_tensors({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        meta = {"iteration": iteration, "world_size": world_size, "optimizer": opt_meta, **shared_meta}
        atomic_write_text(tmp / "config.toml", config_text)
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
    barrier()
    if rank == 0:
        digests = {p.name: content_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_text(tmp / CHECKSUMS, json.dumps(digests, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    iteration: int
    meta: dict[str, Any]
    trainable: dict[str, Tensor]
    optimizer_tensors: dict[str, Tensor]
    rank_state: RankState


def load_checkpoint(path: str | Path, rank: int = 0, world_size: int = 1) -> LoadedCheckpoint:
    """Read a checkpoint for process ``rank`` (safetensors + JSON only; nothing is executed)."""
    path = resolve_checkpoint(path)
    meta = read_json_object(path / "state.json", ResumeError)
    if meta["world_size"] != world_size:
        raise ResumeError(
            f"{path} was written by {meta['world_size']} processes and is resumed with {world_size}; "
            "an exact resume needs the same number of processes "
            f"(accelerate launch --num_processes {meta['world_size']})"
        )
    rank_state = RankState(
        load_file(str(path / f"rank{rank}.safetensors")), read_json_object(path / f"rank{rank}.json", ResumeError)
    )
    return LoadedCheckpoint(
        path=path,
        iteration=int(meta["iteration"]),
        meta=meta,
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer_tensors=load_file(str(path / "optimizer.safetensors")),
        rank_state=rank_state,
    )


def continue_or_clear(run_dir: Path) -> Path | None:
    """``run_dir`` when it holds a checkpoint to continue from; else None, after clearing what a run cut before its
    first checkpoint left there (commands that restart their unfinished runs by themselves)."""
    if list_checkpoints(run_dir):
        return run_dir
    clear_run(run_dir)
    return None


def load_weights(module: nn.Module, path: str | Path) -> Path:
    """Copy a checkpoint's trained tensors into ``module``'s parameters of the same names (the others stay as they
    are); ``path``: a checkpoint, or a run folder (its newest verified checkpoint). Returns the checkpoint."""
    path = resolve_checkpoint(path)
    trained = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    return path
