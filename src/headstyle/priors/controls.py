"""ControlNet control images from renders: Canny edges, depth maps, optional monocular depth.

All functions take batches (N, C, H, W) and return float32 control images (N, 3, H, W) in [0, 1],
the format diffusers' SD ControlNets expect.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from headstyle.input_files import read_json_object
from headstyle.weight_files import WeightsError, load_transformers

# OpenCV's Canny fixed-point constants: tan(22.5 deg) in Q15
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> 0..255 integer levels exactly as the LD script (clip((x+1)*127.5), truncate)."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def canny(gray: Tensor, low: float = 50, high: float = 250) -> Tensor:
    """OpenCV-equivalent Canny (3x3 Sobel, L1 magnitude) of uint8 images (N, H, W) -> bool edges (N, H, W).

    Sobel with replicated borders, non-maximum suppression in four directions with OpenCV's integer
    tangent tests and tie-breaking, candidates m > low, seeds m > high, 8-connected hysteresis.
    """
    if gray.dim() != 3:
        raise ValueError(f"canny expects (N, H, W) uint8 levels, got shape {tuple(gray.shape)}")
    lo, hi = sorted((math.floor(low), math.floor(high)))
    img = gray.float()[:, None]
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=img.device)
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]
    grads = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernels).round().long()
    dx, dy = grads[:, 0], grads[:, 1]
    mag = dx.abs() + dy.abs()
    padded = F.pad(mag, (1, 1, 1, 1))  # outside the image the magnitude is 0, as in OpenCV's row buffers
    h, w = mag.shape[-2:]

    def at(di: int, dj: int) -> Tensor:
        return padded[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    x = dx.abs()
    y = dy.abs() << _CANNY_SHIFT
    tg22x = x * _TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << (_CANNY_SHIFT + 1)))
    diagonal = ~horizontal & ~vertical
    opposite = (dx < 0) ^ (dy < 0)  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep_h = (mag > at(0, -1)) & (mag >= at(0, 1))
    keep_v = (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep_d = torch.where(opposite, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    local_max = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    candidate = (mag > lo) & local_max
    return _hysteresis(candidate, candidate & (mag > hi))


def _hysteresis(candidate: Tensor, strong: Tensor) -> Tensor:
    """Keep the 8-connected components of `candidate` that contain a `strong` pixel (N, H, W bools).

    Works on the sparse graph of candidate pixels: max-label propagation along neighbour pairs with
    pointer jumping, so the cost is O(#candidates) per round and few rounds are needed.
    """
    k = int(candidate.sum())
    if k == 0:
        return candidate.clone()
    ids = torch.full(candidate.shape, -1, dtype=torch.long, device=candidate.device)
    ids[candidate] = torch.arange(k, device=candidate.device)
    padded = F.pad(ids, (1, 1, 0, 1), value=-1)  # one column each side, one row below
    h, w = candidate.shape[-2:]
    src_parts, dst_parts = [], []
    for di, dj in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each undirected 8-neighbour pair once
        other = padded[:, di : di + h, 1 + dj : 1 + dj + w]
        both = candidate & (other >= 0)
        src_parts.append(ids[both])
        dst_parts.append(other[both])
    src, dst = torch.cat(src_parts), torch.cat(dst_parts)
    labels = torch.arange(k, device=candidate.device)
    while True:
        new = labels.scatter_reduce(0, src, labels[dst], reduce="amax")
        new = new.scatter_reduce(0, dst, new[src], reduce="amax")
        for _ in range(4):  # pointer jumping: adopt the label of one's label
            new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    seeded = torch.zeros(k, device=candidate.device).scatter_reduce(0, labels, strong[candidate].float(), reduce="amax")
    out = torch.zeros_like(candidate)
    out[candidate] = seeded[labels] > 0
    return out


def canny_control(images: Tensor, low: float = 50, high: float = 250, channel: int = 0) -> Tensor:
    """Canny-ControlNet input from renders in [-1, 1] (N, 3, H, W): edges of the red channel, 3 channels.

    As the LD script: cv2.Canny(uint8 red channel, 50, 250), repeated to RGB; white edges on black.
    """
    edges = canny(to_uint8(images[:, channel]), low, high)
    return edges[:, None].float().expand(-1, 3, -1, -1).contiguous()


def _minmax(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-image (x - min) / (max - min + 1e-6) as the LD script, over valid pixels when a mask is given."""
    flat = x.flatten(1)
    big = torch.finfo(flat.dtype).max
    vmask = torch.ones_like(flat, dtype=torch.bool) if valid is None else valid.flatten(1)
    lo = torch.where(vmask, flat, big).amin(1, keepdim=True)
    hi = torch.where(vmask, flat, -big).amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-6)).clamp(0, 1).reshape(x.shape)


