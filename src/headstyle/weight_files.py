"""Weight files read within a budget: torch files (zip or legacy pickle), safetensors, config + weights folders.

A weights file is untrusted input, and a few kilobytes can describe gigabytes: a deflated zip member that
inflates a thousandfold, a tensor that views one float with stride 0 and is then copied into a full one, a
config whose weights are absent and would be initialised. So every reader here compares what a file declares
with what the caller's architecture justifies (``weights_budget`` of its value count) before anything of that
size exists, and raises the caller's error class (a ValueError the command line shows as one line, exit 2)
naming the file, what was wrong and what to give instead. The checks themselves are pure functions that
return the problem, or None.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from headstyle.input_files import read_json, read_json_object

MiB = 1 << 20
# The widest value a state dict of float weights holds (float64): a genuine file needs at most this per value.
WIDEST_ITEMSIZE = 8
# Room for the pickle and small records of a torch zip (data.pkl, byteorder, version) besides tensor data.
RECORD_ROOM = 16 * MiB
# torch.save stores its members uncompressed, and trained weights deflate by a few percent: a member that
# inflates more than this (above MiB) is a decompression bomb, whatever the budget.
MAX_DEFLATE_RATIO = 16
# The largest config.json a config + weights folder may have (released ones are a few KB).
MAX_CONFIG_BYTES = MiB
# The JSON files transformers parses from a model folder besides config.json (processors and tokenizers).
FOLDER_JSON = ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
               "vocab.json")  # fmt: skip

ErrorType = type[ValueError]


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the fix."""


def weights_budget(numel: int) -> int:
    """The most bytes a genuine weights file of an architecture with ``numel`` values needs (each value as wide
    as float64, plus its records): what a reader may allocate for it, at most."""
    return WIDEST_ITEMSIZE * numel + RECORD_ROOM


