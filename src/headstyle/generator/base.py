"""The Generator seam: what every renderer of heads (PanoHead, the synthetic lab) returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

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


FieldSampler = Callable[[Tensor], tuple[Tensor, Tensor]]
"""The 3D field of fixed ws: world points (N, M, 3) -> raw density sigma (N, M), the renderer's
pre-activation (PanoHead: softplus(sigma - 1) per unit length), and rgb (N, M, 3) in the raw
image's units (about [-1, 1]): the colour image_raw shows where an opaque surface sits at that point."""


@runtime_checkable
class Generator(Protocol):
    """A camera-conditioned 3D head generator with PanoHead's call signature.

    mapping(z, c, truncation_psi, truncation_cutoff) -> ws (N, num_ws, w_dim)
    trigrid(ws) -> planes: the ws-dependent volume every camera is rendered from (PanoHead's tri-grid)
    synthesis(ws, c, noise_mode=..., render_sr=True, generate_background=True, planes=None) -> RenderOutput

    planes=trigrid(ws_i) of I identities renders K = N / I cameras of each (ws and c identity-major)
    from its one tri-grid: the backbone runs once per identity, and the K cameras' gradients are
    accumulated in the one planes tensor, as separate calls' would sum.

    generate_background=False renders without a background network (the LD script trains so);
    a generator without one renders its constant background either way. init_kwargs: the
    constructor arguments that headstyle.generator.checkpoint rebuilds the generator from, or
    None for generators it cannot rebuild (their saves hold the weights only).

    img_resolution: the side of ``image`` (super-resolved); neural_rendering_resolution: the side of
    ``image_raw``, ``depth`` and ``mask``; box_warp: the side of the world-space cube the tri-grid
    spans, centred at the origin (meshes are extracted from it).
    """

    z_dim: int
    w_dim: int
    num_ws: int
    img_resolution: int
    neural_rendering_resolution: int
    init_kwargs: Mapping[str, Any] | None

    @property
    def box_warp(self) -> float: ...

    def mapping(
        self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> Tensor: ...

    def trigrid(self, ws: Tensor, noise_mode: str = "const") -> Tensor: ...

    def synthesis(
        self,
        ws: Tensor,
        c: Tensor,
        noise_mode: str = "const",
        render_sr: bool = True,
        generate_background: bool = True,
        planes: Tensor | None = None,
    ) -> RenderOutput: ...

    def trainable_parameters(self, modules: tuple[str, ...], train_biases: bool) -> list[nn.Parameter]: ...

    def field_sampler(self, ws: Tensor) -> FieldSampler:
        """The field of ws (N, num_ws, w_dim) at any world points (meshes), its ws-dependent part
        (PanoHead's tri-grid) computed once."""
        ...


def select_parameters(module: nn.Module, modules: tuple[str, ...], train_biases: bool) -> list[nn.Parameter]:
    """Parameters under the module prefixes ``modules``, without those ending in '.bias' unless train_biases
    (the LD script's selection); every generator's trainable_parameters."""
    known = {name for name, _ in module.named_modules()}
    unknown = [m for m in modules if m not in known]
    if unknown:
        top = [n for n, _ in module.named_children()]
        raise ValueError(f"unknown modules {unknown}; top-level modules are {top}")
    return [
        p
        for name, p in module.named_parameters()
        if any(name.startswith(m + ".") for m in modules) and (train_biases or not name.endswith(".bias"))
    ]
