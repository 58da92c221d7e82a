"""What a stored generator configuration may hold, checked before anything is built from it.

A checkpoint's constructor kwargs decide how much memory the generator takes, so a tiny file
could otherwise ask for 200,000 mapping layers. Here they are first copied into plain data with
bounded depth and size (no cycles, no 100k-deep nesting, no memo-shared blow-ups), then every
known key is checked for type and range. Unknown constructor keys are refused; unknown
rendering keys (PanoHead variants add training-only ones) are kept when they are plain scalars.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from headstyle.generator.layers import ACTIVATIONS, NOISE_MODES

# A PanoHead config nests 3 deep (init_kwargs -> rendering_kwargs -> avg_camera_pivot) and holds < 100 values.
MAX_DEPTH = 6
MAX_NODES = 2048
MAX_STRING = 256


class SchemaError(ValueError):
    """A configuration value of the wrong shape, type or range; the message names the key."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plain_data(obj: Any, where: str = "config", max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """A copy of ``obj`` made of dicts with str keys, lists, tuples, str, int, float, bool and None.

    numpy scalars become Python numbers. More than ``max_depth`` levels or ``max_nodes`` values in
    all raise SchemaError, which also stops cycles and containers that share one child many times.
    """
    budget = [max_nodes]

    def copy(value: Any, path: str, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise SchemaError(f"{where} holds more than {max_nodes} values")
        if depth > max_depth:
            raise SchemaError(f"{path} nests deeper than {max_depth} levels")
        if isinstance(value, np.generic) and not isinstance(value, np.str_ | np.bytes_ | np.void):
            value = value.item()
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                raise SchemaError(f"{path} is a string of {len(value)} characters (at most {MAX_STRING})")
            return str(value)
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise SchemaError(f"{path} has a key that is not a string: {_short(bad[0])}")
            return {str(k): copy(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            items = [copy(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else items
        raise SchemaError(f"{path} is a {type(value).__name__}; only numbers, strings, lists and tables are allowed")

    return copy(obj, where, 0)


# ---------------------------------------------------------------------------------------------
# Value checks: each returns None for an acceptable value, else what is wrong with it.

Check = Callable[[Any], "str | None"]


def _integer(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer, got {_short(v)}"
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"

    return check


def _real(lo: float = -math.inf, hi: float = math.inf, positive: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return f"must be a finite number, got {_short(v)}"
        if positive and v <= 0:
            return f"must be > 0, got {v}"
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}], got {v}"

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {_short(v)}"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else f"must be a string, got {_short(v)}"


def _one_of(*allowed: Any) -> Check:
    def check(v: Any) -> str | None:
        # type() too: True == 1, but fused_modconv_default 1 is not the bool the code branches on.
        ok = any(type(v) is type(a) and v == a for a in allowed)
        return None if ok else f"must be one of {', '.join(map(repr, allowed))}, got {_short(v)}"

    return check


def _optional(inner: Check) -> Check:
    return lambda v: None if v is None else inner(v)


def _vector(n: int, inner: Check) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list | tuple) or len(v) != n:
            return f"must be a list of {n} numbers, got {_short(v)}"
        return next((problem for problem in map(inner, v) if problem), None)

    return check


def _open_value(v: Any) -> str | None:
    """Rendering keys this code does not read: plain scalars or short lists of them."""
    scalar = v is None or isinstance(v, bool | int | float | str)
    if scalar or (isinstance(v, list | tuple) and len(v) <= 16 and all(_open_value(x) is None for x in v)):
        return None
    return f"must be a number, string, true/false or a short list of them, got {_short(v)}"


def _join(where: str, problem: str) -> str:
    return where + problem if problem.startswith(".") else f"{where} {problem}"


def _table(known: Mapping[str, Check], required: tuple[str, ...] = (), open_keys: bool = False) -> Check:
    """A table of settings: required keys present, each known key's value acceptable.

    Unknown keys are refused, or with ``open_keys`` accepted when they are plain scalars.
    """

    def check(table: Any) -> str | None:
        if not isinstance(table, Mapping):
            return f"must be a table of settings, got {_short(table)}"
        missing = [k for k in required if k not in table]
        if missing:
            return f"lacks {', '.join(missing)}"
        for key, value in table.items():
            value_check = known.get(key, _open_value if open_keys else None)
            if value_check is None:
                return f"has an unknown setting {key!r} (known: {', '.join(known)})"
            problem = value_check(value)
            if problem:
                return _join(f".{key}", problem)
        return None

    return check


_DIM = _integer(1, 4096)
_CHANNELS = _integer(1, 1 << 20)
_FP16_RES = _integer(0, 16)
_ARCHITECTURE = _one_of("orig", "skip", "resnet")
_FUSED = _one_of(True, False, "inference_only")
_CLAMP = _optional(_real(0, 1e6, positive=True))

MAPPING_KWARGS: dict[str, Check] = {
    "num_layers": _integer(1, 64),
    "embed_features": _optional(_DIM),
    "layer_features": _optional(_DIM),
    "activation": _one_of(*ACTIVATIONS),
    "lr_multiplier": _real(0, 1e3, positive=True),
    "w_avg_beta": _optional(_real(0, 1)),
}
SR_KWARGS: dict[str, Check] = {
    "channel_base": _CHANNELS,
    "channel_max": _integer(1, 1 << 14),
    "num_fp16_res": _FP16_RES,
    "conv_clamp": _CLAMP,
    "fused_modconv_default": _FUSED,
    "architecture": _ARCHITECTURE,
    "fp16_channels_last": _boolean,
}
RENDERING_KWARGS: dict[str, Check] = {
    "triplane_size": _integer(4, 2048),
    "triplane_depth": _integer(1, 64),
    "superresolution_module": _string,
    "sr_antialias": _boolean,
    "decoder_activation": _one_of("none", "sigmoid", "lrelu"),
    "decoder_lr_mul": _real(0, 1e3, positive=True),
    "use_torgb_raw": _boolean,
    "use_background": _boolean,
    "c_gen_conditioning_zero": _boolean,
    "c_scale": _real(-1e6, 1e6),
    "depth_resolution": _integer(1, 4096),
    "depth_resolution_importance": _integer(0, 4096),
    "ray_start": _real(0, 1e6),
    "ray_end": _real(0, 1e6, positive=True),
    "box_warp": _real(0, 1e6, positive=True),
    "avg_camera_radius": _real(0, 1e6, positive=True),
    "avg_camera_pivot": _vector(3, _real(-1e6, 1e6)),
    "clamp_mode": _string,
    "disparity_space_sampling": _boolean,
    "image_resolution": _integer(1, 8192),
    "superresolution_noise_mode": _one_of(*NOISE_MODES),
}
RENDERING_REQUIRED = (
    "triplane_size",
    "triplane_depth",
    "superresolution_module",
    "sr_antialias",
    "decoder_activation",
    "depth_resolution",
    "ray_start",
    "ray_end",
    "box_warp",
)


def _rendering(table: Any) -> str | None:
    problem = _table(RENDERING_KWARGS, RENDERING_REQUIRED, open_keys=True)(table)
    if problem is None and table["ray_start"] >= table["ray_end"]:
        problem = f".ray_start ({table['ray_start']}) must be below ray_end ({table['ray_end']})"
    return problem


# TriPlaneGenerator's parameters and the StyleGAN2 synthesis kwargs it passes on
# (its constructor takes None for an empty mapping_kwargs / sr_kwargs).
INIT_KWARGS: dict[str, Check] = {
    "z_dim": _DIM,
    "c_dim": _integer(0, 1024),
    "w_dim": _DIM,
    "img_resolution": _integer(4, 8192),
    "img_channels": _integer(1, 16),
    "sr_num_fp16_res": _FP16_RES,
    "channel_base": _CHANNELS,
    "channel_max": _integer(1, 1 << 14),
    "num_fp16_res": _FP16_RES,
    "architecture": _ARCHITECTURE,
    "conv_clamp": _CLAMP,
    "fused_modconv_default": _FUSED,
    "fp16_channels_last": _boolean,
    "mapping_kwargs": _optional(_table(MAPPING_KWARGS)),
    "sr_kwargs": _optional(_table(SR_KWARGS)),
    "rendering_kwargs": _rendering,
}
INIT_REQUIRED = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "rendering_kwargs")
NEURAL_RENDERING_RESOLUTION = _integer(4, 1024)


def check_generator_config(init_kwargs: Any, rendering_kwargs: Any, neural_rendering_resolution: Any) -> None:
    """Raise SchemaError unless the constructor kwargs, live rendering kwargs and raw render size are sane.

    Meant for plain_data output. The ranges bound the number of modules (mapping layers, synthesis
    resolutions) and every size, so a generator can be built on the meta device and compared with
    the stored tensors before any memory is spent on it.
    """
    problem = _table(INIT_KWARGS, INIT_REQUIRED)(init_kwargs)
    if problem:
        raise SchemaError(_join("init_kwargs", problem))
    problem = _rendering(rendering_kwargs)
    if problem:
        raise SchemaError(_join("rendering_kwargs", problem))
    problem = NEURAL_RENDERING_RESOLUTION(neural_rendering_resolution)
    if problem:
        raise SchemaError(f"neural_rendering_resolution {problem}")