def meta_numel(build: Callable[[], nn.Module]) -> int:
    """The number of values in the state dict of the module ``build`` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() for t in module.state_dict().values())


def first(names: Sequence[str], n: int = 5) -> str:
    """'a, b, c' or 'a, b, c, ... (12 in all)': a short list for a one-line message."""
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# Pure checks


def size_problem(size: int, max_bytes: int) -> str | None:
    """A file of ``size`` bytes read whole, against the budget."""
    return f"it has {size} bytes, more than the {max_bytes} the expected weights can take" if size > max_bytes else None


def zip_problem(members: Sequence[zipfile.ZipInfo], max_bytes: int) -> str | None:
    """What is wrong with a zip directory whose members would be inflated, before any is: a compression other
    than stored/deflated, more declared bytes than ``max_bytes``, or a member that inflates like a bomb."""
    for m in members:
        if m.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return f"member {m.filename} uses compression method {m.compress_type} (only stored or deflated is read)"
        if m.compress_type == zipfile.ZIP_DEFLATED and m.file_size > max(MiB, MAX_DEFLATE_RATIO * m.compress_size):
            return (f"member {m.filename} inflates {m.file_size / max(m.compress_size, 1):.0f}-fold "
                    f"({m.compress_size} -> {m.file_size} bytes), which no genuine checkpoint does")  # fmt: skip
    declared = sum(m.file_size for m in members)
    if declared > max_bytes:
        return f"its members declare {declared} bytes, more than the {max_bytes} the expected weights can take"
    return None


def extent_problem(tensors: Mapping[str, Tensor]) -> str | None:
    """What is wrong with tensors about to be copied into a network: not dense CPU tensors, or claiming more bytes
    than their storages hold (a stride-0 or overlapping view of a small storage dressed as a large tensor).

    After this passes, copying every tensor costs at most the bytes of the storages the file supplied.
    """
    not_dense = [str(k) for k, t in tensors.items() if t.layout != torch.strided or t.device.type != "cpu"]
    if not_dense:
        return f"not dense CPU tensors: {first(not_dense)}"
    for name, t in tensors.items():
        claimed, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        if claimed > held:
            return (f"tensor {name} {tuple(t.shape)} claims {claimed} bytes but its storage holds only {held} "
                    "(a view that repeats its data, e.g. stride 0)")  # fmt: skip
    claimed = sum(t.numel() * t.element_size() for t in tensors.values())
    held = sum({s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in tensors.values())}.values())
    if claimed > held:
        return (f"its tensors claim {claimed} bytes but hold only {held} (views that repeat or share data); "
                "a genuine checkpoint stores every tensor's own values")  # fmt: skip
    return None


def state_problems(
    expected: Mapping[str, Sequence[int]], stored: Mapping[str, Sequence[int]], label: str = "file vs model"
) -> list[str]:
    """The missing, unexpected and mis-shaped names of ``stored`` against ``expected`` (name -> shape), as
    message parts ('missing keys: a, b', ...); empty when they agree."""
    missing = [k for k in expected if k not in stored]
    unexpected = [str(k) for k in stored if k not in expected]
    shapes = [f"{k} {tuple(stored[k])} vs {tuple(v)}" for k, v in expected.items()
              if k in stored and tuple(stored[k]) != tuple(v)]  # fmt: skip
    parts = []
    if missing:
        parts.append(f"missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch ({label}): {first(shapes, 3)}")
    return parts


def coverage_problem(expected: Iterable[Sequence[int]], stored: Iterable[Sequence[int]]) -> str | None:
    """Whether the tensors a config asks for (their shapes) are all among those a folder stores, names aside:
    names may be mapped on loading, shapes are not. Extra stored tensors cost nothing and are allowed."""
    want, have = Counter(tuple(s) for s in expected), Counter(tuple(s) for s in stored)
    lacking = want - have
    if not lacking:
        return None
    values = sum(math.prod(s) * n for s, n in want.items())
    shapes = [f"{n} x {s}" for s, n in sorted(lacking.items(), key=lambda kv: -math.prod(kv[0]))]
    return (f"its config asks for {sum(want.values())} tensors ({values} values) but the weights lack "
            f"{sum(lacking.values())} of them: {first(shapes, 3)}")  # fmt: skip


def config_size_problem(config: Any, tensors: int, where: str = "config") -> str | None:
    """A layer count (an integer setting named ``*layers*``) or a list in a model config that exceeds the number
    of tensors in its weights: every layer and listed block holds at least one, and building the model even on
    the meta device takes time in their number."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            name = f"{where}.{key}"
            count = isinstance(value, int) and not isinstance(value, bool) and "layers" in str(key)
            if count and value > tensors:
                return f"{name} is {value}, but the weights hold only {tensors} tensors"
            if problem := config_size_problem(value, tensors, name):
                return problem
    elif isinstance(config, list):
        if len(config) > tensors:
            return f"{where} lists {len(config)} entries, but the weights hold only {tensors} tensors"
        for i, value in enumerate(config):
            if problem := config_size_problem(value, tensors, f"{where}[{i}]"):
                return problem
    return None


def weights_only_reason(exc: BaseException) -> str:
    """The cause in torch's weights-only refusal (an unsupported global or opcode), without its advice to retry
    with weights_only=False."""
    text = str(exc)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    # the cause follows the marker, or stands between torch's advice and its documentation link (both mention
    # weights_only)
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line]
    reason = lines[0].split(". ")[0] if lines else "it holds objects other than tensors and plain containers"
    return reason if len(reason) <= 160 else reason[:157] + "..."


# ---------------------------------------------------------------------------------------------
# Readers


def torch_size_problem(file: BinaryIO, max_bytes: int) -> str | None:
    """What a torch file (zip or legacy pickle, opened at its start) declares beyond ``max_bytes``: a zip's
    directory is checked (zip_problem) before any member is inflated, a legacy pickle's size before it is read."""
    if file.read(4) != b"PK\x03\x04":  # torch's own test for its zip format
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        return size_problem(size, max_bytes)
    file.seek(0)
    try:
        with zipfile.ZipFile(file) as archive:
            return zip_problem(archive.infolist(), max_bytes)
    except zipfile.BadZipFile as exc:
        return f"not a readable zip archive ({exc})"
    finally:
        file.seek(0)


