"""PanoHead's TriPlaneGenerator: StyleGAN2 tri-grid backbone + volume renderer + background + 8x SR.

Module tree and state_dict keys follow SizheAn/PanoHead (training/triplane.py), so an official
G_ema state_dict loads with strict=True and the constructor takes the init kwargs stored in its .pkl.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.generator.base import FieldSampler, RenderOutput, select_parameters
from headstyle.generator.layers import (
    FullyConnectedLayer,
    MappingNetwork,
    NoiseMode,
    StyleGAN2Backbone,
    SynthesisNetwork,
    ToRGBLayer,
)
from headstyle.generator.renderer import ImportanceRenderer, RenderDraws, crop_mask, query_trigrid, ray_sampler
from headstyle.generator.superresolution import SuperresolutionHybrid8XDC

FEATURE_CHANNELS = 32  # features per tri-grid cell, decoded to sigma + 32 colour features
TRIGRID_PLANES = 3


class OSGDecoder(nn.Module):
    """Tri-grid feature decoder: mean over the 3 planes -> FC(32, 64) -> softplus -> FC(64, 1 + 32).

    Channel 0 is the raw density sigma, channels 1..32 the colour features (no activation in PanoHead).
    """

    def __init__(
        self,
        n_features: int = FEATURE_CHANNELS,
        hidden_dim: int = 64,
        output_dim: int = FEATURE_CHANNELS,
        lr_multiplier: float = 1.0,
        activation: str = "none",
    ) -> None:
        if activation not in ("none", "sigmoid", "lrelu"):
            raise ValueError(f"decoder_activation must be 'none', 'sigmoid' or 'lrelu', got {activation!r}")
        super().__init__()
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, hidden_dim, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(hidden_dim, 1 + output_dim, lr_multiplier=lr_multiplier),
        )

    def forward(self, sampled_features: Tensor, ray_directions: Tensor) -> dict[str, Tensor]:
        """sampled_features (N, 3, M, C) -> {"sigma": (N, M, 1), "rgb": (N, M, output_dim)}."""
        x = sampled_features.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        rgb, sigma = x[..., 1:], x[..., 0:1]
        if self.activation == "sigmoid":
            rgb = torch.sigmoid(rgb) * (1 + 2 * 0.001) - 0.001
        elif self.activation == "lrelu":
            rgb = F.leaky_relu(rgb, 0.2) * math.sqrt(2)
        return {"rgb": rgb, "sigma": sigma}


def _build_superresolution(class_name: str, **kwargs: Any) -> SuperresolutionHybrid8XDC:
    if class_name.rsplit(".", 1)[-1] != SuperresolutionHybrid8XDC.__name__:
        raise ValueError(
            f"superresolution_module {class_name!r} is not supported: only SuperresolutionHybrid8XDC "
            "(PanoHead's 512 px SR) is implemented"
        )
    return SuperresolutionHybrid8XDC(**kwargs)


def _checked_rendering_kwargs(rendering_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``rendering_kwargs``, refused when it lacks a key the constructor reads."""
    rendering_kwargs = dict(rendering_kwargs or {})
    missing = [
        k
        for k in ("triplane_size", "triplane_depth", "superresolution_module", "sr_antialias", "decoder_activation")
        if k not in rendering_kwargs
    ]
    if missing:
        raise ValueError(f"rendering_kwargs lacks {missing}: pass the rendering_kwargs stored in the checkpoint")
    return rendering_kwargs


def _build_background(
    w_dim: int, resolution: int, rendering_kwargs: Mapping[str, Any], synthesis_kwargs: Mapping[str, Any]
) -> SynthesisNetwork | None:
    """PanoHead's background synthesis at the SR input ``resolution`` (None unless use_background)."""
    if not rendering_kwargs.get("use_background", False):
        return None
    bcg_kwargs = dict(synthesis_kwargs)
    # Half the backbone's channel base (32768 is SynthesisNetwork's default).
    bcg_kwargs["channel_base"] = bcg_kwargs.get("channel_base", 32768) // 2
    return SynthesisNetwork(w_dim, img_resolution=resolution, img_channels=FEATURE_CHANNELS, **bcg_kwargs)


