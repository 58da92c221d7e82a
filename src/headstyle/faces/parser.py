"""Face parsing into region masks with BiSeNet (face-parsing.PyTorch), read from a local checkpoint.

Network: BiSeNet (Yu et al. 2018) as zllrunning/face-parsing.PyTorch trains it on CelebAMask-HQ: a
ResNet-18 context path (features at 1/8, 1/16, 1/32), attention refinement modules on the 1/16 and 1/32
features plus a global-average context, the 1/8 ResNet features standing in for the spatial path, a
feature fusion module and a 19-class output head; the two auxiliary heads of training (on the 1/8 and
1/16 context features) are part of the checkpoint and not evaluated. Weights: the repository's
``79999_iter.pth``, a plain state dict (keys ``cp.resnet.conv1.weight`` ... ``conv_out32.conv_out.weight``),
read with torch.load(weights_only=True) or from .safetensors; names and shapes are checked against the
network before anything is loaded, so a wrong file is one line and no code in a file ever runs.

Input convention (the repository's test.py): RGB resized to 512 x 512 (bilinear), ImageNet mean/std;
the logits are upsampled to the input (bilinear, align_corners=True) and here resized back to the image.

Classes (CelebAMask-HQ, index 0 background): ``CLASSES``. ``REGION_CLASSES`` groups them into the
regions a style mask names (skin, hair, eyes, brows, lips, ...); ``region_masks`` gives one mask per
region, hard (the pixel's most likely class is in the region: exact zeros elsewhere, which Style Fusion
Attention needs to drop style tokens) or soft (the summed class probabilities).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.weight_files import WeightsError, load_strict, meta_numel, read_state_dict, weights_budget

CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip
REGION_CLASSES: dict[str, tuple[str, ...]] = {
    "skin": ("skin", "nose", "l_ear", "r_ear", "neck"),
    "face": ("skin", "nose", "l_brow", "r_brow", "l_eye", "r_eye", "mouth", "u_lip", "l_lip"),
    "hair": ("hair",),
    "eyes": ("l_eye", "r_eye"),
    "brows": ("l_brow", "r_brow"),
    "lips": ("u_lip", "l_lip"),
    "mouth": ("mouth", "u_lip", "l_lip"),
    "nose": ("nose",),
    "ears": ("l_ear", "r_ear"),
    "neck": ("neck",),
    "accessories": ("eye_g", "ear_r", "neck_l", "hat"),
    "cloth": ("cloth",),
    "head": tuple(c for c in CLASSES if c not in ("background", "cloth", "neck_l")),
}
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNReLU(nn.Module):
    """conv (no bias) -> batch norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a (projected when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))


class ResNet18(nn.Module):
    """ResNet-18 without its classifier, returning the 1/8, 1/16 and 1/32 features (128, 256, 512 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, padding=1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


def _global_context(x: Tensor) -> Tensor:
    return x.mean((2, 3), keepdim=True)


class AttentionRefinement(nn.Module):
    """Features re-weighted per channel by a sigmoid of their global average (BiSeNet's ARM)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_context(feat))))


class ContextPath(nn.Module):
    """ResNet-18 features, refined and merged top-down: (1/8 ResNet, 1/8 context, 1/16 context)."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f8, f16, f32 = self.resnet(x)
        # the global context is constant over the 1/32 grid: nearest upsampling is a broadcast
        f32 = self.arm32(f32) + self.conv_avg(_global_context(f32))
        up32 = self.conv_head32(F.interpolate(f32, f16.shape[-2:], mode="nearest"))
        f16 = self.arm16(f16) + up32
        up16 = self.conv_head16(F.interpolate(f16, f8.shape[-2:], mode="nearest"))
        return f8, up16, up32


class FeatureFusion(nn.Module):
    """Concatenated spatial and context features, plus their channel-attention re-weighting (BiSeNet's FFM)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, kernel=1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_context(feat)))))
        return feat * (1 + atten)


class OutputHead(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser (module names as in face-parsing.PyTorch's checkpoints)."""

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, classes)
        # Training's auxiliary heads: in every checkpoint, so the file loads whole; inference reads conv_out only.
        self.conv_out16 = OutputHead(128, 64, classes)
        self.conv_out32 = OutputHead(128, 64, classes)
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor) -> Tensor:
        """Normalised images (N, 3, H, W) -> class logits (N, classes, H, W)."""
        f8, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(f8, context8))
        return F.interpolate(logits, x.shape[-2:], mode="bilinear", align_corners=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BiSeNet:
        """face-parsing.PyTorch's checkpoint (e.g. 79999_iter.pth) or the same tensors as .safetensors."""
        state = read_weights(path)  # before the network is built: a file that cannot be it costs nothing
        net = cls()
        load_strict(net, state, path, "face-parsing.PyTorch's BiSeNet (79999_iter.pth, 19 classes)")
        return net.requires_grad_(False).eval()


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A plain state dict: .safetensors, or a torch file read with weights_only=True (nothing in it runs), within
    the budget of a BiSeNet's values (headstyle.weight_files)."""
    hint = "give face-parsing.PyTorch's 79999_iter.pth (a plain state dict)"
    return read_state_dict(path, weights_budget(meta_numel(BiSeNet)), WeightsError, hint)


@torch.no_grad()
def parse(net: BiSeNet, images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """Class probabilities (N, classes, H, W) of RGB images (N, 3, H, W) in [-1, 1], parsed at size x size."""
    h, w = images.shape[-2:]
    x = F.interpolate((images.float() + 1) / 2, (size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    logits = net((x - mean) / std)
    return F.interpolate(logits, (h, w), mode="bilinear", align_corners=False).softmax(1)


def check_regions(names: tuple[str, ...]) -> None:
    """Refuse an empty or unknown choice; a region is a name of REGION_CLASSES or of CLASSES."""
    known = set(REGION_CLASSES) | set(CLASSES)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown face regions {unknown or '(none given)'}; choose from "
                         f"{', '.join(REGION_CLASSES)} or a class ({', '.join(CLASSES[1:])})")  # fmt: skip


def region_masks(probs: Tensor, names: tuple[str, ...], hard: bool = True) -> Tensor:
    """The union of the named regions' classes (N, H, W) in [0, 1] from class probabilities (N, classes, H, W).

    hard: 1 where the most likely class belongs to a region, else exactly 0; soft: the summed probabilities.
    """
    check_regions(names)
    classes = sorted({CLASSES.index(c) for n in names for c in REGION_CLASSES.get(n, (n,))})
    if hard:
        return torch.isin(probs.argmax(1), torch.tensor(classes, device=probs.device)).float()
    return probs[:, classes].sum(1).clamp(0, 1)
