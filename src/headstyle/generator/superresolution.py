"""EG3D/PanoHead's 8x hybrid super-resolution: 64 px neural render -> 512 px image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headstyle.generator.layers import NoiseMode, SynthesisBlock


class SuperresolutionHybrid8XDC(nn.Module):
    """Two StyleGAN2 skip blocks: 128 -> 256 px (``channels`` -> 256 ch) -> 512 px (128 ch).

    The raw RGB and the feature image are first resized to 128 px (bilinear, optionally antialiased).
    Every layer is modulated by the last w, the SR's w_dim is fixed to 512 and conv_clamp is 256 when
    the blocks are fp16-capable (``sr_num_fp16_res > 0``), as in the original.
    """

    input_resolution = 128

    def __init__(
        self,
        channels: int,
        img_resolution: int,
        sr_num_fp16_res: int,
        sr_antialias: bool,
        num_fp16_res: int = 4,
        conv_clamp: float | None = None,
        channel_base: int | None = None,
        channel_max: int | None = None,
        **block_kwargs,
    ) -> None:
        # num_fp16_res, conv_clamp, channel_base and channel_max are accepted for checkpoint
        # compatibility and ignored, exactly as the original does.
        del num_fp16_res, conv_clamp, channel_base, channel_max
        if img_resolution != 512:
            raise ValueError(f"SuperresolutionHybrid8XDC produces 512 px images, got img_resolution={img_resolution}")
        super().__init__()
        use_fp16 = sr_num_fp16_res > 0
        clamp = 256 if use_fp16 else None
        self.sr_antialias = sr_antialias
        self.block0 = SynthesisBlock(channels, 256, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                     use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
        self.block1 = SynthesisBlock(256, 128, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                     use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)

    def resize_inputs(self, rgb: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Bring the raw RGB and the feature image to the 128 px input resolution."""
        if x.shape[-1] == self.input_resolution:
            return rgb, x
        size = (self.input_resolution, self.input_resolution)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        return rgb, x

    def forward(
        self,
        rgb: Tensor,
        x: Tensor,
        ws: Tensor,
        noise_mode: NoiseMode = "none",
        fused_modconv: bool | str | None = None,
        force_fp32: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """rgb: (N, 3, h, w) raw image, x: (N, channels, h, w) features, ws: (N, num_ws, 512) -> (N, 3, 512, 512)."""
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        rgb, x = self.resize_inputs(rgb, x)
        kwargs = {"noise_mode": noise_mode, "fused_modconv": fused_modconv, "force_fp32": force_fp32,
                  "generator": generator}
        x, rgb = self.block0(x, rgb, ws, **kwargs)
        _, rgb = self.block1(x, rgb, ws, **kwargs)
        return rgb
