"""Crafted hostile files for the tests and benchmarks of the checkpoint and W+ code readers.

Pickles are written opcode by opcode (pickle's own Pickler would recurse on 100k-deep data and
needs the named modules importable), so each file is exactly what a hostile author could ship:
a PanoHead snapshot {"G_ema": torch_utils.persistence._reconstruct_persistent_obj(meta)} whose
stored state asks for something the reader must refuse before spending memory on it.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from headstyle.generator.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PANOHEAD_CLASS,
    RELEASED_INIT_KWARGS,
    RELEASED_NEURAL_RENDERING_RESOLUTION,
)

_RECONSTRUCT = b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"  # GLOBAL


def ops(obj: Any) -> bytes:
    """The opcodes that push ``obj`` (protocol 2, no PROTO header and no STOP), to splice into a pickle."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def str_ops(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def dict_ops(items: Mapping[str, bytes]) -> bytes:
    """A dict whose values are given as opcodes: EMPTY_DICT MARK (key value)* SETITEMS."""
    return b"}(" + b"".join(str_ops(k) + v for k, v in items.items()) + b"u"


def nested_list_ops(depth: int) -> bytes:
    """A list nested ``depth`` deep, [[[...]]], in 2 * depth bytes (EMPTY_LIST * depth, APPEND * (depth - 1))."""
    return b"]" * depth + b"a" * (depth - 1)


def snapshot_pickle(state: Mapping[str, bytes], class_name: str = PANOHEAD_CLASS) -> bytes:
    """A persistence snapshot {"G_ema": <class_name with __dict__ = state>}; state values are opcodes."""
    meta = dict_ops({
        "type": ops("class"),
        "version": ops(6),
        "module_src": ops(""),
        "class_name": ops(class_name),
        "state": dict_ops(state),
    })
    return b"\x80\x02}" + str_ops("G_ema") + _RECONSTRUCT + meta + b"\x85R" + b"s."  # TUPLE1 REDUCE SETITEM STOP


def released_kwargs(**changes: Any) -> dict[str, Any]:
    """The released generator's init kwargs with top-level ``changes`` (mapping_kwargs replaced whole)."""
    return {**copy.deepcopy(RELEASED_INIT_KWARGS), **changes}


def kwargs_snapshot(init_kwargs: bytes | Mapping[str, Any], **state: bytes) -> bytes:
    """A G_ema snapshot with no tensors whose _init_kwargs are ``init_kwargs`` (opcodes or a plain dict)."""
    kwargs = init_kwargs if isinstance(init_kwargs, bytes) else ops(dict(init_kwargs))
    return snapshot_pickle({
        "_parameters": ops({}),
        "_buffers": ops({}),
        "_modules": ops({}),
        "_init_args": ops(()),
        "_init_kwargs": kwargs,
        "neural_rendering_resolution": ops(RELEASED_NEURAL_RENDERING_RESOLUTION),
        **state,
    })


def self_child_module_ops() -> bytes:
    """A torch.nn module record that is its own child: state {"_modules": {"child": itself}}."""
    # GLOBAL, EMPTY_TUPLE, REDUCE, BINPUT 99; the state's BINGET 99 is the module itself; BUILD.
    module = b"ctorch.nn.modules.container\nSequential\n)Rq\x63"
    return module + dict_ops({"_modules": dict_ops({"child": b"h\x63"})}) + b"b"


def cyclic_dict() -> dict[str, Any]:
    d: dict[str, Any] = {"z_dim": 512}
    d["mapping_kwargs"] = d
    return d


def memo_bomb(width: int = 1000, depth: int = 8) -> list[Any]:
    """``depth`` levels of a list holding ``width`` references to the level below: tiny as a pickle,
    width ** depth values when walked."""
    x: list[Any] = [0]
    for _ in range(depth):
        x = [x] * width
    return x


def sidecar_json(init_kwargs: Mapping[str, Any] | str) -> str:
    """Our JSON sidecar holding ``init_kwargs`` (a dict, or raw JSON text spliced in as is)."""
    text = init_kwargs if isinstance(init_kwargs, str) else json.dumps(dict(init_kwargs))
    rendering = json.dumps(RELEASED_INIT_KWARGS["rendering_kwargs"])
    return (
        f'{{"format": "{FORMAT_NAME}", "format_version": {FORMAT_VERSION}, "init_kwargs": {text}, '
        f'"rendering_kwargs": {rendering}, "neural_rendering_resolution": {RELEASED_NEURAL_RENDERING_RESOLUTION}}}'
    )


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def stride0_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes that all view one float (stride 0): torch.save stores 4 bytes for them."""
    one = torch.zeros(())
    return {k: one.expand(shape) for k, shape in shapes.items()}


def npz_declaring(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"", name: str = "w") -> bytes:
    """An npz whose ``name``.npy header declares ``shape`` and ``descr`` but holds only ``data``."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_2_0(npy, {"descr": descr, "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(f"{name}.npy", npy.getvalue() + data)
    return out.getvalue()
