"""Fuzzing the readers of untrusted input: any input ends in the project's own error types.

Generator checkpoints (.pkl through the restricted unpickler, .pth, .safetensors + JSON sidecar)
must end in CheckpointError, W+ code files (npz) in CodeFileError, stylize configs (TOML/JSON
files, dicts, --set overrides, presets) in ConfigError: never another exception, a crash or a
hang. Inputs are random bytes, byte-level mutations of valid files, and structured values (random
kwargs, random tensors, random JSON) that reach deep into the validation.

CI runs a fixed, derandomised set of examples with a deadline per example (the whole file takes
well under 30 s); HEADSTYLE_FUZZ_SCALE=20 runs 20x as many, randomised, for a longer local hunt.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from headstyle import crafted, load_generator
from headstyle.generator.checkpoint import CheckpointError, read_checkpoint, read_config
from headstyle.generator.latents import CodeFileError, latents_from_npz
from headstyle.stylize import config as stylize_config
from headstyle.stylize.presets import preset_names, resolve_config

SCALE = float(os.environ.get("HEADSTYLE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=15_000,  # ms per example: a reader that loops or balloons fails here (a meta-device build of the
        # released architecture takes ~0.7 s alone, several seconds on a loaded machine)
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def ends_in(errors: tuple[type[BaseException], ...], read: typing.Callable[[], object]) -> None:
    """Run ``read``; a result or one of ``errors`` is fine, anything else propagates and fails the test."""
    try:
        read()
    except errors as exc:
        assert str(exc).strip(), "an error without a message"


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few bytes replaced, a slice deleted or inserted, and maybe truncated."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "delete", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "set" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del out[draw(st.integers(0, len(out))) :]
    return bytes(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # torch imports its meta-device kernels on the first meta build: not inside a timed example.
    torch.empty(1, device="meta") + 1
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def reduced(parity_dir):
    """The reduced fixture's config and a valid two-tensor .pth / .safetensors / npz to mutate."""
    return read_config(parity_dir / "config.json")


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------------
# .pkl through the restricted unpickler

VALID_PKL = crafted.kwargs_snapshot(crafted.released_kwargs())
KWARG_KEYS = st.sampled_from([*crafted.released_kwargs(), "mapping_kwargs", "num_ws", "class_name"]) | st.text(
    max_size=6
)


@fuzz(120)
@given(data=st.binary(max_size=300) | mutated(VALID_PKL) | st.binary(max_size=200).map(lambda b: b"\x80\x02" + b))
def test_pickle_bytes(folder, data):
    path = _write(folder / "fuzz.pkl", data)
    ends_in((CheckpointError,), lambda: read_checkpoint(path))


@fuzz(60)
@given(changes=st.dictionaries(KWARG_KEYS, JSON_VALUES, max_size=3),
       rendering=st.dictionaries(st.sampled_from(list(crafted.released_kwargs()["rendering_kwargs"])), JSON_VALUES,
                                 max_size=2),
       nrr=JSON_VALUES)
def test_pickle_kwargs(folder, changes, rendering, nrr):
    """Stored kwargs that mostly pass the schema reach the meta-device build and the shape check."""
    kwargs = crafted.released_kwargs(**changes)
    if isinstance(kwargs.get("rendering_kwargs"), dict):
        kwargs["rendering_kwargs"] = {**kwargs["rendering_kwargs"], **rendering}
    path = _write(folder / "kwargs.pkl", crafted.kwargs_snapshot(kwargs, neural_rendering_resolution=crafted.ops(nrr)))
    ends_in((CheckpointError,), lambda: load_generator(path))


# ------------------------------------------------------------------------------------------------
# .pth state dicts


def _pth_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


VALID_PTH = _pth_bytes({"decoder.net.0.weight": torch.ones(64, 32), "decoder.net.0.bias": torch.zeros(64)})
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool,
          torch.complex64]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    t = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    kind = draw(st.sampled_from(["dense", "stride0", "view", "sparse", "meta", "transposed"]))
    if kind == "stride0":
        return torch.zeros((), dtype=t.dtype).expand(tuple(s * 1000 for s in shape))
    if kind == "view" and t.numel():
        return t.reshape(-1)[: max(t.numel() - 1, 0)]
    if kind == "sparse" and t.ndim and t.dtype.is_floating_point:
        return t.to_sparse()
    if kind == "meta":
        return torch.empty(shape, device="meta")
    if kind == "transposed" and t.ndim >= 2:
        return t.transpose(0, 1)
    return t


@fuzz(60)
@given(data=st.binary(max_size=300) | mutated(VALID_PTH))
def test_pth_bytes(folder, reduced, data):
    path = _write(folder / "fuzz.pth", data)
    ends_in((CheckpointError,), lambda: read_checkpoint(path, config=reduced))


@fuzz(40)
@given(state=st.dictionaries(st.sampled_from(["decoder.net.0.weight", "decoder.net.0.bias", "w_avg", "x"]),
                             tensors(), max_size=4),
       nest=st.sampled_from([None, "G_ema", "state_dict", "junk"]))
