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
import zlib
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


# ---------------------------------------------------------------------------------------------
# Torch zip archives written record by record: state dicts and TorchScript modules whose tensors or
# members declare more than they hold.

_REBUILD_TENSOR = b"ctorch._utils\n_rebuild_tensor_v2\n"  # GLOBAL
_ZIP_CHUNK = 1 << 24


def tensor_ops(key: str, storage_numel: int, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0,
               storage: str = "FloatStorage") -> bytes:
    """_rebuild_tensor_v2(<storage record data/KEY of storage_numel values>, offset, size, stride, False, {}), as
    torch.save writes a tensor into data.pkl."""
    pid = b"(" + ops("storage") + f"ctorch\n{storage}\n".encode() + ops(key) + ops("cpu") + ops(storage_numel)
    hooks = b"ccollections\nOrderedDict\n)R"
    args = pid + b"tQ" + ops(offset) + ops(tuple(size)) + ops(tuple(stride)) + b"\x89" + hooks  # BINPERSID, NEWFALSE
    return _REBUILD_TENSOR + b"(" + args + b"tR"  # MARK ... TUPLE REDUCE


def state_dict_pickle(tensors: Mapping[str, bytes]) -> bytes:
    """data.pkl of a torch.save'd dict {name: tensor}; values are tensor_ops."""
    return b"\x80\x02" + dict_ops(tensors) + b"."


def script_module_pickle(attributes: Mapping[str, bytes], class_name: str = "VGG16") -> bytes:
    """data.pkl of a TorchScript module: a __torch__ object whose attributes (opcodes, e.g. tensor_ops) are set
    by BUILD."""
    return b"\x80\x02" + f"c__torch__\n{class_name}\n".encode() + b")\x81" + dict_ops(attributes) + b"b."


def deflated_zeros(n: int) -> tuple[bytes, int]:
    """(raw deflate stream, crc32) of ``n`` zero bytes (a multiple of 16 MiB), in about n / 1000 bytes: one
    fully-flushed block repeated, so the stream is built without compressing ``n`` bytes."""
    if n % _ZIP_CHUNK:
        raise ValueError(f"deflated_zeros takes a multiple of {_ZIP_CHUNK} bytes, got {n}")
    zeros = bytes(_ZIP_CHUNK)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(n // _ZIP_CHUNK):
        crc = zlib.crc32(zeros, crc)
    return block * (n // _ZIP_CHUNK) + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


def zip_archive(members: Mapping[str, bytes | int]) -> bytes:
    """A zip of stored members (bytes) and deflated ones (an int n: n zero bytes, see deflated_zeros), with the
    local headers, central directory and end record torch's reader and Python's zipfile read (below 4 GiB)."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, content in members.items():
        if isinstance(content, int):
            data, crc, size, method = *deflated_zeros(content), content, zipfile.ZIP_DEFLATED
        else:
            data, crc, size, method = content, zlib.crc32(content), len(content), zipfile.ZIP_STORED
        raw, offset = name.encode(), local.tell()
        fields = struct.pack("<HHHHHIIIH", 20, 0, method, 0, 0x21, crc, len(data), size, len(raw))
        local.write(b"PK\x03\x04" + fields + struct.pack("<H", 0) + raw + data)
        central.write(b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHII", 0, 0, 0, 0, 0, offset)
                      + raw)  # fmt: skip
    directory = central.getvalue()
    end = struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(directory), local.tell(), 0)
    return local.getvalue() + directory + b"PK\x05\x06" + end


def torch_zip(data_pkl: bytes, storages: Mapping[str, bytes | int], prefix: str = "archive",
              script: bool = False) -> bytes:
    """A torch.save (or, ``script``, a TorchScript) archive: PREFIX/data.pkl, its storage records data/KEY (bytes
    stored, or an int: that many zero bytes deflated), byteorder and version."""
    members: dict[str, bytes | int] = {f"{prefix}/data.pkl": data_pkl, f"{prefix}/byteorder": b"little"}
    if script:
        members[f"{prefix}/code/__torch__.py"] = b""
    members.update({f"{prefix}/data/{key}": content for key, content in storages.items()})
    members[f"{prefix}/version"] = b"3\n"
    return zip_archive(members)


def deflate_bomb_pth(inflated: int = 1 << 31, name: str = "w") -> bytes:
    """A torch zip state dict {name: float32 tensor of inflated / 4 values} whose storage is ``inflated`` zero bytes
    deflated: about inflated / 1000 bytes on disk."""
    numel = inflated // 4
    return torch_zip(state_dict_pickle({name: tensor_ops("0", numel, (numel,), (1,))}), {"0": inflated})


def stride0_script(numel: int = 1 << 29, name: str = "lpips0", deflated: int = 0) -> bytes:
    """A TorchScript archive whose attribute ``name`` views one float with stride 0 as ``numel`` values (a few
    hundred bytes; 4 * numel once copied); with ``deflated`` its storage record is that many zero bytes, deflated."""
    storage_numel = max(deflated // 4, 1)
    pkl = script_module_pickle({name: tensor_ops("0", storage_numel, (numel,), (0,))})
    return torch_zip(pkl, {"0": deflated or bytes(4)}, prefix="vgg16", script=True)
