"""ArcFace identity similarity with pure-PyTorch backbones that read the weight files the papers used.

Two families, told apart by the file's tensor names (module names below follow those files):
- IR-SE50 (TreB1eN's InsightFace_Pytorch ``model_ir_se50.pth``, the ID loss of pSp/e4e/StyleGAN-NADA
  and of 3D-GAN stylisation papers): ``input_layer``, 24 SE bottlenecks ``body.N``, ``output_layer``;
  the embedding is L2-normalised. Faces are FFHQ-aligned (headstyle.faces.align.ffhq_quad from dlib's
  68 landmarks) into a 256 px crop, cut to rows 35:223 and columns 32:220 and average-pooled to
  112 px, as pSp's IDLoss does; pixels in [-1, 1].
- iresnet18/34/50/100 (insightface's arcface_torch ``backbone.pth``): ``conv1``, ``layer1..4``, ``fc``,
  ``features``. Faces are warped by the least-squares similarity (Umeyama) of five landmark points
  (eye centres, nose tip, mouth corners, from dlib's 68) onto ArcFace's 112 px template, as
  insightface's norm_crop does; pixels (x / 255 - 0.5) / 0.5, RGB.

Similarity is the cosine of the two L2-normalised 512-D embeddings (1 = the same embedding).
Faces come from dlib's HOG detector (headstyle.metrics.dlib_identity.largest_faces); images without one
get no embedding and are counted by the caller.
"""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.faces.align import ffhq_quad, quad_to_crop
from headstyle.faces.detect import Face
from headstyle.faces.perceptual import read_state_dict
from headstyle.weight_files import WeightsError, load_strict, meta_numel

