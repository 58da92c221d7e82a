"""Generator checkpoints: PanoHead .pkl (read safely), .pth state dicts, and our .safetensors + JSON.

An official PanoHead snapshot is a pickle whose modules rebuild themselves by exec()-ing the
source code stored inside the file (``torch_utils.persistence``). Loading it that way runs
whatever the file's author wrote, so here a restricted unpickler resolves only an allow-list
of globals and turns every persistent module into an inert record of its ``__dict__``; the
stored source is never compiled. Parameters and persistent buffers are then collected in
``state_dict()`` order and loaded into our re-implementation (``TriPlaneGenerator``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from headstyle.generator.base import Generator
from headstyle.generator.schema import SchemaError, check_generator_config, plain_data
from headstyle.input_files import read_json
from headstyle.io import atomic_path
from headstyle.weight_files import (
    extent_problem,
    first,
    meta_numel,
    read_state_dict,
    state_problems,
    torch_size_problem,
    weights_budget,
    weights_only_reason,
)

if TYPE_CHECKING:
    from headstyle.generator.triplane import TriPlaneGenerator

FORMAT_NAME = "headstyle.generator"
FORMAT_VERSION = 1
PANOHEAD_CLASS = "training.triplane.TriPlaneGenerator"
# TriPlaneGenerator's positional parameters, to name a pickle's _init_args.
_POSITIONAL = (
    "z_dim",
    "c_dim",
    "w_dim",
    "img_resolution",
    "img_channels",
    "sr_num_fp16_res",
    "mapping_kwargs",
    "rendering_kwargs",
    "sr_kwargs",
)

# The released PanoHead generator (train.py's kwargs for the README command, dataset 512 px, c_dim 25);
# the default base configuration for .pth state dicts that carry no configuration of their own.
RELEASED_RENDERING_KWARGS: dict[str, Any] = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.7,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.0,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "decoder_activation": "none",
    "use_torgb_raw": True,
    "triplane_size": 256,
    "triplane_depth": 3,
    "trans_reg": 10.0,
    "use_background": True,
    "sr_antialias": True,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.25,
    "ray_end": 3.3,
    "box_warp": 1,
    "avg_camera_radius": 2.7,
    "avg_camera_pivot": [0, 0, 0.2],
}
RELEASED_INIT_KWARGS: dict[str, Any] = {
    "z_dim": 512,
    "w_dim": 512,
    "mapping_kwargs": {"num_layers": 2},
    "architecture": "skip",
    "channel_base": 32768,
    "channel_max": 512,
    "fused_modconv_default": "inference_only",
    "rendering_kwargs": RELEASED_RENDERING_KWARGS,
    "num_fp16_res": 0,
    "sr_num_fp16_res": 4,
    "sr_kwargs": {"channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only"},
    "c_dim": 25,
    "img_resolution": 512,
    "img_channels": 3,
}
RELEASED_NEURAL_RENDERING_RESOLUTION = 64
# PanoHead's module tree is 6 deep with ~400 modules; the bounds stop cyclic or memo-shared trees.
MAX_MODULE_DEPTH = 32
MAX_MODULES = 20_000


class CheckpointError(ValueError):
    """A generator checkpoint that cannot be read; the message names the file and the problem."""


class UnsafePickleError(CheckpointError):
    """A pickle that asks for a global outside the allow-list; nothing of it was executed."""


@dataclass
class GeneratorConfig:
    """Everything besides the weights needed to rebuild a TriPlaneGenerator.

    init_kwargs: the constructor kwargs (PanoHead's ``_init_kwargs``, class_name removed).
    rendering_kwargs: the live ``G.rendering_kwargs`` (the checkpoint's authority at render time).
    neural_rendering_resolution: the raw render size, a plain attribute of G, not a constructor kwarg.
    """

    init_kwargs: dict[str, Any]
    rendering_kwargs: dict[str, Any]
    neural_rendering_resolution: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "class_name": PANOHEAD_CLASS,
            "init_kwargs": self.init_kwargs,
            "rendering_kwargs": self.rendering_kwargs,
            "neural_rendering_resolution": self.neural_rendering_resolution,
        }

    @classmethod
    def from_init_kwargs(
        cls, kwargs: Mapping[str, Any], neural_rendering_resolution: int, rendering_kwargs: Mapping | None = None
    ) -> GeneratorConfig:
        init = {k: v for k, v in copy.deepcopy(dict(kwargs)).items() if k != "class_name"}
        rk = copy.deepcopy(dict(rendering_kwargs if rendering_kwargs is not None else init.get("rendering_kwargs", {})))
        return cls(init, rk, int(neural_rendering_resolution))


def released_config() -> GeneratorConfig:
    """The configuration of the released PanoHead generator (512 px, tri-grid 256 x 3, 48 + 48 samples)."""
    return GeneratorConfig.from_init_kwargs(RELEASED_INIT_KWARGS, RELEASED_NEURAL_RENDERING_RESOLUTION)


@dataclass
class GeneratorCheckpoint:
    """Weights and configuration read from a file, before a module is built."""

    config: GeneratorConfig
    state_dict: OrderedDict[str, Tensor]
    source: Path
    extras: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Restricted unpickling of torch_utils.persistence snapshots


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, without building it."""

    class_name: str
    state: dict[str, Any]


class ModuleRecord:
    """Inert stand-in for a module class referenced by name (torch.nn.* or PanoHead's non-persistent ones)."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        # BUILD passes __dict__, or (__dict__, slots) for classes with __slots__.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"module {self.qualname} has a non-dict state ({type(state).__name__})")
        self.state = state


class _EasyDict(dict):
    """dnnlib.util.EasyDict, read as a dict (it only adds attribute access)."""


def _record_persistent(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("persistent object without a class state")
    # meta["module_src"] holds the class's source code: deliberately never compiled.
    return PersistentRecord(class_name=str(meta.get("class_name")), state=meta["state"])


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> Tensor:
    """torch._utils._rebuild_tensor_v2 without requires_grad/backward hooks (a checkpoint carries no graph)."""
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    dtype = storage.dtype if isinstance(storage, torch.TypedStorage) else torch.uint8
    return torch.empty(0, dtype=dtype).set_(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_ignored: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return {
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
    }


_TORCH_DTYPES = frozenset(
    ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
)
# Module paths whose classes become inert ModuleRecords: torch's own layers and PanoHead's
# non-persistent nn.Modules (e.g. RaySampler), which a snapshot references by name.
_MODULE_PREFIXES = ("torch.nn.modules.", "training.")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a PanoHead snapshot needs; everything else is refused."""

    _ALLOWED: dict[tuple[str, str], Any] = {  # noqa: RUF012 (read-only table)
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _record_persistent,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("dnnlib.EasyDict", "EasyDict"): _EasyDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "Size"): torch.Size,
    }

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self.source = source
        self._module_stubs: dict[str, type[ModuleRecord]] = {}
        self._allowed = {**self._ALLOWED, **_numpy_globals(), ("torch.storage", "_load_from_bytes"): self._load_storage}

    def _load_storage(self, data: bytes) -> Any:
        """torch.storage._load_from_bytes, but through torch's weights-only unpickler."""
        if not isinstance(data, bytes | bytearray):
            raise pickle.UnpicklingError("storage payload is not bytes")
        # The payload is inside the file, so it may declare no more bytes than it has.
        if problem := torch_size_problem(io.BytesIO(data), len(data)):
            raise CheckpointError(f"{self.source}: a tensor storage payload is refused: {problem}")
        try:
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafePickleError(
                f"{self.source}: a tensor storage was refused by torch's weights-only loader; nothing of it was "
                f"executed ({weights_only_reason(exc)})"
            ) from exc
        if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
            raise pickle.UnpicklingError(f"storage payload decoded to {type(storage).__name__}, not a storage")
        return storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        qualname = f"{module}.{name}"
        if module.startswith(_MODULE_PREFIXES) and name.isidentifier() and not name.startswith("_"):
            if qualname not in self._module_stubs:
                self._module_stubs[qualname] = type(name, (ModuleRecord,), {"qualname": qualname})
            return self._module_stubs[qualname]
        raise UnsafePickleError(
            f"{self.source}: refused to load global {qualname!r}: it is not on the allow-list of a PanoHead "
            "snapshot (tensors, persistent modules, dicts); the file may be hostile and nothing of it was executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: persistent id {pid!r} in a pickle that should have none")


def _plain(obj: Any, where: str, source: Path) -> Any:
    """plain_data(obj) (EasyDicts and numpy scalars become dicts and numbers), or a CheckpointError."""
    try:
        return plain_data(obj, where)
    except SchemaError as exc:
        raise CheckpointError(f"{source}: malformed generator config: {exc}") from None


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Read a torch_utils.persistence pickle without executing anything in it.

    Modules come back as PersistentRecord / ModuleRecord objects holding their ``__dict__``.
    """
    path = Path(path)
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        try:
            return RestrictedUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable PanoHead pickle ({type(exc).__name__}: {exc})") from exc


def _module_state(module: Any) -> dict[str, Any]:
    if isinstance(module, PersistentRecord | ModuleRecord):
        return module.state
    raise TypeError(f"not a module record: {type(module).__name__}")


def module_state_dict(module: Any, prefix: str = "") -> OrderedDict[str, Tensor]:
    """``state_dict()`` of a module record: parameters, then persistent buffers, then children.

    Raises TypeError for a tree deeper than MAX_MODULE_DEPTH or with more than MAX_MODULES modules
    (a pickle can make a module its own child, or share one child thousands of times).
    """
    out: OrderedDict[str, Tensor] = OrderedDict()
    visited = 0

    def walk(module: Any, prefix: str, depth: int) -> None:
        nonlocal visited
        visited += 1
        if depth > MAX_MODULE_DEPTH or visited > MAX_MODULES:
            raise TypeError(f"module tree deeper than {MAX_MODULE_DEPTH} or larger than {MAX_MODULES} modules")
        state = _module_state(module)
        non_persistent = state.get("_non_persistent_buffers_set", set())
        tensors = [*state.get("_parameters", {}).items()]
        tensors += [(k, v) for k, v in state.get("_buffers", {}).items() if k not in non_persistent]
        for name, value in tensors:
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
        for name, child in state.get("_modules", {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(module, prefix, 0)
    return out


def _config_from_record(record: PersistentRecord, source: Path) -> GeneratorConfig:
    state = record.state
    args = _plain(state.get("_init_args", ()), "G_ema._init_args", source)
    kwargs = _plain(state.get("_init_kwargs", {}), "G_ema._init_kwargs", source)
    if not isinstance(kwargs, dict) or not isinstance(args, tuple | list) or len(args) > len(_POSITIONAL):
        raise CheckpointError(f"{source}: G_ema has malformed _init_args/_init_kwargs")
    init = {**dict(zip(_POSITIONAL, args, strict=False)), **kwargs}
    if "rendering_kwargs" not in init and "rendering_kwargs" not in state:
        raise CheckpointError(f"{source}: G_ema carries no rendering_kwargs; is it a PanoHead/EG3D generator?")
    rendering = _plain(state.get("rendering_kwargs", init.get("rendering_kwargs")), "G_ema.rendering_kwargs", source)
    nrr = _plain(state.get("neural_rendering_resolution", RELEASED_NEURAL_RENDERING_RESOLUTION),
                 "G_ema.neural_rendering_resolution", source)
    config = GeneratorConfig({k: v for k, v in init.items() if k != "class_name"}, rendering, nrr)
    validate_config(config, source)
    return config


def read_panohead_pickle(path: str | os.PathLike, key: str = "G_ema") -> GeneratorCheckpoint:
    """Weights and config of ``data[key]`` in an official PanoHead snapshot, read without executing it."""
    path = Path(path)
    data = safe_unpickle(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict snapshot with G_ema, found {type(data).__name__}")
    if key not in data:
        raise CheckpointError(f"{path}: no {key!r} in the snapshot (keys: {first([str(k)[:40] for k in data])})")
    record = data[key]
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{path}: {key} is a {type(record).__name__}, not a persistent PanoHead module")
    if record.class_name != PANOHEAD_CLASS:
        raise CheckpointError(f"{path}: {key} is a {record.class_name}, expected {PANOHEAD_CLASS}")
    config = _config_from_record(record, path)
    try:
        state_dict = module_state_dict(record)
    except (TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed module tree in {key}: {exc}") from exc
    extras = {"training_set_kwargs": _plain(data.get("training_set_kwargs"), "training_set_kwargs", path)}
    return GeneratorCheckpoint(config, state_dict, path, extras)


# ---------------------------------------------------------------------------------------------
# .pth state dicts, our .safetensors + JSON, the parity fixture folder


PTH_HINT = "load a plain state dict (torch.save(G.state_dict(), ...)) or a .safetensors save"
# Where a .pth may hold the generator's state dict (a training snapshot's entries), level by level.
PTH_NESTS = ("G_ema", "state_dict", "generator", "G")


def config_budget(config: GeneratorConfig, source: Path | str) -> int:
    """The most bytes a weights file for ``config`` may declare (weights_budget of the meta-built network)."""
    return weights_budget(meta_numel(lambda: _construct(config, source, "meta")))


def read_state_dict_pth(path: str | os.PathLike, max_bytes: int) -> OrderedDict[str, Tensor]:
    """A plain torch state_dict (.pth/.pt), or one under G_ema / state_dict / generator / G, read with
    torch.load(weights_only=True) once its declared sizes fit ``max_bytes`` (headstyle.weight_files)."""
    return OrderedDict(read_state_dict(path, max_bytes, CheckpointError, PTH_HINT, PTH_NESTS, UnsafePickleError))


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON config that accompanies ``NAME.safetensors``: ``NAME.json``."""
    return Path(path).with_suffix(".json")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the JSON config that goes with the weights)")
    return read_json(path, CheckpointError)


