"""The Generator seam: what every renderer of heads (PanoHead, the synthetic lab) returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@dataclass
class RenderOutput:
    """One batch of renders.

    image:     (N, 3, H, W) super-resolved image in about [-1, 1]; None when rendered raw only.
    image_raw: (N, 3, h, w) raw neural render (PanoHead: the ToRGB of the feature image, 64 px).
    depth:     (N, 1, h, w) composited depth along each ray.
    mask:      (N, 1, h, w) volume-render weight sum (PanoHead scales it by 1.002, -0.001).
    planes:    the tri-grid (N, 3, C * D, R, R) the renders came from, for regularisers.
    """

    image: Tensor | None
    image_raw: Tensor
    depth: Tensor
    mask: Tensor
    planes: Tensor | None = None


@runtime_checkable
class Generator(Protocol):
    """A camera-conditioned 3D head generator with PanoHead's call signature.

    mapping(z, c, truncation_psi, truncation_cutoff) -> ws (N, num_ws, w_dim)
    synthesis(ws, c, noise_mode=..., render_sr=True) -> RenderOutput
    """

    z_dim: int
    num_ws: int

    def mapping(
        self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> Tensor: ...

    def synthesis(
        self, ws: Tensor, c: Tensor, noise_mode: str = "const", render_sr: bool = True
    ) -> RenderOutput: ...

    def trainable_parameters(self, modules: tuple[str, ...], train_biases: bool) -> list[nn.Parameter]: ...
