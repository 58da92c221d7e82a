"""FID and KID with the standard FID Inception-v3 network, read from a local weights file.

Network: TensorFlow's Inception-v3 graph of 2015-12-05 as the FID papers use it (Heusel et al. 2017;
Binkowski et al. 2018 for KID), in the PyTorch port of pytorch-fid and torch-fidelity: batch-norm
eps 1e-3, average pools that do not count padding, a max pool in the last block, features = the
2048-D global average pool ("pool3"). Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``,
byte-identical to torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (keys
``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.branch_pool.bn.running_var``; the 1008-way classifier
``fc.*`` is not needed and ignored), read with torch.load(weights_only=True) or as .safetensors.
Clean-FID's TorchScript ``inception-2015-12-05.pt`` is not read (its tensors sit under other names).

Resizing convention (torch-fidelity's, i.e. the original TensorFlow FID code's): images are first
quantised to uint8 with PanoHead's rounding (headstyle.export.to_uint8), resized to 299 x 299 with
TensorFlow 1.x bilinear resampling (align_corners=False: source = destination * in/out, no half-pixel
offset, no antialiasing) and mapped to [-1, 1] by (x - 128) / 128. Clean-FID (PIL bicubic,
antialiased) and pytorch-fid (PyTorch's bilinear) resize differently and report other numbers for
the same images, by up to several FID points at 512 px.

- FID = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) on pool3 features (float64;
  headstyle.metrics.style.frechet_distance, or the same value through the images' Gram matrix when
  there are fewer images than 2048); 0 for identical sets.
- KID = unbiased MMD^2 with the cubic kernel k(x, y) = (x . y / d + 1)^3, averaged over ``subsets``
  random subsets of ``subset_size`` (torch-fidelity's 100 x 1000, capped at the smaller set); its
  mean and standard deviation over subsets (one subset, std 0, when both sets fit whole). Both need
  at least 2 images per set.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.export import to_uint8
from headstyle.faces.perceptual import read_state_dict
from headstyle.metrics.style import frechet_distance
from headstyle.weight_files import load_strict, meta_numel

INPUT_SIZE = 299
FEATURES = 2048
FC_NUMEL = FEATURES * 1008 + 1008  # the weights files' 1008-way classifier (read within the budget, then dropped)
BN_EPS = 1e-3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    # TensorFlow's average pool divides by the number of real (not padded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):  # fmt: skip
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last two blocks; TensorFlow's graph max-pools in the second one's pool branch (``max_pool``)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)  # fmt: skip


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1.x tf.image.resize_bilinear(align_corners=False) of (N, C, H, W) floats to size x size:
    output pixel i samples the input at i * in / out (no half-pixel offset; float32 coordinates as in
    TensorFlow's kernel), edges clamped."""

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    ylo, yhi, fy = axis(x.shape[-2])
    xlo, xhi, fx = axis(x.shape[-1])
    # Along x first, then y: TensorFlow's order of operations, so the result matches it to the last bit.
    upper, lower = x[..., ylo, :], x[..., yhi, :]
    top = upper[..., xlo] + (upper[..., xhi] - upper[..., xlo]) * fx
    bottom = lower[..., xlo] + (lower[..., xhi] - lower[..., xlo]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInception(nn.Module):
    """The FID Inception-v3 up to its 2048-D pool3 features (module names as in the weights files)."""

    name = "inception-v3-fid"

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.requires_grad_(False).eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FIDInception:
        """pytorch-fid's / torch-fidelity's weights (.pth read weights-only, or .safetensors)."""
        hint = "give pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        state = {k: v for k, v in read_state_dict(path, meta_numel(cls) + FC_NUMEL, hint).items()
                 if not k.startswith("fc.")}  # fmt: skip
        net = cls()
        load_strict(net, state, path, "the FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        return net

    @torch.no_grad()
    def forward(self, images_uint8: Tensor) -> Tensor:
        """(N, 3, H, W) uint8 RGB -> (N, 2048) float32 pool3 features (see the module docstring)."""
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            shape = tuple(images_uint8.shape)
            raise ValueError(f"expected (N, 3, H, W) uint8 images, got {images_uint8.dtype} {shape}")
        x = resize_bilinear_tf1(images_uint8.float(), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):  # fmt: skip
            x = block(x)
        return x.mean((2, 3))


def inception_features(net: FIDInception, images: Tensor, batch: int = 16) -> Tensor:
    """(N, 3, H, W) images in [-1, 1] -> (N, 2048) pool3 features, quantised to uint8 first."""
    device = next(net.parameters()).device
    feats = []
    for start in range(0, len(images), batch):
        u8 = torch.from_numpy(to_uint8(images[start : start + batch])).permute(0, 3, 1, 2)
        feats.append(net(u8.to(device)).cpu())
    return torch.cat(feats)


def fid(feats_a: Tensor, feats_b: Tensor) -> float:
    """Frechet distance between two (n, D) / (m, D) feature sets (float64).

    With fewer images than feature dimensions the covariances have rank < n, and the cross term is
    exactly tr((S_a^1/2 S_b S_a^1/2)^1/2) = ||X_b X_a^T||_* / sqrt((n - 1)(m - 1)) for the centred
    features X (the nuclear norm of an m x n matrix instead of square roots of D x D matrices)."""
    n, m = len(feats_a), len(feats_b)
    if min(n, m) < 2:
        raise ValueError("FID needs at least 2 images in each set")
    if min(n, m) >= feats_a.shape[1]:
        return frechet_distance(feats_a, feats_b)
    a, b = feats_a.double(), feats_b.double()
    ca, cb = a - a.mean(0), b - b.mean(0)
    cross = torch.linalg.svdvals(cb @ ca.T).sum() / math.sqrt((n - 1) * (m - 1))
    traces = ca.square().sum() / (n - 1) + cb.square().sum() / (m - 1)
    fd = (a.mean(0) - b.mean(0)).square().sum() + traces - 2 * cross
    return float(fd.clamp_min(0))


def polynomial_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 of two (n, d) / (m, d) samples under k(a, b) = (a . b / d + 1)^3 (float64)."""
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3), ((y @ y.T / d + 1) ** 3), ((x @ y.T / d + 1) ** 3)
    n, m = len(x), len(y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def kid(feats_a: Tensor, feats_b: Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Kernel Inception Distance: mean and std of polynomial_mmd2 over random subsets (seeded)."""
    size = min(subset_size, len(feats_a), len(feats_b))
    if size < 2:
        raise ValueError("KID needs at least 2 images in each set")
    if size == len(feats_a) == len(feats_b):
        return polynomial_mmd2(feats_a, feats_b), 0.0  # every subset would be the whole of both sets
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd2(feats_a[rng.choice(len(feats_a), size, replace=False)],
                        feats_b[rng.choice(len(feats_b), size, replace=False)])
        for _ in range(subsets)
    ]  # fmt: skip
    return float(np.mean(values)), float(np.std(values))
