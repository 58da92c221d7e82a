"""The lab generator: procedural heads behind PanoHead's generator interface.

- ``mapping(z, c, psi, cutoff)``: ws = psi * z broadcast to ``num_ws`` (w_avg = 0; z ~ N(0, I)
  is the identity code of headstyle.lab.world.heads, the camera is ignored as in c_scale = 0).
- ``synthesis(ws, c)``: identity parameters from ws[:, 0]; rays from headstyle's ray_sampler;
  at each sample the FROZEN procedural field (world.head_field, the "pretrained" part) plus
  a trainable residual field; composited by headstyle's ray_march onto a white background.
- The residual ("backbone.synthesis") is shared across identities: a tri-grid of features
  sampled with PanoHead's sample_from_trigrid, concatenated with the frozen field's local
  descriptors (colour, region weights, signed distance) and decoded by a small MLP into
  (delta sigma, delta rgb). Its last layer starts at zero, so the untouched generator renders
  the procedural identities exactly; a style learned here is a function of local field
  properties, like a fine-tuned synthesis network is a function of ws.
- ``superresolution``: bilinear x``sr_factor`` upsampling without weights (image = upsampled raw).
- ``planes``: the field (distance and colour, residual included) plus a fixed random code of
  the identity on a coarse lattice, laid out as a tri-grid (N, 3, C, L, L) for the
  relative-distance regulariser (see ``LabGenerator.lattice``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.generator.base import FieldSampler, RenderOutput, select_parameters
from headstyle.generator.renderer import ray_march, ray_sampler, sample_from_trigrid
from headstyle.lab.world.heads import NUM_PARAMS, REGIONS, SHADING_BAND, head_field, params_from_z

LAB_RENDERING_KWARGS: dict[str, Any] = {
    "ray_start": 2.25,
    "ray_end": 3.05,
    "depth_resolution": 36,
    "box_warp": 0.8,
    "clamp_mode": "softplus",
    "background": 1.0,
}
DESCRIPTOR_DIM = 3 + len(REGIONS) + 1
LATTICE = 12
LATTICE_CODE_SCALE = 1.0


class ResidualField(nn.Module):
    """Trainable (delta sigma, delta rgb) at points: tri-grid features + frozen descriptors -> MLP."""

    def __init__(self, channels: int = 4, depth: int = 4, resolution: int = 24, hidden: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.trigrid = nn.Parameter(0.5 * torch.randn(1, 3, channels, depth, resolution, resolution, generator=gen))
        self.fc0 = nn.Linear(channels + DESCRIPTOR_DIM, hidden)
        self.fc1 = nn.Linear(hidden, 4)
        with torch.no_grad():
            self.fc0.weight.copy_(
                torch.randn(self.fc0.weight.shape, generator=gen) / (channels + DESCRIPTOR_DIM) ** 0.5
            )
            self.fc0.bias.zero_()
            self.fc1.weight.zero_()
            self.fc1.bias.zero_()
        # delta sigma is in PanoHead's raw-density units, where the inside of the head is ~150.
        self.sigma_scale = 10.0

    def forward(self, points: Tensor, descriptors: Tensor, box_warp: float) -> tuple[Tensor, Tensor]:
        """points (P, 3), descriptors (P, DESCRIPTOR_DIM) -> delta sigma (P,), delta rgb (P, 3)."""
        feats = sample_from_trigrid(self.trigrid, points.unsqueeze(0), box_warp).mean(1)[0]
        h = F.softplus(self.fc0(torch.cat([feats, descriptors], dim=-1)))
        out = self.fc1(h)
        return self.sigma_scale * out[:, 0], out[:, 1:]


class LabSynthesis(nn.Module):
    """The "synthesis backbone" of the lab generator: only the residual field has weights."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.synthesis = ResidualField(seed=seed)


class Upsample(nn.Module):
    """Weight-free "super-resolution": bilinear upsampling of the raw image (antialiased when shrinking)."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, image_raw: Tensor) -> Tensor:
        if self.factor == 1:
            return image_raw
        return F.interpolate(image_raw, scale_factor=self.factor, mode="bilinear", align_corners=False)


def descriptors(field_rgb: Tensor, regions: Tensor, sdf: Tensor) -> Tensor:
    """What the residual sees of the frozen field at a point: colour, region weights, squashed sdf."""
    return torch.cat([field_rgb, regions, torch.tanh(sdf / 0.02).unsqueeze(-1)], dim=-1)


def _world_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """The procedural world is the ground truth, not a network: evaluated without grad and in fp32 under autocast."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(torch.autocast(like.device.type, enabled=False))
    return stack


