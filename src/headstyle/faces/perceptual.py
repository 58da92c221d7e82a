"""The projector's perceptual distances: LPIPS-VGG16 from local weights, or a weight-free fallback.

LPIPS (Zhang et al. 2018), VGG16 variant: d(x, y) = sum_l mean_hw || w_l * (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|) ||^2
over relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. As in NVIDIA's vgg16.pt (``return_lpips=True``),
``embed`` returns one vector per image whose squared Euclidean distance is that d, so a target's
embedding is computed once. Weights come from either
- NVIDIA's TorchScript ``vgg16.pt`` (what PanoHead's projector loads): its tensors are read from the
  archive without compiling or running any of the TorchScript code in it (keys
  ``layers.conv{1..13}.{weight,bias}``, ``lpips{0..4}``); or
- a torchvision-layout VGG16 state dict (``features.{0,2,5,...,28}.{weight,bias}``) plus the lpips
  package's linear layers (``lin{0..4}.model.1.weight``), as .pth (weights_only) or .safetensors.
Inputs in [-1, 1] are mapped to ImageNet statistics (the lpips package's scaling layer; the same
mapping for both sources, following genforce's port of vgg16.pt).

Without weights the projector uses LaplacianL1: the L1 distance between Laplacian pyramids (Lap1 of
Bojanowski et al. 2018, "Optimizing the latent space of generative networks"), averaged per level.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle import weight_files
from headstyle.weight_files import WeightsError

# VGG16's convolutions (output channels); "M" a 2x2 max-pool. LPIPS taps the ReLU before each pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# torchvision's index of each convolution in vgg16().features.
_TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# torchvision's vgg16().classifier (512 x 7 x 7 -> 4096 -> 4096 -> 1000), in its state dicts beside the features.
_TORCHVISION_CLASSIFIER = ((512 * 7 * 7, 4096), (4096, 4096), (4096, 1000))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_numel() -> int:
    """Values in VGG16's 13 convolutions (3 x 3 kernels and biases)."""
    channels = [3, *(c for c in _VGG16 if c != "M")]
    return sum(cout * cin * 9 + cout for cin, cout in itertools.pairwise(channels))


# What each weights file holds at most (its budget, headstyle.weight_files.weights_budget, follows from these).
TORCHSCRIPT_NUMEL = _conv_numel() + sum(_LPIPS_CHANNELS)  # NVIDIA's vgg16.pt: convolutions and LPIPS weights
TORCHVISION_NUMEL = _conv_numel() + sum(i * o + o for i, o in _TORCHVISION_CLASSIFIER)  # 138,357,544
LPIPS_LIN_NUMEL = sum(_LPIPS_CHANNELS)


class PerceptualDistance(Protocol):
    """A distance between images in [-1, 1]: d(x, y) = distance(embed(x), embed(y)), per sample."""

    name: str

    def embed(self, images: Tensor) -> Tensor: ...

    def distance(self, a: Tensor, b: Tensor) -> Tensor: ...