def _build_camera_offset(z_dim: int, c_dim: int, mapping_kwargs: Mapping[str, Any]) -> MappingNetwork:
    """Self-adaptive camera offset: a small mapping network predicting a translation delta (w_dim 3)."""
    return MappingNetwork(
        z_dim=z_dim,
        c_dim=c_dim,
        w_dim=3,
        num_ws=1,
        last_activation="linear",
        **{**mapping_kwargs, "lr_multiplier": 1.0},
    )


def pad_ws(ws: Tensor, num_ws: int) -> Tensor:
    """The first ``num_ws`` ws, repeating the last one when there are fewer (PanoHead's background ws)."""
    ws = ws[:, :num_ws]
    if ws.shape[1] < num_ws:
        ws = torch.cat([ws, ws[:, -1:].repeat(1, num_ws - ws.shape[1], 1)], 1)
    return ws


class TriPlaneGenerator(nn.Module):
    """PanoHead generator. ``G(z, c)`` = mapping -> camera offset (apply_delta_c) -> synthesis.

    Constructor arguments are those stored in an official checkpoint's init kwargs; rendering_kwargs
    holds the renderer settings (triplane_size, triplane_depth, ray_start, ...).
    ``neural_rendering_resolution`` (default 64) is an attribute, as in the original.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        sr_num_fp16_res: int = 0,
        mapping_kwargs: Mapping[str, Any] | None = None,
        rendering_kwargs: Mapping[str, Any] | None = None,
        sr_kwargs: Mapping[str, Any] | None = None,
        **synthesis_kwargs: Any,
    ) -> None:
        super().__init__()
        # The constructor kwargs, as PanoHead's persistence records them: what save_generator writes back.
        self.init_kwargs = copy.deepcopy(
            dict(
                z_dim=z_dim,
                c_dim=c_dim,
                w_dim=w_dim,
                img_resolution=img_resolution,
                img_channels=img_channels,
                sr_num_fp16_res=sr_num_fp16_res,
                mapping_kwargs=dict(mapping_kwargs or {}),
                rendering_kwargs=dict(rendering_kwargs or {}),
                sr_kwargs=dict(sr_kwargs or {}),
                **synthesis_kwargs,
            )
        )
        mapping_kwargs = dict(mapping_kwargs or {})
        rendering_kwargs = _checked_rendering_kwargs(rendering_kwargs)
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.rendering_kwargs = rendering_kwargs
        self.neural_rendering_resolution = 64
        self.triplane_depth = int(rendering_kwargs["triplane_depth"])

        # training_loop.py registers this after construction; it is in every snapshot (and unused).
        self.register_buffer("dataset_label_std", torch.zeros(c_dim))
        self.renderer = ImportanceRenderer()
        self.backbone = StyleGAN2Backbone(
            z_dim,
            c_dim,
            w_dim,
            img_resolution=rendering_kwargs["triplane_size"],
            img_channels=FEATURE_CHANNELS * TRIGRID_PLANES * self.triplane_depth,
            mapping_kwargs=mapping_kwargs,
            **synthesis_kwargs,
        )
        self.superresolution = _build_superresolution(
            rendering_kwargs["superresolution_module"],
            channels=FEATURE_CHANNELS,
            img_resolution=img_resolution,
            sr_num_fp16_res=sr_num_fp16_res,
            sr_antialias=rendering_kwargs["sr_antialias"],
            **(sr_kwargs or {}),
        )
        self.decoder = OSGDecoder(
            FEATURE_CHANNELS,
            lr_multiplier=rendering_kwargs.get("decoder_lr_mul", 1),
            output_dim=FEATURE_CHANNELS,
            activation=rendering_kwargs["decoder_activation"],
        )
        self.torgb = ToRGBLayer(FEATURE_CHANNELS, 3, w_dim) if rendering_kwargs.get("use_torgb_raw", False) else None
        self.bcg_synthesis = _build_background(
            w_dim, self.superresolution.input_resolution, rendering_kwargs, synthesis_kwargs
        )
        self.t_mapping = _build_camera_offset(z_dim, c_dim, mapping_kwargs)

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    @property
    def box_warp(self) -> float:
        """The side of the world-space cube the tri-grid spans (rendering_kwargs["box_warp"])."""
        return float(self.rendering_kwargs["box_warp"])

    def _label(self, c: Tensor) -> Tensor:
        return torch.zeros_like(c) if self.rendering_kwargs.get("c_gen_conditioning_zero", False) else c

    @property
    def c_scale(self) -> float:
        # The original's default is 0 (unconditional) when the key is absent.
        return self.rendering_kwargs.get("c_scale", 0)

    def mapping(
        self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> Tensor:
        """z (N, z_dim), camera label c (N, 25) -> ws (N, num_ws, w_dim), truncated toward w_avg."""
        return self.backbone.mapping(
            z, self._label(c) * self.c_scale, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff
        )

    def apply_delta_c(
        self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Camera with PanoHead's learned offset added to the translation entries 3, 7, 11 -> (c_new, delta_c)."""
        c = self._label(c)
        delta_c = self.t_mapping(
            z, c * self.c_scale, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff
        ).squeeze(1)
        c_new = c.clone()
        c_new[:, [3, 7, 11]] = c_new[:, [3, 7, 11]] + delta_c
        return c_new, delta_c

    def trigrid(self, ws: Tensor, noise_mode: NoiseMode = "const", generator: torch.Generator | None = None) -> Tensor:
        """The tri-grid (N, 3, 32 * D, R, R) from the backbone's (N, 288, R, R) output."""
        planes = self.backbone.synthesis(ws, noise_mode=noise_mode, generator=generator)
        return planes.view(len(planes), TRIGRID_PLANES, FEATURE_CHANNELS * self.triplane_depth, *planes.shape[-2:])

    def field_sampler(self, ws: Tensor, noise_mode: NoiseMode = "const") -> FieldSampler:
        """The field of ws at world points (N, M, 3), as synthesis renders it (PanoHead's sample_mixed).

        sigma (N, M): the decoder's raw density with the renderer's triplane crop (0.1) applied.
        rgb (N, M, 3): the decoder's colour features mapped as image_raw maps the composited ones
        (x2 - 1 under a sigmoid decoder, then torgb with ws[:, -1], or the first 3 features).
        """
        planes = self.trigrid(ws, noise_mode=noise_mode)
        grid = planes.view(len(ws), TRIGRID_PLANES, FEATURE_CHANNELS, self.triplane_depth, *planes.shape[-2:])
        box_warp = self.rendering_kwargs["box_warp"]

        def sample(points: Tensor) -> tuple[Tensor, Tensor]:
            # The decoder ignores directions; gen_samples passes -z.
            directions = points.new_tensor([0.0, 0.0, -1.0]).expand_as(points)
            out = query_trigrid(grid, self.decoder, points, directions, box_warp)
            sigma = torch.where(crop_mask(points, 0.1, box_warp), -1e3, out["sigma"])[..., 0]
            features = out["rgb"] * 2 - 1 if self.decoder.activation == "sigmoid" else out["rgb"]
            if self.torgb is None:
                return sigma, features[..., :3]
            # torgb is a 1x1 convolution: the M points are the pixels of an (M, 1) image.
            rgb = self.torgb(features.transpose(1, 2).unsqueeze(-1), ws[:, -1], fused_modconv=False)
            return sigma, rgb.to(torch.float32)[..., 0].transpose(1, 2)

        return sample

    def background(
        self, ws: Tensor, size: int, noise_mode: NoiseMode = "const", generator: torch.Generator | None = None
    ) -> Tensor:
        """Background features (N, 32, size, size) from ws[:, :12] (last w repeated if fewer)."""
        bcg = self.bcg_synthesis(pad_ws(ws, self.bcg_synthesis.num_ws), noise_mode=noise_mode, generator=generator)
        return F.interpolate(
            bcg,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=self.rendering_kwargs["sr_antialias"],
        )

    def synthesis(
        self,
        ws: Tensor,
        c: Tensor,
        noise_mode: NoiseMode = "const",
        render_sr: bool = True,
        neural_rendering_resolution: int | None = None,
        draws: RenderDraws | None = None,
        generator: torch.Generator | None = None,
        generate_background: bool = True,
        planes: Tensor | None = None,
    ) -> RenderOutput:
        """Render ws (N, num_ws, w_dim) at cameras c (N, 25).

        ``neural_rendering_resolution`` overrides the attribute for this call only (the original also
        stores it). render_sr=False skips the super-resolution (image=None; the raw image, depth and mask are the
        same). ``draws`` injects the renderer's two random tensors; otherwise they come from
        ``generator`` (or the global RNG), which also drives noise_mode='random'. The SR always uses
        rendering_kwargs['superresolution_noise_mode'], whatever noise_mode says.
        generate_background=False skips the background network, as the LD script renders its training views.
        ``planes``: trigrid computed before (the backbone is not run again), one row per identity: ws and c then
        hold K = N / len(planes) consecutive rows per identity, all rendered from its one tri-grid.
        """
        if c.ndim != 2 or c.shape[1] != 25:
            raise ValueError(f"c must be (N, 25) camera labels [cam2world (16), intrinsics (9)], got {tuple(c.shape)}")
        resolution = neural_rendering_resolution or self.neural_rendering_resolution
        n = ws.shape[0]
        ray_origins, ray_directions = ray_sampler(c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3), resolution)
        if planes is None:
            planes = self.trigrid(ws, noise_mode=noise_mode, generator=generator)
        elif n % planes.shape[0]:
            raise ValueError(f"planes hold {planes.shape[0]} tri-grids for {n} ws: pass K ws per tri-grid")
        grid = planes.reshape(len(planes), TRIGRID_PLANES, FEATURE_CHANNELS, self.triplane_depth, *planes.shape[-2:])
        features, depth, weights_sum = self.renderer(
            grid, self.decoder, ray_origins, ray_directions, self.rendering_kwargs, draws=draws, generator=generator
        )

        feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], resolution, resolution)
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, resolution, resolution)
        weights_image = weights_sum.permute(0, 2, 1).reshape(n, 1, resolution, resolution)
        if self.decoder.activation == "sigmoid":
            feature_image = feature_image * 2 - 1
        if self.bcg_synthesis is not None and generate_background:
            bcg = self.background(ws, resolution, noise_mode=noise_mode, generator=generator)
            feature_image = feature_image + (1 - weights_image) * bcg
        if self.torgb is not None:
            rgb_image = self.torgb(feature_image, ws[:, -1], fused_modconv=False).to(torch.float32)
        else:
            rgb_image = feature_image[:, :3]

        image = None
        if render_sr:
            image = self.superresolution(
                rgb_image,
                feature_image,
                ws,
                noise_mode=self.rendering_kwargs.get("superresolution_noise_mode", "none"),
                generator=generator,
            )
        mask = weights_image * (1 + 2 * 0.001) - 0.001
        return RenderOutput(image=image, image_raw=rgb_image, depth=depth_image, mask=mask, planes=planes)

    def forward(
        self,
        z: Tensor,
        c: Tensor,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "const",
        render_sr: bool = True,
        neural_rendering_resolution: int | None = None,
        draws: RenderDraws | None = None,
        generator: torch.Generator | None = None,
    ) -> RenderOutput:
        """mapping -> apply_delta_c -> synthesis at the offset camera, as PanoHead's G(z, c)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        c_new, _ = self.apply_delta_c(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(
            ws,
            c_new,
            noise_mode=noise_mode,
            render_sr=render_sr,
            neural_rendering_resolution=neural_rendering_resolution,
            draws=draws,
            generator=generator,
        )

    def trainable_parameters(
        self, modules: tuple[str, ...] = ("backbone.synthesis", "superresolution"), train_biases: bool = False
    ) -> list[nn.Parameter]:
        return select_parameters(self, modules, train_biases)
