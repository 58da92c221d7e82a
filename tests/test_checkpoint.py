"""Generator checkpoints: safe PanoHead .pkl reading, .pth, our .safetensors + JSON, and error messages.

The .pkl files are written here in torch_utils.persistence's format: every PanoHead module pickles
as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, meta = {type, version,
module_src, class_name, state = obj.__dict__}; torch's own layers pickle by reference. The fake
``torch_utils`` / ``dnnlib`` modules exist in sys.modules only while a test pickle is written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import pickle
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from headstyle import load_generator
from headstyle.generator import checkpoint as ck
from headstyle.generator.checkpoint import (
    CheckpointError,
    GeneratorConfig,
    UnsafePickleError,
    read_panohead_pickle,
    save_generator,
)

# ------------------------------------------------------------------------------------------------
# Writing persistence-format pickles


def _reconstruct_persistent_obj(meta):
    raise AssertionError("the loader must not call the real reconstruct function")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})


class RaySampler(nn.Module):
    """EG3D's RaySampler is not a persistent class: a snapshot references it by module and name."""


RaySampler.__module__ = "training.volumetric_rendering.ray_sampler"
_FAKE_MODULES = {
    "training": types.ModuleType("training"),
    "training.volumetric_rendering": types.ModuleType("training.volumetric_rendering"),
    "training.volumetric_rendering.ray_sampler": types.ModuleType("training.volumetric_rendering.ray_sampler"),
    "torch_utils": types.ModuleType("torch_utils"),
    "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
    "dnnlib": types.ModuleType("dnnlib"),
    "dnnlib.util": types.ModuleType("dnnlib.util"),
}
_FAKE_MODULES["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
_FAKE_MODULES["dnnlib.util"].EasyDict = EasyDict
_FAKE_MODULES["training.volumetric_rendering.ray_sampler"].RaySampler = RaySampler


@contextlib.contextmanager
def panohead_modules() -> Iterator[None]:
    """Fake torch_utils.persistence / dnnlib.util in sys.modules, so pickle can name their globals."""
    assert not set(_FAKE_MODULES) & set(sys.modules)
    sys.modules.update(_FAKE_MODULES)
    try:
        yield
    finally:
        for name in _FAKE_MODULES:
            del sys.modules[name]


def write_snapshot(path: Path, data: dict, module_src: str = "# PanoHead source\n", **class_names: str) -> None:
    """pickle.dump(data) with headstyle modules reduced the way persistent PanoHead classes reduce."""
    with panohead_modules():

        class SnapshotPickler(pickle.Pickler):
            def reducer_override(self, obj):
                if not isinstance(obj, nn.Module) or type(obj).__module__.startswith(("torch.nn", "training.")):
                    return NotImplemented
                name = class_names.get(type(obj).__name__, f"training.networks_stylegan2.{type(obj).__name__}")
                meta = dict(type="class", version=6, module_src=module_src, class_name=name, state=dict(obj.__dict__))
                return _reconstruct_persistent_obj, (meta,)

        with open(path, "wb") as f:
            SnapshotPickler(f, protocol=4).dump(data)


class TinyD(nn.Module):
    """Stands in for the discriminator / augment pipe of a snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("p", torch.tensor([0.25]))


class TinyG(TinyD):
    """A small module with a generator's snapshot attributes (for tests that need no real weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(2, 2), nn.Softplus())
        self.ray_sampler = RaySampler()
        self.rendering_kwargs = {"depth_resolution": 4}
        self.neural_rendering_resolution = 8
        self._init_args = ()
        self._init_kwargs = EasyDict(z_dim=4)


@pytest.fixture(scope="module")
def G(parity_dir):
    g = load_generator(parity_dir)
    # A non-persistent buffer must not appear in the recovered state_dict.
    g.register_buffer("scratch", torch.ones(3), persistent=False)
    return g


def snapshot(G: nn.Module) -> dict:
    G_ema = copy.deepcopy(G)
    G_ema._init_args = ()
    G_ema._init_kwargs = EasyDict(class_name=ck.PANOHEAD_CLASS, **G.init_kwargs)
    G_train = copy.deepcopy(G_ema)
    with torch.no_grad():
        for p in G_train.parameters():
            p.add_(1.0)  # G differs from G_ema: the loader must take G_ema
    return {
        "training_set_kwargs": EasyDict(path="ffhq.zip", resolution=np.int64(512), xflip=np.bool_(True)),
        "G": G_train,
        "D": TinyD(),
        "G_ema": G_ema,
        "augment_pipe": TinyD(),
    }


@pytest.fixture(scope="module")
def snapshot_pkl(G, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pkl") / "network-snapshot.pkl"
    write_snapshot(path, snapshot(G), TriPlaneGenerator=ck.PANOHEAD_CLASS, TinyD="training.augment.AugmentPipe")
    return path


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Official .pkl


def test_pickle_gives_g_ema_state_dict_bit_for_bit(G, snapshot_pkl):
    ckpt = read_panohead_pickle(snapshot_pkl)
    assert "scratch" not in ckpt.state_dict and "scratch" in dict(G.named_buffers())
    assert_same_state(ckpt.state_dict, G.state_dict())
    assert ckpt.config.init_kwargs == G.init_kwargs
    assert ckpt.config.rendering_kwargs == G.rendering_kwargs
    assert ckpt.config.neural_rendering_resolution == 32
    assert ckpt.extras["training_set_kwargs"] == {"path": "ffhq.zip", "resolution": 512, "xflip": True}
    assert type(ckpt.extras["training_set_kwargs"]) is dict


def test_load_generator_from_pickle(G, snapshot_pkl):
    loaded = load_generator(snapshot_pkl)
    assert_same_state(loaded.state_dict(), G.state_dict())
    assert loaded.neural_rendering_resolution == G.neural_rendering_resolution
    assert not loaded.training


def test_positional_init_args_and_stored_rendering_kwargs(G, tmp_path):
    """_init_args name the constructor's positional parameters; the live rendering_kwargs win."""
    g = copy.deepcopy(G)
    kw = dict(G.init_kwargs)
    g._init_args = tuple(kw.pop(k) for k in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"))
    kw["sr_num_fp16_res"] = np.int64(kw["sr_num_fp16_res"])  # numpy scalars do occur in kwargs
    g._init_kwargs = EasyDict(**kw)
    g.rendering_kwargs = {**g.rendering_kwargs, "depth_resolution": 7}
    g.neural_rendering_resolution = 16
    write_snapshot(tmp_path / "g.pkl", {"G_ema": g}, TriPlaneGenerator=ck.PANOHEAD_CLASS)
    cfg = read_panohead_pickle(tmp_path / "g.pkl").config
    assert cfg.init_kwargs == G.init_kwargs
    assert cfg.rendering_kwargs["depth_resolution"] == 7 and cfg.neural_rendering_resolution == 16
    loaded = load_generator(tmp_path / "g.pkl")
    assert loaded.rendering_kwargs["depth_resolution"] == 7
    _, side = save_generator(loaded, tmp_path / "converted.safetensors")  # .pkl -> our format
    assert json.loads(side.read_text())["init_kwargs"] == G.init_kwargs


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint smuggles in."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_calls(marker: Path) -> dict[str, Payload]:
    touch = f"{sys.executable} -c \"open(r'{marker}', 'w')\""
    return {
        "posix.system": Payload(os.system, touch),
        "builtins.eval": Payload(eval, f"open(r'{marker}', 'w')"),
        "builtins.exec": Payload(exec, f"open(r'{marker}', 'w')"),
        "subprocess.check_call": Payload(subprocess.check_call, touch.split()),
        "builtins.__import__": Payload(__import__, "os"),
    }


@pytest.mark.parametrize("refused", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.check_call",
                                     "builtins.__import__"])
def test_hostile_payload_refused_and_not_executed(tmp_path, refused):
    marker = tmp_path / "pwned"
    data = {"training_set_kwargs": {"x": _hostile_calls(marker)[refused]}, "G_ema": TinyG()}
    path = tmp_path / "evil.pkl"
    write_snapshot(path, data, TinyG=ck.PANOHEAD_CLASS)
    with pytest.raises(UnsafePickleError) as err:
        load_generator(path)
    assert str(path) in str(err.value) and repr(refused) in str(err.value)
    assert not marker.exists()


def test_module_src_is_never_executed(G, tmp_path):
    """The original loader exec()s module_src; a safe one reads the weights and ignores it."""
    marker = tmp_path / "exec-ran"
    src = f"import pathlib\npathlib.Path(r'{marker}').write_text('module_src was executed')\n"
    path = tmp_path / "src.pkl"
    write_snapshot(path, snapshot(G), module_src=src, TriPlaneGenerator=ck.PANOHEAD_CLASS,
                   TinyD="training.augment.AugmentPipe")
    ckpt = read_panohead_pickle(path)
    assert not marker.exists()
    assert_same_state(ckpt.state_dict, G.state_dict())
    assert ckpt.config.init_kwargs == G.init_kwargs and ckpt.config.neural_rendering_resolution == 32
    exec(compile(src, "<module_src>", "exec"))  # the payload is real: running it does create the file
    assert marker.exists()


def test_hostile_storage_bytes_go_through_weights_only_loader(tmp_path):
    """torch.storage._load_from_bytes normally torch.load()s with weights_only=False; here it must not."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Payload(os.system, f"touch {marker}"), buf, _use_new_zipfile_serialization=False)
    path = tmp_path / "storage.pkl"
    with open(path, "wb") as f:
        pickle.dump({"G_ema": Payload(torch.storage._load_from_bytes, buf.getvalue())}, f, protocol=4)
    with pytest.raises(UnsafePickleError, match=r"storage\.pkl: a tensor storage was refused .* weights-only.*"
                       r"\(Trying to load unsupported GLOBAL posix\.system") as err:
        load_generator(path)
    assert not marker.exists()
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_missing_g_ema_and_wrong_class(tmp_path):
    path = tmp_path / "no_ema.pkl"
    write_snapshot(path, {"G": TinyG(), "D": TinyD()}, TinyG=ck.PANOHEAD_CLASS)
    with pytest.raises(CheckpointError, match=r"no_ema\.pkl: no 'G_ema'.*keys: G, D"):
        load_generator(path)
    path = tmp_path / "eg3d.pkl"
    write_snapshot(path, {"G_ema": TinyG()}, TinyG="training.triplane.OtherGenerator")
    with pytest.raises(CheckpointError, match=r"eg3d\.pkl: G_ema is a training.triplane.OtherGenerator"):
        load_generator(path)


def test_garbage_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pkl"
    path.write_bytes(b"\x80\x04 this is not a pickle")
    with pytest.raises(CheckpointError, match=r"broken\.pkl: not a readable PanoHead pickle"):
        load_generator(path)


# ------------------------------------------------------------------------------------------------
# .pth state dicts


def test_pth_state_dict_with_base_config(G, tmp_path, parity_dir):
    path = tmp_path / "stylised.pth"
    torch.save(G.state_dict(), path)
    for base in (parity_dir / "config.json", GeneratorConfig(dict(G.init_kwargs), dict(G.rendering_kwargs), 32)):
        loaded = load_generator(path, config=base)
        assert_same_state(loaded.state_dict(), G.state_dict())
        assert loaded.neural_rendering_resolution == 32


def test_pth_defaults_to_released_config(G, tmp_path, parity_dir):
    """The embedded default is config.json's full-size (released) generator; reduced weights do not fit it."""
    full = json.loads((parity_dir / "config.json").read_text())["full_size"]
    released = ck.released_config()
    assert released.init_kwargs == {k: v for k, v in {**full["G_kwargs"], **full["common_kwargs"]}.items()
                                    if k != "class_name"}
    assert released.neural_rendering_resolution == full["neural_rendering_resolution"]
    path = tmp_path / "reduced.pth"
    torch.save(G.state_dict(), path)
    small = copy.deepcopy(ck.released_config())
    small.init_kwargs.update(channel_base=512, channel_max=32)  # cheap stand-in with released key set
    with pytest.raises(CheckpointError, match=r"reduced\.pth: .*shape mismatch.*backbone\.") as err:
        load_generator(path, config=small)
    assert "unexpected keys" not in str(err.value)


def test_hostile_pth_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": Payload(os.system, f"touch {marker}")}, path)
    with pytest.raises(UnsafePickleError, match=r"evil\.pth: refused by the weights-only reader \(.*GLOBAL "
                       r"posix\.system.*nothing of it was executed\. Load a plain state dict") as err:
        load_generator(path)
    assert not marker.exists()
    # One line, and not torch's advice to retry with weights_only=False.
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_pth_key_mismatch_lists_keys(G, tmp_path, parity_dir):
    sd = G.state_dict()
    sd.pop("decoder.net.0.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.net\.0\.bias; unexpected keys: extra\.weight"):
        load_generator(tmp_path / "bad.pth", config=parity_dir / "config.json")


# ------------------------------------------------------------------------------------------------
# Our format and the fixture folder


def test_safetensors_round_trip_is_atomic_and_exact(G, tmp_path, parity_dir):
    g = copy.deepcopy(G)
    g.neural_rendering_resolution = 24
    weights, side = save_generator(g, tmp_path / "out" / "G.safetensors")
    assert sorted(p.name for p in weights.parent.iterdir()) == ["G.json", "G.safetensors"]
    meta = json.loads(side.read_text())
    assert meta["format"] == "headstyle.generator" and meta["format_version"] == 1
    loaded = load_generator(weights)
    assert_same_state(loaded.state_dict(), g.state_dict())
    assert loaded.neural_rendering_resolution == 24 and loaded.rendering_kwargs == g.rendering_kwargs
    assert_same_state(load_file(str(parity_dir / "params.safetensors")), load_file(str(weights)))
    assert_same_state(load_generator(weights.parent).state_dict(), g.state_dict())  # a folder with one save


def test_failed_save_leaves_no_partial_file(G, tmp_path, monkeypatch):
    target = tmp_path / "G.safetensors"
    target.write_bytes(b"previous")

    def crash(state, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_generator(G, target)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["G.safetensors"]


def test_fixture_folder(G, parity_dir):
    params = load_file(str(parity_dir / "params.safetensors"))  # (safetensors sorts its keys)
    assert sorted(G.state_dict()) == sorted(params)
    assert all(torch.equal(G.state_dict()[k], v) for k, v in params.items())
    assert G.neural_rendering_resolution == 32 and G.num_ws == 8


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.pkl", None, r"absent\.pkl: no such file"),
        ("weights.txt", b"hello", r"weights\.txt: unsupported checkpoint type '\.txt'"),
        ("lonely.safetensors", b"xx", r"lonely\.json: missing"),
    ],
)
def test_errors_name_file_and_problem(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_generator(tmp_path / name)


def test_newer_or_malformed_config_refused(G, tmp_path):
    weights, side = save_generator(G, tmp_path / "G.safetensors")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"G\.json: format version 99 is newer"):
        load_generator(weights)
    side.write_text(json.dumps({k: v for k, v in meta.items() if k != "init_kwargs"}))
    with pytest.raises(CheckpointError, match=r"G\.json: malformed generator config: init_kwargs must be a table"):
        load_generator(weights)