def read_torch(
    path: str | os.PathLike, max_bytes: int, error: ErrorType, hint: str, refused: ErrorType | None = None
) -> Any:
    """torch.load(weights_only=True) of a file whose declared sizes fit ``max_bytes`` (torch_size_problem).
    Nothing in the file is executed; a refusal of the weights-only reader raises ``refused`` (default ``error``)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file; {hint}")
    with open(path, "rb") as f:
        problem = torch_size_problem(f, max_bytes)
    if problem:
        raise error(f"{path}: {problem}; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise (refused or error)(f"{path}: refused by the weights-only reader ({weights_only_reason(exc)}); nothing "
                                 f"of it was executed. {hint[:1].upper()}{hint[1:]}") from None  # fmt: skip
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise error(f"{path}: not a readable torch file ({type(exc).__name__}: {reason}); {hint}") from None


def safetensors_header(path: str | os.PathLike, error: ErrorType, hint: str) -> tuple[dict[str, tuple], dict]:
    """(name -> shape, metadata) of a safetensors file, from its header alone (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise error(f"{path}: not a readable safetensors file ({str(exc)[:200]}); {hint}") from None


def read_state_dict(
    path: str | os.PathLike,
    max_bytes: int,
    error: ErrorType,
    hint: str,
    nests: Sequence[str] = (),
    refused: ErrorType | None = None,
) -> dict[str, Tensor]:
    """A name -> tensor mapping from .safetensors or a torch file (read_torch), within ``max_bytes`` and with every
    tensor holding its own data (extent_problem). ``nests``: keys under which a torch file may hold it (e.g.
    "state_dict"), tried level by level."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise error(f"{path}: no such file; {hint}")
        if problem := size_problem(path.stat().st_size, max_bytes):
            raise error(f"{path}: {problem}; {hint}")
        safetensors_header(path, error, hint)
        obj: Any = load_file(str(path))
    else:
        obj = read_torch(path, max_bytes, error, hint, refused)
    found = type(obj).__name__
    for _ in range(len(nests) + 1):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            state = dict(obj)
            if problem := extent_problem(state):
                raise error(f"{path}: {problem}; {hint}")
            return state
        obj = next((obj[k] for k in nests if isinstance(obj.get(k), Mapping)), None)
    raise error(f"{path}: not a state dict (a mapping of names to tensors; found a {found}); {hint}")


def read_config_json(path: Path, error: ErrorType, hint: str) -> dict[str, Any]:
    """A model folder's config.json (or index): at most MAX_CONFIG_BYTES of JSON holding an object."""
    if not path.is_file():
        raise error(f"{path.parent}: no {path.name}; {hint}")
    return read_json_object(path, error, hint, max_bytes=MAX_CONFIG_BYTES)


def check_folder_json(folder: Path, error: ErrorType, hint: str) -> None:
    """Every FOLDER_JSON file in ``folder`` within read_json's size and depth, checked before transformers parses
    it (its json.load recurses once per level of nesting)."""
    for name in FOLDER_JSON:
        if (folder / name).is_file():
            read_json(folder / name, error, hint)


def folder_safetensors(folder: Path, stem: str, error: ErrorType, hint: str) -> list[Path]:
    """The safetensors files a from_pretrained folder loads: ``stem``.safetensors, or the shards its
    ``stem``.safetensors.index.json names (inside the folder)."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise error(f"{folder}: no {single.name} (nor a sharded {index.name}); {hint}")
    weight_map = read_config_json(index, error, hint).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{index}: no weight_map of tensor names to shard files; {hint}")
    shards = sorted({folder / v for v in weight_map.values()})
    outside = [str(s) for s in shards if s.parent != folder or not s.is_file()]
    if outside:
        raise error(f"{index}: names shards that are not files in the folder ({first(outside, 2)}); {hint}")
    return shards


def folder_shapes(files: Sequence[Path], error: ErrorType, hint: str) -> dict[str, tuple]:
    """name -> shape over every file's header; a name stored twice is refused."""
    shapes: dict[str, tuple] = {}
    for file in files:
        part, _ = safetensors_header(file, error, hint)
        twice = sorted(part.keys() & shapes.keys())
        if twice:
            raise error(f"{file}: tensors stored in two shards ({first(twice, 3)}); {hint}")
        shapes.update(part)
    return shapes


def expected_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    """The shapes of the tensors a (meta-device) module loads: its parameters, tied ones once, and its persistent
    buffers."""
    persistent = module.state_dict().keys()
    return [tuple(p.shape) for _, p in module.named_parameters()] + [
        tuple(b.shape) for name, b in module.named_buffers() if name in persistent
    ]


def load_strict(module: nn.Module, state: dict[str, Tensor], path: str | os.PathLike, what: str) -> None:
    """Load ``state`` into ``module`` requiring the same names and shapes; a WeightsError names the difference.

    Batch norms' ``num_batches_tracked`` counters may be present or not (converted files drop them;
    they play no part in evaluation)."""

    def counted(d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in d.items() if not k.endswith("num_batches_tracked")}

    own, state = counted(module.state_dict()), counted(state)
    problems = state_problems({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()})
    if problems:
        raise WeightsError(f"{Path(path)} is not {what}: {'; '.join(problems)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def load_checked(
    folder: Path,
    stem: str,
    build: Callable[[], nn.Module],
    load: Callable[[], tuple[Any, Mapping[str, Any]]],
    error: ErrorType,
    hint: str,
) -> Any:
    """A from_pretrained model of a config + safetensors folder, loaded (``load``: the model and its loading info)
    only once the config is known to ask for no more than the weights hold.

    First the config's layer counts and lists are checked against the number of stored tensors
    (config_size_problem), then the model is built on the meta device (``build``) and every tensor it would
    load must be among the stored ones (``stem``.safetensors or its shards) by shape (coverage_problem):
    nothing is allocated for weights the folder lacks. After loading, a weight the library reports missing
    or unexpected is refused too, rather than initialised at random; buffers the model computes itself may
    be stored or not. (A mis-shaped weight already fails the library's load.)
    """
    config = read_config_json(folder / "config.json", error, hint)
    shapes = folder_shapes(folder_safetensors(folder, stem, error, hint), error, hint)
    if problem := config_size_problem(config, len(shapes)):
        raise error(f"{folder}/config.json: {problem}; {hint}")
    try:
        with torch.device("meta"):
            meta = build()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise error(f"{folder}: not a loadable model config ({type(exc).__name__}: {str(exc)[:200]}); {hint}") from None
    if problem := coverage_problem(expected_shapes(meta), shapes.values()):
        raise error(f"{folder}: {problem}; {hint}")
    computed = {name for name, _ in meta.named_buffers()} - meta.state_dict().keys()
    try:
        model, info = load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise error(f"{folder}: not a loadable model ({type(exc).__name__}: {str(exc)[:200]}); {hint}") from None
    wrong = [f"{label}: {first(sorted(map(str, keys)), 3)}" for label, keys in (
        ("missing weights", set(info["missing_keys"])), ("unexpected weights", set(info["unexpected_keys"]) - computed),
    ) if keys]  # fmt: skip
    if wrong:
        raise error(f"{folder}: {'; '.join(wrong)}; {hint}")
    return model


def load_transformers(auto_class: Any, folder: str | os.PathLike, error: ErrorType, hint: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(folder, **kwargs)`` (a transformers Auto class; local model.safetensors only)
    through load_checked."""
    from transformers import AutoConfig

    folder = Path(folder)
    return load_checked(
        folder, "model", lambda: auto_class.from_config(AutoConfig.from_pretrained(folder, local_files_only=True)),
        lambda: auto_class.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                           output_loading_info=True, **kwargs),
        error, hint,
    )  # fmt: skip


def load_diffusers(model_class: Any, folder: str | os.PathLike, error: ErrorType, hint: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder, **kwargs)`` (a diffusers model: UNet, VAE, ControlNet; a local
    diffusion_pytorch_model.safetensors only) through load_checked."""
    folder = Path(folder)
    return load_checked(
        folder, "diffusion_pytorch_model", lambda: model_class.from_config(model_class.load_config(folder)),
        lambda: model_class.from_pretrained(folder, use_safetensors=True, output_loading_info=True, **kwargs),
        error, hint,
    )  # fmt: skip