EMBEDDING_DIM = 512
ARCFACE_SIZE = 112
# pSp's IDLoss: FFHQ-aligned 256 px images, this window, then pooled to 112 px.
FFHQ_SIZE = 256
PSP_ROWS, PSP_COLS = (35, 223), (32, 220)
# insightface's arcface_dst: eye centres, nose tip, mouth corners in the 112 px crop (image-left first).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
# Units per stage of IR-SE / iresnet depths (the same for both families).
IR_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
IRESNET_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------
# IR-SE (TreB1eN / pSp)


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convolutions, reduction 16."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class BottleneckIRSE(nn.Module):
    """BN, 3x3 conv, PReLU, 3x3 conv (stride), BN, SE; plus a shortcut (subsampling, or 1x1 conv + BN)."""

    def __init__(self, cin: int, depth: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.shortcut_layer = (
            None if cin == depth else nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Without a projection the shortcut is MaxPool2d(1, stride): plain subsampling.
        shortcut = x[..., :: self.stride, :: self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class IRSE(nn.Module):
    """IR-SE-{50,100,152} for 112 px faces -> L2-normalised 512-D embeddings."""

    def __init__(self, num_layers: int = 50, affine: bool = True) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        blocks, cin = [], 64
        for units, depth in zip(IR_UNITS[num_layers], STAGE_WIDTHS, strict=True):
            for u in range(units):
                blocks.append(BottleneckIRSE(cin, depth, 2 if u == 0 else 1))
                cin = depth
        self.body = nn.Sequential(*blocks)
        # Indices as in the files: 0 BN2d, 1 dropout, 2 flatten, 3 linear, 4 BN1d.
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Identity(), nn.Flatten(), nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM, affine=affine),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


# ---------------------------------------------------------------------------------------------
# iresnet (insightface arcface_torch)


class IBasicBlock(nn.Module):
    """BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN; plus the shortcut (1x1 conv + BN when shapes change)."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            if stride != 1 or cin != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """insightface's iresnet-{18,34,50,100} for 112 px faces -> L2-normalised 512-D embeddings."""

    def __init__(self, num_layers: int = 50) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (units, planes) in enumerate(zip(IRESNET_UNITS[num_layers], STAGE_WIDTHS, strict=True)):
            blocks = [IBasicBlock(cin if u == 0 else planes, planes, 2 if u == 0 else 1) for u in range(units)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512 * 7 * 7, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.normalize(self.features(self.fc(self.bn2(x).flatten(1))), dim=1)


def _units(state: dict[str, Tensor], prefix: str) -> int:
    """Number of residual units under ``prefix`` (e.g. 'body.' or 'layer3.') in a state dict."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return len(indices)


def architecture(state: dict[str, Tensor]) -> tuple[str, int]:
    """('ir_se', depth) or ('iresnet', depth) from a state dict's tensor names and unit counts."""
    if "input_layer.0.weight" in state:
        total = _units(state, "body.")
        for depth, units in IR_UNITS.items():
            if sum(units) == total:
                return "ir_se", depth
    elif "conv1.weight" in state and "features.running_mean" in state:
        counts = tuple(_units(state, f"layer{i}.") for i in range(1, 5))
        for depth, units in IRESNET_UNITS.items():
            if units == counts:
                return "iresnet", depth
    raise WeightsError(
        "not an ArcFace backbone this reads: expected IR-SE (model_ir_se50.pth: input_layer, body, output_layer) "
        "or an insightface iresnet (backbone.pth: conv1, layer1..4, fc, features)"
    )


@functools.cache
def largest_numel() -> int:
    """Values in the largest backbone this reads (counted on the meta device): a file's budget, before its names
    tell the family and depth."""
    builds = [functools.partial(IRSE, d) for d in IR_UNITS] + [functools.partial(IResNet, d) for d in IRESNET_UNITS]
    return max(meta_numel(build) for build in builds)


# ---------------------------------------------------------------------------------------------
# Face alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) matrix of the least-squares similarity x -> s R x + t taking points src onto dst (Umeyama 1991)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    u, sing, vt = np.linalg.svd(dc.T @ sc / len(src))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ d @ vt
    scale = np.trace(np.diag(sing) @ d) / (sc**2).sum(1).mean()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """ArcFace's five points from dlib's 68: eye centres (image-left first), nose tip, mouth corners."""
    lm = np.asarray(landmarks, np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def arcface_crop(image: np.ndarray, face: Face) -> np.ndarray:
    """insightface's norm_crop: the 112 px uint8 crop of the five-point similarity onto the template."""
    mat = similarity_transform(five_points(face.landmarks), ARCFACE_TEMPLATE)
    return cv2.warpAffine(np.ascontiguousarray(image), mat, (ARCFACE_SIZE, ARCFACE_SIZE), borderValue=0.0)


def ffhq_crop(image: np.ndarray, face: Face) -> np.ndarray:
    """The face's FFHQ-aligned 256 px uint8 crop (the quad of headstyle.faces.align, bilinear)."""
    mat = quad_to_crop(ffhq_quad(face.landmarks), FFHQ_SIZE)
    return cv2.warpAffine(np.ascontiguousarray(image), mat, (FFHQ_SIZE, FFHQ_SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)  # fmt: skip


def psp_input(ffhq_256: Tensor) -> Tensor:
    """pSp's IDLoss input from FFHQ-aligned (N, 3, 256, 256) images in [-1, 1]: the window, pooled to 112."""
    window = ffhq_256[..., PSP_ROWS[0] : PSP_ROWS[1], PSP_COLS[0] : PSP_COLS[1]]
    return F.adaptive_avg_pool2d(window, ARCFACE_SIZE)


class ArcFace:
    """An ArcFace backbone from a local file and the face alignment its family expects."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        state = read_state_dict(path, largest_numel(), "give model_ir_se50.pth (IR-SE50) or an insightface "
                                "arcface_torch backbone.pth (iresnet)")  # fmt: skip
        try:
            self.family, depth = architecture(state)
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None
        if self.family == "ir_se":
            net: nn.Module = IRSE(depth, affine="output_layer.4.weight" in state)
        else:
            net = IResNet(depth)
        self.name = f"{self.family}{depth}"
        load_strict(net, state, path, f"an ArcFace {self.name}")
        self.net = net.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    def crop(self, image: np.ndarray, face: Face) -> Tensor:
        """(3, 112, 112) network input in [-1, 1] for one detected face of an RGB uint8 image."""
        if self.family == "ir_se":
            x = torch.from_numpy(ffhq_crop(image, face)).permute(2, 0, 1).float() / 127.5 - 1
            return psp_input(x[None])[0]
        return torch.from_numpy(arcface_crop(image, face)).permute(2, 0, 1).float() / 127.5 - 1

    @torch.no_grad()
    def embed_crops(self, crops: Tensor) -> Tensor:
        """(N, 3, 112, 112) aligned faces in [-1, 1] -> (N, 512) unit embeddings (float32)."""
        return self.net(crops.to(self.device)).float().cpu()

    def embed(self, images: np.ndarray, faces: list[Face | None]) -> tuple[Tensor, Tensor]:
        """(N, H, W, 3) uint8 and each image's face (None: none found) -> embeddings (N, 512) (zeros where
        no face) and found (N,) bool."""
        out = torch.zeros(len(images), EMBEDDING_DIM)
        rows = [i for i, face in enumerate(faces) if face is not None]
        if rows:
            out[rows] = self.embed_crops(torch.stack([self.crop(images[i], faces[i]) for i in rows]))
        return out, torch.tensor([f is not None for f in faces], dtype=torch.bool)
