"""Delta D (DiffStyle360): how far stylisation moved the monocular depth of each view.

A Depth Anything (V1 or V2) checkpoint in transformers' layout, from a local folder (e.g. a download
of depth-anything/Depth-Anything-V2-Small-hf, its weights as model.safetensors, checked against the config
before any is allocated), predicts relative inverse depth for every view; its
image processor resizes (V2: 518 px, multiple of 14, aspect kept) and normalises. The prediction is
resized bilinearly back to the image size. Depth Anything's output has an unknown scale and shift
per image, so each map is min-max normalised to [0, 1] first, n(D) = (D - min D) / (max D - min D),
and

    Delta D = mean over pixels of (n(D(stylised)) - n(D(unedited)))^2

per view pair (the "L2 depth difference" of DiffStyle360, as a mean squared difference), then
averaged over pairs. 0 = the same relative depth; it is invariant to any positive affine change of
either prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from headstyle.export import to_uint8
from headstyle.weight_files import WeightsError, check_folder_json, load_transformers


class DepthAnything:
    """Relative inverse depth of images from a local transformers depth-estimation folder."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.path = Path(folder)
        hint = "give a local transformers depth folder, e.g. a download of depth-anything/Depth-Anything-V2-Small-hf"
        # config and weights are compared before any weight exists (headstyle.weight_files.load_transformers)
        self.model = load_transformers(AutoModelForDepthEstimation, self.path, WeightsError, hint)
        check_folder_json(self.path, WeightsError, hint)
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{self.path}: not a loadable depth model ({type(exc).__name__}: {exc})") from None
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.name = f"depth:{self.path.name}"

    @torch.no_grad()
    def predict(self, images: Tensor, batch: int = 8) -> Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, H, W) relative inverse depth (float32, CPU)."""
        size = tuple(images.shape[-2:])
        out = []
        for start in range(0, len(images), batch):
            pil = [Image.fromarray(a) for a in to_uint8(images[start : start + batch])]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            depth = self.model(pixel_values=pixels).predicted_depth.float()
            out.append(F.interpolate(depth[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].cpu())
        return torch.cat(out)


def normalise_depth(depth: Tensor) -> Tensor:
    """Per-map min-max to [0, 1] over the last two axes (a constant map becomes 0)."""
    lo = depth.amin((-2, -1), keepdim=True)
    hi = depth.amax((-2, -1), keepdim=True)
    return (depth - lo) / (hi - lo).clamp_min(1e-12)


def delta_d(depth_a: Tensor, depth_b: Tensor) -> Tensor:
    """Mean squared difference of min-max normalised paired depth maps (..., H, W) -> (...,)."""
    return (normalise_depth(depth_a.double()) - normalise_depth(depth_b.double())).square().mean((-2, -1))