class LabGenerator(nn.Module):
    """Procedural heads with PanoHead's generator interface (see the module docstring).

    style: render the ground-truth stylised world instead (a frozen "oracle" generator for metrics).
    residual: False builds a generator without trainable weights (oracles and exemplar renders).
    """

    # Lab generators are not rebuilt by headstyle.generator.checkpoint: their saves hold the weights only.
    init_kwargs = None

    def __init__(
        self,
        resolution: int = 32,
        sr_factor: int = 2,
        num_ws: int = 14,
        style: str | None = None,
        seed: int = 0,
        rendering_kwargs: dict[str, Any] | None = None,
        residual: bool = True,
    ):
        super().__init__()
        self.z_dim = NUM_PARAMS
        self.w_dim = NUM_PARAMS
        self._num_ws = num_ws
        self.neural_rendering_resolution = resolution
        self.style = style
        self.rendering_kwargs = dict(LAB_RENDERING_KWARGS if rendering_kwargs is None else rendering_kwargs)
        self.backbone = LabSynthesis(seed=seed) if residual else None
        # A fixed random code of the identity in every lattice cell (see ``lattice``).
        gen = torch.Generator().manual_seed(seed + 1)
        code = LATTICE_CODE_SCALE * torch.randn(4, LATTICE**3, NUM_PARAMS, generator=gen) / NUM_PARAMS**0.5
        self.register_buffer("lattice_code", code, persistent=False)
        self.superresolution = Upsample(sr_factor)

    @property
    def num_ws(self) -> int:
        return self._num_ws

    @property
    def img_resolution(self) -> int:
        return self.neural_rendering_resolution * self.superresolution.factor

    @property
    def box_warp(self) -> float:
        """The side of the world-space cube the residual tri-grid spans (rendering_kwargs["box_warp"])."""
        return float(self.rendering_kwargs["box_warp"])

    def mapping(
        self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> Tensor:
        """ws (N, num_ws, w_dim) = psi * z for the first ``truncation_cutoff`` ws (w_avg = 0), z elsewhere."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be (N, {self.z_dim}) for the lab generator, got {tuple(z.shape)}")
        ws = z.float().unsqueeze(1).repeat(1, self.num_ws, 1)
        cutoff = self.num_ws if truncation_cutoff is None else min(truncation_cutoff, self.num_ws)
        ws[:, :cutoff] = ws[:, :cutoff] * truncation_psi
        return ws

    def field(self, ws: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Raw sigma (N, M) and colour (N, M, 3) at world points (N, M, 3): frozen field + residual.

        The residual acts where the frozen field is shaded (within SHADING_BAND of its surface).
        """
        with _world_precision(points):
            frozen = head_field(params_from_z(ws[:, 0]), points, self.style)
        if self.backbone is None:
            return frozen.sigma, frozen.rgb
        with torch.no_grad():
            idx = (frozen.sdf < SHADING_BAND).nonzero(as_tuple=True)
            desc = descriptors(frozen.rgb[idx], frozen.regions[idx], frozen.sdf[idx])
        d_sigma, d_rgb = self.backbone.synthesis(points[idx], desc, self.rendering_kwargs["box_warp"])
        sigma = frozen.sigma.index_put(idx, frozen.sigma[idx] + d_sigma)
        rgb = frozen.rgb.index_put(idx, frozen.rgb[idx] + d_rgb)
        return sigma, rgb

    def field_sampler(self, ws: Tensor) -> FieldSampler:
        """``field`` of ws with the colour mapped as the raw image maps it (2 * rgb - 1)."""

        def sample(points: Tensor) -> tuple[Tensor, Tensor]:
            sigma, rgb = self.field(ws, points)
            return sigma, rgb * 2 - 1

        return sample

    def trigrid(self, ws: Tensor, noise_mode: str = "const") -> Tensor:
        """The lab's per-identity volume: its lattice (the renders themselves query the field point by point)."""
        return self.lattice(ws)

    def lattice(self, ws: Tensor) -> Tensor:
        """The field on a LATTICE^3 grid over the head, as a tri-grid (N, 3, C, L, L) for the regulariser.

        Channels: 5 * sdf - delta sigma / 20 and colour + delta rgb, plus a fixed random linear code of
        the identity parameters in every cell. The regulariser divides by the frozen generator's
        distances between identities per cell and channel; the field alone coincides for two
        identities at many cells (far from both surfaces, equal colours), the code keeps every
        distance away from zero, as PanoHead's tri-grid features do.
        """
        n = ws.shape[0]
        axis = torch.linspace(-0.28, 0.28, LATTICE, device=ws.device)
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(1, -1, 3).expand(n, -1, -1)
        with _world_precision(pts):
            frozen = head_field(params_from_z(ws[:, 0]), pts, self.style, shading_band=float("inf"))
        sdf, rgb = 5 * frozen.sdf, frozen.rgb
        if self.backbone is not None:
            desc = descriptors(frozen.rgb, frozen.regions, frozen.sdf).reshape(-1, DESCRIPTOR_DIM)
            d_sigma, d_rgb = self.backbone.synthesis(pts.reshape(-1, 3), desc, self.rendering_kwargs["box_warp"])
            # More density acts like a smaller distance to the surface.
            sdf = sdf - d_sigma.reshape(n, -1) / 20
            rgb = rgb + d_rgb.reshape(n, -1, 3)
        code = torch.einsum("clp,np->ncl", self.lattice_code, params_from_z(ws[:, 0]))
        grid = torch.cat([sdf.unsqueeze(-1), rgb], dim=-1).transpose(1, 2) + code
        c = grid.shape[1]
        # Three slabs of LATTICE / 3 x-slices each play the role of PanoHead's three planes.
        slabs = grid.reshape(n, c, 3, LATTICE // 3, LATTICE, LATTICE).transpose(1, 2)
        return slabs.reshape(n, 3, c * (LATTICE // 3), LATTICE, LATTICE)

    def synthesis(
        self,
        ws: Tensor,
        c: Tensor,
        noise_mode: str = "const",
        render_sr: bool = True,
        generate_background: bool = True,
        planes: Tensor | None = None,
        neural_rendering_resolution: int | None = None,
    ) -> RenderOutput:
        """Render ws (N, num_ws, w_dim) at cameras c (N, 25): images in [-1, 1], ray depth, mask, lattice.

        Samples sit at fixed depths (no stratified jitter), so rendering is deterministic. The lab has
        no noise inputs and no background network (``noise_mode`` and ``generate_background`` change
        nothing: the background is the constant rendering_kwargs["background"]). ``planes``: trigrid(ws) computed
        before, returned as the renders' planes instead of computing the lattice again.
        """
        if c.ndim != 2 or c.shape[1] != 25:
            raise ValueError(f"c must be (N, 25) camera labels, got {tuple(c.shape)}")
        if ws.shape[0] != c.shape[0]:
            raise ValueError(f"ws holds {ws.shape[0]} identities but c holds {c.shape[0]} cameras")
        res = neural_rendering_resolution or self.neural_rendering_resolution
        rk = self.rendering_kwargs
        n = ws.shape[0]
        origins, dirs = ray_sampler(c[:, :16].reshape(-1, 4, 4), c[:, 16:].reshape(-1, 3, 3), res)
        s = rk["depth_resolution"]
        depths = torch.linspace(rk["ray_start"], rk["ray_end"], s, device=ws.device).reshape(1, 1, s, 1)
        depths = depths.expand(n, res * res, s, 1)
        points = (origins.unsqueeze(2) + depths * dirs.unsqueeze(2)).reshape(n, -1, 3)
        sigma, rgb = self.field(ws, points)
        rgb_img, depth, weights = ray_march(
            rgb.reshape(n, res * res, s, 3), sigma.reshape(n, res * res, s, 1), depths, rk
        )
        mask = weights.sum(2)
        rgb_img = rgb_img + (1 - mask) * rk["background"]

        def to_image(x: Tensor) -> Tensor:
            return x.permute(0, 2, 1).reshape(n, x.shape[-1], res, res)

        image_raw = to_image(rgb_img) * 2 - 1
        image = self.superresolution(image_raw) if render_sr else None
        return RenderOutput(
            image=image,
            image_raw=image_raw,
            depth=to_image(depth),
            mask=to_image(mask),
            planes=self.trigrid(ws) if planes is None else planes,
        )

    def trainable_parameters(
        self, modules: tuple[str, ...] = ("backbone.synthesis", "superresolution"), train_biases: bool = False
    ) -> list[nn.Parameter]:
        return select_parameters(self, modules, train_biases)

    def render(self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, render_sr: bool = True) -> RenderOutput:
        """mapping + synthesis in one call (the camera label also conditions the mapping, which ignores it)."""
        return self.synthesis(self.mapping(z, c, truncation_psi), c, render_sr=render_sr)