def test_pth_tensors(folder, reduced, state, nest):
    """Odd tensors (stride 0, sparse, meta, complex, views) in a weights-only-readable .pth."""
    path = _write(folder / "tensors.pth", _pth_bytes(state if nest is None else {nest: state}))
    ends_in((CheckpointError,), lambda: load_generator(path, config=reduced))


# ------------------------------------------------------------------------------------------------
# .safetensors + JSON sidecar

VALID_SIDECAR = crafted.sidecar_json(crafted.released_kwargs())
VALID_SAFETENSORS = save_safetensors({"decoder.net.0.bias": torch.zeros(64)})


@fuzz(60)
@given(sidecar=st.text(max_size=200) | mutated(VALID_SIDECAR.encode()) | JSON_VALUES.map(json.dumps)
       | st.dictionaries(st.sampled_from(["format", "format_version", "init_kwargs", "rendering_kwargs",
                                          "neural_rendering_resolution", "reduced"]), JSON_VALUES)
       .map(lambda d: json.dumps({"format": "headstyle.generator", **d})),
       weights=st.just(VALID_SAFETENSORS) | mutated(VALID_SAFETENSORS) | st.binary(max_size=100))
def test_safetensors_and_sidecar(folder, sidecar, weights):
    _write(folder / "G.json", sidecar)
    path = _write(folder / "G.safetensors", weights)
    ends_in((CheckpointError,), lambda: load_generator(path))


# ------------------------------------------------------------------------------------------------
# W+ codes (npz)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


VALID_NPZ = _npz_bytes(w=np.zeros((1, 8, 512), np.float32))
NP_DTYPES = ["<f4", "<f8", "<f2", "<i4", "|u1", "|b1", "<c8", "|O", "|S3", "<U2", ">f4", "|V8"]


@fuzz(80)
@given(data=st.binary(max_size=300) | mutated(VALID_NPZ)
       | st.builds(crafted.npz_declaring, st.lists(st.integers(-2, 10**12), max_size=4).map(tuple),
                   st.sampled_from(NP_DTYPES), st.binary(max_size=64), st.sampled_from(["w", "ws", "w.npy"])))
def test_npz_bytes(folder, data):
    path = _write(folder / "codes.npz", data)
    ends_in((CodeFileError,), lambda: latents_from_npz(path, num_ws=8))


@fuzz(40)
@given(shape=st.lists(st.integers(0, 9), max_size=4).map(tuple), dtype=st.sampled_from(["f4", "f8", "i4", "f2"]),
       fill=st.sampled_from([0.0, np.nan, np.inf, 1e300]))
def test_npz_arrays(folder, shape, dtype, fill):
    if len(shape) and shape[-1] == 9:  # make w_dim fit now and then
        shape = (*shape[:-1], 512)
    with np.errstate(over="ignore", invalid="ignore"):  # 1e300 as f2/f4 is inf, nan as i4 is garbage: both fine
        w = np.full(shape, fill).astype(dtype)
    path = _write(folder / "arrays.npz", _npz_bytes(w=w))
    ends_in((CodeFileError,), lambda: latents_from_npz(path, num_ws=8))


# ------------------------------------------------------------------------------------------------
# The stylize config parser (headstyle.stylize.config and presets)

CFG = stylize_config.StylizeConfig()
SECTIONS = {f.name: [g.name for g in dataclasses.fields(getattr(CFG, f.name))] for f in dataclasses.fields(CFG)}
KNOWN_KEYS = [f"{s}.{n}" for s, names in SECTIONS.items() for n in names]
OVERRIDE_VALUES = st.text(max_size=10) | JSON_SCALARS.map(json.dumps) | st.sampled_from(
    ["nan", "inf", "-1", "1e300", "[1, 2]", "{a = 1}", "true", "'x'", '"', "[", "1_000", "0x10", "1e999", "9" * 5000])


@st.composite
def config_dicts(draw: st.DrawFn) -> dict:
    sections = draw(st.lists(st.sampled_from([*SECTIONS, "nope"]), max_size=3, unique=True))
    out: dict = {}
    for section in sections:
        names = st.sampled_from(SECTIONS.get(section, ["x"])) | st.text(max_size=5)
        out[section] = draw(st.dictionaries(names, JSON_VALUES, max_size=3) | JSON_VALUES)
    return out


@fuzz(100)
@given(data=config_dicts())
def test_config_dicts(data):
    ends_in((stylize_config.ConfigError,), lambda: stylize_config.from_dict(data))


@fuzz(100)
@given(overrides=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), OVERRIDE_VALUES)
                          .map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=12), max_size=3),
       preset=st.none() | st.sampled_from(preset_names()) | st.text(max_size=8))
def test_config_overrides_and_presets(overrides, preset):
    ends_in((stylize_config.ConfigError,), lambda: resolve_config(preset_name=preset, overrides=overrides))


@fuzz(60)
@given(text=st.text(max_size=200) | config_dicts().map(json.dumps) | mutated(stylize_config.dumps(CFG).encode())
       .map(lambda b: b.decode("utf-8", "replace")),
       suffix=st.sampled_from([".toml", ".json"]))
def test_config_files(folder, text, suffix):
    path = _write(folder / f"cfg{suffix}", text)
    ends_in((stylize_config.ConfigError,), lambda: stylize_config.load_config(path))