def depth_control(depth: Tensor, mask: Tensor | None = None, far: float | None = None) -> Tensor:
    """Depth-ControlNet input from rendered depth (N, 1, H, W), distance along rays: near = white.

    SD 1.5 depth ControlNets were trained on MiDaS inverse depth (near bright), so the depth is
    optionally clipped at `far`, min-max normalised per image over the foreground and inverted;
    background pixels (mask < 0.5) are black.
    """
    d = depth.float()
    if far is not None:
        d = d.clamp(max=far)
    valid = None if mask is None else mask.float() > 0.5
    control = 1.0 - _minmax(d, valid)
    if valid is not None:
        control = control * valid
    return control.expand(-1, 3, -1, -1).contiguous()


def disparity_control(disparity: Tensor) -> Tensor:
    """Depth-ControlNet input from a relative inverse depth (e.g. Depth Anything): min-max to [0, 1], 3 channels."""
    return _minmax(disparity.float()).expand(-1, 3, -1, -1).contiguous()


class MonocularDepth:
    """A transformers depth estimator (e.g. Depth Anything V2 ViT-B) loaded from a LOCAL folder.

    Preprocessing follows Depth Anything's reference transform: resize so both sides are at least
    input_size (aspect kept, multiples of 14, bicubic), ImageNet normalisation; the prediction is
    resized back with bilinear align_corners=True like the LD script. Output: relative inverse depth.
    """

    HUB_ID = "depth-anything/Depth-Anything-V2-Base-hf"

    def __init__(
        self,
        model: torch.nn.Module,
        input_size: int = 518,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        multiple_of: int = 14,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.input_size = input_size
        self.multiple_of = multiple_of
        self.mean = torch.tensor(mean).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std).reshape(1, 3, 1, 1)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> MonocularDepth:
        """Load from a local transformers folder (config.json, model.safetensors, preprocessor_config.json); weights
        that do not fit the config are a WeightsError before any is allocated (headstyle.weight_files)."""
        from transformers import AutoModelForDepthEstimation

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"depth estimator folder {os.fspath(folder)!r} has no config.json. Download it where there is "
                f"network, e.g. `hf download {cls.HUB_ID} --local-dir checkpoints/Depth-Anything-V2-Base-hf`, "
                "and pass that folder (or use the generator's rendered depth, the default)."
            )
        hint = f"give a local transformers depth folder, e.g. a download of {cls.HUB_ID}"
        model = load_transformers(AutoModelForDepthEstimation, path, WeightsError, hint, dtype=dtype).to(device)
        kwargs = {}
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = read_json_object(pre, WeightsError, hint)
            size = cfg.get("size", {})
            kwargs = {
                "mean": tuple(cfg.get("image_mean", (0.485, 0.456, 0.406))),
                "std": tuple(cfg.get("image_std", (0.229, 0.224, 0.225))),
                "input_size": int(size.get("height", 518)) if isinstance(size, dict) else int(size),
                "multiple_of": int(cfg.get("ensure_multiple_of", 14)),
            }
        return cls(model, **kwargs)

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        scale = max(self.input_size / h, self.input_size / w)

        def snap(v: float) -> int:
            m = self.multiple_of
            out = round(v / m) * m
            return out if out >= self.input_size else math.ceil(v / m) * m

        return snap(scale * h), snap(scale * w)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Renders in [-1, 1] (N, 3, H, W) -> float32 relative inverse depth (N, 1, H, W), near = large."""
        p = next(self.model.parameters())
        h, w = images.shape[-2:]
        x = ((images.float() + 1) / 2).clamp(0, 1)
        x = F.interpolate(x, size=self._target_size(h, w), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        pred = self.model(pixel_values=x.to(p.device, p.dtype)).predicted_depth.float()
        return F.interpolate(pred[:, None], size=(h, w), mode="bilinear", align_corners=True).to(images.device)