class LPIPSVGG16(nn.Module):
    """LPIPS-VGG16 (v0.1) from explicit weights: 13 (weight, bias) convolutions and 5 linear weights (C,)."""

    name = "lpips-vgg16"

    def __init__(self, convs: list[tuple[Tensor, Tensor]], lins: list[Tensor]) -> None:
        super().__init__()
        channels = [c for c in _VGG16 if c != "M"]
        if len(convs) != len(channels) or len(lins) != len(_LPIPS_CHANNELS):
            raise WeightsError(f"LPIPS-VGG16 needs 13 convolutions and 5 linear layers, got {len(convs)}, {len(lins)}")
        self.convs = nn.ModuleList()
        in_ch = 3
        for i, ((weight, bias), out_ch) in enumerate(zip(convs, channels, strict=True)):
            if tuple(weight.shape) != (out_ch, in_ch, 3, 3) or tuple(bias.shape) != (out_ch,):
                raise WeightsError(f"VGG16 conv {i}: expected ({out_ch}, {in_ch}, 3, 3), got {tuple(weight.shape)}")
            conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
            conv.load_state_dict({"weight": weight.float(), "bias": bias.float()})
            self.convs.append(conv)
            in_ch = out_ch
        lin_list = [lin.float().reshape(-1) for lin in lins]
        for i, (lin, ch) in enumerate(zip(lin_list, _LPIPS_CHANNELS, strict=True)):
            if lin.numel() != ch or (lin < 0).any():
                raise WeightsError(f"LPIPS linear layer {i}: expected {ch} weights >= 0, got {tuple(lin.shape)}")
        # sqrt(w_l): the embedding's squared distance then carries the weight w_l.
        self.lin_sqrt = nn.ParameterList([nn.Parameter(lin.sqrt().reshape(1, -1, 1, 1)) for lin in lin_list])
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    @classmethod
    def from_torchvision(cls, vgg: str | os.PathLike, lins: str | os.PathLike) -> LPIPSVGG16:
        """A torchvision VGG16 state dict and the lpips package's vgg.pth linear layers."""
        v = read_state_dict(vgg, TORCHVISION_NUMEL, "give torchvision's VGG16 state dict (vgg16-397923af.pth)")
        lin = read_state_dict(lins, LPIPS_LIN_NUMEL, "give the lpips package's weights/v0.1/vgg.pth")
        try:
            convs = [(v[f"features.{i}.weight"], v[f"features.{i}.bias"]) for i in _TORCHVISION_CONVS]
            lin_list = [lin[f"lin{i}.model.1.weight"] for i in range(len(_LPIPS_CHANNELS))]
        except KeyError as exc:
            raise WeightsError(f"missing key {exc} in {vgg} / {lins}: expected torchvision's features.N.weight and "
                               "the lpips package's lin{0..4}.model.1.weight") from None
        return cls(convs, lin_list)

    @classmethod
    def from_torchscript(cls, path: str | os.PathLike) -> LPIPSVGG16:
        """NVIDIA's vgg16.pt (StyleGAN2-ADA, PanoHead), read without running its TorchScript code."""
        t = read_torchscript_tensors(path)
        try:
            convs = [(t[f"layers.conv{i}.weight"], t[f"layers.conv{i}.bias"]) for i in range(1, 14)]
            lin_list = [t[f"lpips{i}"] for i in range(len(_LPIPS_CHANNELS))]
        except KeyError as exc:
            raise WeightsError(f"{path}: no tensor {exc}; not NVIDIA's vgg16.pt (layers.convN, lpipsN)") from None
        return cls(convs, lin_list)

    def _taps(self, images: Tensor) -> list[Tensor]:
        h = ((images.float() + 1) / 2 - self.mean) / self.std
        taps, conv_index = [], 0
        for item in _VGG16:
            if item == "M":
                taps.append(h)
                h = F.max_pool2d(h, 2)
            else:
                h = F.relu(self.convs[conv_index](h))
                conv_index += 1
        return taps

    def embed(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) with |embed(x) - embed(y)|^2 = LPIPS(x, y)."""
        parts = []
        for f, lin in zip(self._taps(images), self.lin_sqrt, strict=True):
            unit = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            parts.append((unit * lin / (f.shape[-2] * f.shape[-1]) ** 0.5).flatten(1))
        return torch.cat(parts, dim=1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).pow(2).sum(1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(N,) LPIPS distances between images x and y in [-1, 1]."""
        return self.distance(self.embed(x), self.embed(y))