def config_from_json(data: Any, path: Path) -> GeneratorConfig:
    """Our sidecar format, or the parity fixture's config.json (its "reduced" entry); validated."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    if data.get("format") == FORMAT_NAME:
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CheckpointError(f"{path}: malformed generator config: format_version must be an integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format version {version} is newer than this headstyle reads ({FORMAT_VERSION}); "
                "upgrade headstyle"
            )
        fields = {name: data.get(name) for name in ("init_kwargs", "rendering_kwargs", "neural_rendering_resolution")}
    elif isinstance(data.get("reduced"), dict) and isinstance(data["reduced"].get("G_kwargs"), dict):
        entry = data["reduced"]
        common = entry.get("common_kwargs", {})
        if not isinstance(common, dict):
            raise CheckpointError(f"{path}: malformed generator config: reduced.common_kwargs must be an object")
        init = {k: v for k, v in {**entry["G_kwargs"], **common}.items() if k != "class_name"}
        fields = {
            "init_kwargs": init,
            "rendering_kwargs": init.get("rendering_kwargs"),
            "neural_rendering_resolution": entry.get("neural_rendering_resolution"),
        }
    else:
        raise CheckpointError(f"{path}: not a headstyle generator config (no 'format': '{FORMAT_NAME}')")
    fields = {name: _plain(value, name, path) for name, value in fields.items()}
    config = GeneratorConfig(**fields)
    validate_config(config, path)
    return config


def read_safetensors(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> GeneratorCheckpoint:
    """Our format: ``NAME.safetensors`` weights with the ``NAME.json`` config beside them."""
    path = Path(path)
    cfg_path = Path(config_path) if config_path is not None else sidecar_path(path)
    config = config_from_json(_read_json(cfg_path), cfg_path)
    hint = f"give the weights saved with {cfg_path.name} (headstyle.generator.save_generator writes both)"
    state = read_state_dict(path, config_budget(config, cfg_path), CheckpointError, hint)
    return GeneratorCheckpoint(config, OrderedDict(state), path)


def read_config(path: str | os.PathLike) -> GeneratorConfig:
    """A base configuration from a JSON config, a PanoHead .pkl, a .safetensors save or a fixture folder."""
    path = Path(path)
    if path.suffix == ".json":
        return config_from_json(_read_json(path), path)
    return read_checkpoint(path, config=None).config


def read_checkpoint(
    path: str | os.PathLike, config: str | os.PathLike | GeneratorConfig | None = None
) -> GeneratorCheckpoint:
    """Read weights and configuration from any supported file, picking the format by suffix and content.

    ``config`` is the base configuration for a bare .pth state dict (a path or a GeneratorConfig);
    without it the released PanoHead configuration is assumed.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        weights = path / "params.safetensors"
        if weights.is_file() and (path / "config.json").is_file():
            return read_safetensors(weights, path / "config.json")
        saves = sorted(p for p in path.glob("*.safetensors") if sidecar_path(p).is_file())
        if len(saves) == 1:
            return read_safetensors(saves[0])
        raise CheckpointError(
            f"{path}: a folder must hold params.safetensors + config.json, or one NAME.safetensors + NAME.json"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pth", ".pt") or head.startswith(b"PK\x03\x04"):
        base = config if isinstance(config, GeneratorConfig) else read_config(config) if config else released_config()
        source = f"the base config for {path}"
        validate_config(base, source)
        return GeneratorCheckpoint(base, read_state_dict_pth(path, config_budget(base, source)), path)
    if suffix == ".pkl" or head[:1] == b"\x80":
        return read_panohead_pickle(path)
    raise CheckpointError(
        f"{path}: unsupported checkpoint type {suffix!r} (use .pkl, .pth/.pt, .safetensors or a folder)"
    )


# ---------------------------------------------------------------------------------------------
# Building, loading and saving generators


def _dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    # Any float precision loads into a float entry (cast on copy, as load_state_dict does).
    return stored == expected or (stored.is_floating_point and expected.is_floating_point)


def check_state_dict(module: nn.Module, state: Mapping[str, Tensor], source: Path | str) -> None:
    """Raise CheckpointError naming the first missing / unexpected / mis-shaped / mis-typed keys, if any.

    ``module`` may live on the meta device: only names, shapes and dtypes are compared. The stored
    tensors must also be dense CPU tensors that each hold their own data, so that loading them
    costs no more memory than the file has bytes (stride-0 or overlapping views of a small
    storage could otherwise claim the shapes of a large network).
    """
    expected = module.state_dict()
    problems = state_problems({k: v.shape for k, v in expected.items()}, {k: t.shape for k, t in state.items()},
                              "checkpoint vs config")  # fmt: skip
    dtypes = [f"{k} {state[k].dtype} vs {v.dtype}" for k, v in expected.items()
              if k in state and not _dtype_fits(state[k].dtype, v.dtype)]  # fmt: skip
    if dtypes:
        problems.append(f"dtype mismatch (checkpoint vs config): {first(dtypes, 3)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the configured generator; " + "; ".join(problems))
    if problem := extent_problem(state):
        raise CheckpointError(f"{source}: {problem}")


def validate_config(config: GeneratorConfig, source: Path | str) -> None:
    """Raise CheckpointError naming ``source`` unless the config's kwargs have known keys, types and sane ranges."""
    try:
        check_generator_config(config.init_kwargs, config.rendering_kwargs, config.neural_rendering_resolution)
    except SchemaError as exc:
        raise CheckpointError(f"{source}: malformed generator config: {exc}") from None


def _construct(config: GeneratorConfig, source: Path | str, device: str | torch.device) -> TriPlaneGenerator:
    """TriPlaneGenerator(**init_kwargs) with its tensors created on ``device`` ("meta": no memory), in eval mode."""
    from headstyle.generator.triplane import TriPlaneGenerator

    validate_config(config, source)
    try:
        with torch.device(device):
            G = TriPlaneGenerator(**copy.deepcopy(config.init_kwargs))
    except ValueError as exc:  # a combination the network cannot take, e.g. an SR for another resolution
        raise CheckpointError(f"{source}: the config does not describe a buildable generator ({exc})") from None
    G.rendering_kwargs = copy.deepcopy(config.rendering_kwargs)
    G.neural_rendering_resolution = config.neural_rendering_resolution
    return G.eval()


def build_generator(config: GeneratorConfig) -> Generator:
    """A TriPlaneGenerator from a validated configuration (random weights, CPU), in eval mode."""
    return _construct(config, "generator config", "cpu")


def generator_config(G: nn.Module) -> GeneratorConfig:
    """The configuration of a built generator (constructor kwargs as recorded at construction)."""
    if G.init_kwargs is None:
        raise CheckpointError(f"{type(G).__name__} declares no init_kwargs: it cannot be rebuilt from a config")
    return GeneratorConfig.from_init_kwargs(G.init_kwargs, int(G.neural_rendering_resolution), G.rendering_kwargs)


def load_generator(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    config: str | os.PathLike | GeneratorConfig | None = None,
    neural_rendering_resolution: int | None = None,
    rendering_overrides: Mapping[str, Any] | None = None,
) -> Generator:
    """Load a PanoHead-compatible generator from a .pkl, .pth, .safetensors (+ .json) or fixture folder.

    ``config`` is the base configuration for bare .pth state dicts (default: the released PanoHead);
    ``neural_rendering_resolution`` and ``rendering_overrides`` (e.g. depth_resolution) change how
    it renders, not its weights. Returns the generator in eval mode on ``device``.
    """
    ckpt = read_checkpoint(path, config)
    cfg = copy.deepcopy(ckpt.config)
    if neural_rendering_resolution is not None:
        cfg.neural_rendering_resolution = neural_rendering_resolution
    cfg.rendering_kwargs.update(rendering_overrides or {})
    source = ckpt.source if cfg == ckpt.config else f"{ckpt.source} (with the requested rendering overrides)"
    # Shapes are compared on the meta device, so a config that asks for a huge network costs nothing;
    # memory is spent only on a network whose every tensor the file has supplied.
    G = _construct(cfg, source, "meta")
    check_state_dict(G, ckpt.state_dict, ckpt.source)
    weights = {k: torch.empty_like(v, device=device).copy_(ckpt.state_dict[k]) for k, v in G.state_dict().items()}
    G.load_state_dict(weights, strict=True, assign=True)
    return G


def _json_value(obj: Any) -> Any:
    """numpy scalars (e.g. from a pickle's init kwargs) and sets as JSON values."""
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_generator(G: nn.Module, path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Save ``NAME.safetensors`` (weights) and ``NAME.json`` (config), each written atomically.

    A generator that declares no init_kwargs (the lab's) gets the weights file only (sidecar None).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: generator saves end in .safetensors")
    config = None if G.init_kwargs is None else generator_config(G)
    # safetensors refuses shared storage; contiguous copies detach a saved state from live views.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in G.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    if config is None:
        return path, None
    side = sidecar_path(path)
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(config.to_json(), indent=1, default=_json_value))
    return path, side