class LaplacianL1(nn.Module):
    """Lap1: sum over pyramid levels j of mean |L_j(x) - L_j(y)| (5-tap binomial pyramid, down to 8 px).

    Bojanowski et al.'s Lap1 is sum_j 2^{2j} |L_j(x) - L_j(y)|_1; with per-level means it is that
    divided by the pixel count. No weights: the fallback when no VGG16 file is given.
    """

    name = "laplacian-l1 (fallback: no VGG16 weights given)"

    def __init__(self, min_size: int = 8) -> None:
        super().__init__()
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        self.register_buffer("kernel", (k[:, None] * k[None, :]).reshape(1, 1, 5, 5))
        self.min_size = min_size

    def _blur(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect"), self.kernel)
        return y.reshape(n, c, h, w)

    def embed(self, images: Tensor) -> Tensor:
        """(N, D): the pyramid's levels, each divided by its size so that the L1 distance averages per level."""
        g = images.float()
        parts = []
        while min(g.shape[-2:]) >= 2 * self.min_size:
            down = self._blur(g)[..., ::2, ::2]
            up = F.interpolate(down, size=g.shape[-2:], mode="bilinear", align_corners=False)
            parts.append((g - up).flatten(1) / g[0].numel())
            g = down
        parts.append(g.flatten(1) / g[0].numel())
        return torch.cat(parts, dim=1)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().sum(1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.distance(self.embed(x), self.embed(y))


def load_perceptual(vgg16: str | os.PathLike | None = None, lpips_lin: str | os.PathLike | None = None) -> nn.Module:
    """LPIPS-VGG16 from NVIDIA's vgg16.pt (``vgg16`` alone) or torchvision VGG16 + lpips linear weights
    (both given); LaplacianL1 when neither is given."""
    if vgg16 is None:
        if lpips_lin is not None:
            raise WeightsError("the LPIPS linear weights need the VGG16 backbone weights too (--vgg16)")
        return LaplacianL1()
    path = Path(vgg16)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file (VGG16 weights are read from a local file; nothing is downloaded)")
    if lpips_lin is not None:
        return LPIPSVGG16.from_torchvision(path, lpips_lin)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return LPIPSVGG16.from_torchscript(path)
    raise WeightsError(f"{path}: not a TorchScript vgg16.pt; a torchvision VGG16 state dict needs --lpips-lin "
                       "(the lpips package's weights/v0.1/vgg.pth)")


def read_state_dict(path: str | os.PathLike, numel: int, hint: str) -> dict[str, Tensor]:
    """The state dict (.safetensors, or a .pth read weights-only, possibly under "state_dict") of a network of
    ``numel`` values: a file that declares more than such a network needs is refused before it is read, as is one
    whose tensors repeat their data (headstyle.weight_files)."""
    return weight_files.read_state_dict(path, weight_files.weights_budget(numel), WeightsError, hint, ("state_dict",))


# ---------------------------------------------------------------------------------------------
# Reading a TorchScript archive's tensors without executing it


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in z.namelist())


class _ScriptObject:
    """Inert stand-in for a TorchScript class instance: keeps its attribute dict, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("TorchScript object with a non-dict state")
        self.attributes = state


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip


def _rebuild_tensor(storage: Tensor, offset: int, size: Any, stride: Any, *_ignored: Any) -> Tensor:
    """A view of the storage (not a copy: the extents are checked once every tensor is known)."""
    if not isinstance(storage, Tensor):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(offset))


class _ScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl: classes become _ScriptObject, tensors are read from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source
        self._classes: dict[str, type] = {}
        self._storages: dict[str, Tensor] = {}  # each record read once, however many tensors view it

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self._classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {}))
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise WeightsError(f"{self.source}: refused global {module}.{name} in the TorchScript archive; only "
                           "modules and tensors are read (nothing in the file was executed)")

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        key = str(pid[2])
        if key not in self._storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self._storages[key] = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return self._storages[key].view(pid[1])


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, _ScriptObject):
        for key, value in getattr(obj, "attributes", {}).items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor attribute of a TorchScript module archive, by dotted name ('layers.conv1.weight').

    The archive's directory must fit vgg16.pt's TORCHSCRIPT_NUMEL values before any member is inflated, and the
    tensors, views of its storage records, must each hold their own data (headstyle.weight_files)."""
    path = Path(path)
    hint = "give NVIDIA's vgg16.pt (StyleGAN2-ADA's / PanoHead's)"
    out: dict[str, Tensor] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            if problem := weight_files.zip_problem(archive.infolist(), weight_files.weights_budget(TORCHSCRIPT_NUMEL)):
                raise WeightsError(f"{path}: {problem}; {hint}")
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(f"{path}: not a TorchScript archive (no top-level data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            _flatten(_ScriptUnpickler(archive.read(pickles[0]), archive, prefix, path).load(), "", out)
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, EOFError, RuntimeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise WeightsError(f"{path}: unreadable TorchScript archive ({type(exc).__name__}: {reason})") from None
    if problem := weight_files.extent_problem(out):
        raise WeightsError(f"{path}: {problem}; {hint}")
    return out
