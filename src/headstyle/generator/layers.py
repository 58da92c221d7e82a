"""StyleGAN2 building blocks with the numerics and state_dict layout of NVlabs' networks_stylegan2.

Weights are stored unscaled and the equalized-learning-rate gains are applied at forward time
(fully connected: w * lr_mul / sqrt(in), b * lr_mul; conv: w / sqrt(in * k * k)), so that
official checkpoints load unchanged. Resampling is a pure-PyTorch upfirdn2d with the stored
``resample_filter`` buffers; no custom CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NoiseMode = Literal["random", "const", "none"]
NOISE_MODES = ("random", "const", "none")
DEFAULT_FILTER = (1, 3, 3, 1)

# name -> (function of (x, alpha), default alpha, default gain)
ACTIVATIONS: dict[str, tuple[Callable[[Tensor, float], Tensor], float, float]] = {
    "linear": (lambda x, alpha: x, 0.0, 1.0),
    "relu": (lambda x, alpha: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, alpha: F.leaky_relu(x, alpha), 0.2, math.sqrt(2)),
    "tanh": (lambda x, alpha: torch.tanh(x), 0.0, 1.0),
    "sigmoid": (lambda x, alpha: torch.sigmoid(x), 0.0, 1.0),
    "softplus": (lambda x, alpha: F.softplus(x), 0.0, 1.0),
}


def _activation(name: str) -> tuple[Callable[[Tensor, float], Tensor], float, float]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def bias_act(
    x: Tensor, b: Tensor | None = None, act: str = "linear", gain: float | None = None, clamp: float | None = None
) -> Tensor:
    """Add a per-channel bias (dim 1), apply ``act``, scale by ``gain`` (activation default) and clamp to +-clamp."""
    func, alpha, def_gain = _activation(act)
    if b is not None:
        x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    x = func(x, alpha)
    gain = def_gain if gain is None else float(gain)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """x / sqrt(mean(x^2) + eps) along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ---------------------------------------------------------------------------------------------
# Resampling: upfirdn2d (upsample by zero insertion, pad, FIR filter, downsample)


def setup_filter(taps: Sequence[float] = DEFAULT_FILTER) -> Tensor:
    """2-D FIR filter (outer product of ``taps``) normalised to unit DC gain, float32."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _pad4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1) from an int, (x, y) or (x0, x1, y0, y1)."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    x0, x1, y0, y1 = padding
    return x0, x1, y0, y1


def upfirdn2d(
    x: Tensor,
    f: Tensor | None,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> Tensor:
    """Upsample by inserting up-1 zeros, pad (negative = crop), convolve with the 2-D filter ``f``, keep every
    ``down``-th pixel. ``f`` is a convolution kernel unless ``flip_filter`` (then a correlation kernel)."""
    if f is None:
        f = torch.ones(1, 1, dtype=torch.float32, device=x.device)
    if f.ndim != 2:
        raise ValueError(f"upfirdn2d expects a 2-D filter, got shape {tuple(f.shape)}")
    n, c, h, w = x.shape
    px0, px1, py0, py1 = _pad4(padding)
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    f = (f * gain).to(x.dtype)
    if not flip_filter:
        f = f.flip([0, 1])
    x = F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::down, ::down]


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """Upsample by ``up`` with the FIR filter ``f`` (output size = up * input size)."""
    fh, fw = f.shape
    padding = ((fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2)
    return upfirdn2d(x, f, up=up, padding=padding, gain=up * up)


def downsample2d(x: Tensor, f: Tensor, down: int = 2) -> Tensor:
    """Low-pass with the FIR filter ``f`` and downsample by ``down`` (output size = input size / down)."""
    fh, fw = f.shape
    padding = ((fw - down + 1) // 2, (fw - down) // 2, (fh - down + 1) // 2, (fh - down) // 2)
    return upfirdn2d(x, f, down=down, padding=padding)


def _conv(x: Tensor, w: Tensor, stride: int = 1, padding: Sequence[int] = (0, 0), groups: int = 1,
          transpose: bool = False, flip_weight: bool = True) -> Tensor:
    # F.conv2d is a correlation; flipping the kernel turns it into a true convolution.
    if not flip_weight and (w.shape[2] > 1 or w.shape[3] > 1):
        w = w.flip([2, 3])
    if transpose:
        return F.conv_transpose2d(x, w, stride=stride, padding=tuple(padding), groups=groups)
    return F.conv2d(x, w, stride=stride, padding=tuple(padding), groups=groups)


def conv2d_resample(
    x: Tensor,
    w: Tensor,
    f: Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    flip_weight: bool = True,
) -> Tensor:
    """2-D convolution with optional FIR up/downsampling; ``padding`` is relative to the upsampled image.

    Upsampling runs as a strided transposed convolution followed by the FIR filter, downsampling as the
    filter followed by a strided convolution, as in StyleGAN2, so that the numerics match the original.
    """
    out_channels, in_per_group, kh, kw = w.shape
    fh, fw = (1, 1) if f is None else f.shape
    px0 = px1 = py0 = py1 = padding
    if up > 1:
        px0, px1 = px0 + (fw + up - 1) // 2, px1 + (fw - up) // 2
        py0, py1 = py0 + (fh + up - 1) // 2, py1 + (fh - up) // 2
    if down > 1:
        px0, px1 = px0 + (fw - down + 1) // 2, px1 + (fw - down) // 2
        py0, py1 = py0 + (fh - down + 1) // 2, py1 + (fh - down) // 2
    pad = (px0, px1, py0, py1)

    if kh == 1 and kw == 1 and up == 1 and down > 1:
        x = upfirdn2d(x, f, down=down, padding=pad)
        return _conv(x, w, groups=groups, flip_weight=flip_weight)
    if kh == 1 and kw == 1 and up > 1 and down == 1:
        x = _conv(x, w, groups=groups, flip_weight=flip_weight)
        return upfirdn2d(x, f, up=up, padding=pad, gain=up * up)
    if up == 1 and down > 1:
        x = upfirdn2d(x, f, padding=pad)
        return _conv(x, w, stride=down, groups=groups, flip_weight=flip_weight)
    if up > 1:
        # conv_transpose2d wants (in, out/groups, k, k) per group.
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
        px0, px1, py0, py1 = px0 - (kw - 1), px1 - (kw - up), py0 - (kh - 1), py1 - (kh - up)
        pxt, pyt = max(min(-px0, -px1), 0), max(min(-py0, -py1), 0)
        x = _conv(x, w, stride=up, padding=(pyt, pxt), groups=groups, transpose=True, flip_weight=not flip_weight)
        x = upfirdn2d(x, f, padding=(px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt), gain=up * up)
        if down > 1:
            x = upfirdn2d(x, f, down=down)
        return x
    if px0 == px1 and py0 == py1 and px0 >= 0 and py0 >= 0:
        return _conv(x, w, padding=(py0, px0), groups=groups, flip_weight=flip_weight)
    x = upfirdn2d(x, None, padding=pad)
    return _conv(x, w, groups=groups, flip_weight=flip_weight)


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    noise: Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> Tensor:
    """StyleGAN2 modulated convolution (Karras et al. 2020, eq. 1-3): w'_ijk = s_i w_ijk, demodulated by
    1 / sqrt(sum_ik w'_ijk^2 + 1e-8). Fused = one grouped conv with per-sample weights; unfused = scale
    the activations before and after a shared conv (same result, cheaper backward in training)."""
    batch_size = x.shape[0]
    _, in_channels, kh, kw = weight.shape
    if styles.shape != (batch_size, in_channels):
        raise ValueError(f"styles must be ({batch_size}, {in_channels}), got {tuple(styles.shape)}")

    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise so that the fp16 products cannot overflow; demodulation cancels the scale.
        weight_max = weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        weight = weight * (1 / math.sqrt(in_channels * kh * kw) / weight_max)
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch_size, 1, -1, 1, 1)
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch_size, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, padding=padding, flip_weight=flip_weight)
        if dcoefs is not None and noise is not None:
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1))
        if dcoefs is not None:
            return x * dcoefs.to(x.dtype).reshape(batch_size, -1, 1, 1)
        if noise is not None:
            return x + noise.to(x.dtype)
        return x

    if dcoefs is not None:
        w = w * dcoefs.reshape(batch_size, -1, 1, 1, 1)
    x = x.reshape(1, -1, *x.shape[2:])
    w = w.reshape(-1, in_channels, kh, kw)
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=batch_size,
                        flip_weight=flip_weight)
    x = x.reshape(batch_size, -1, *x.shape[2:])
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------
# Layers


class FullyConnectedLayer(nn.Module):
    """Equalized-lr linear layer: y = act(x (w * lr_mul / sqrt(in))^T + b * lr_mul)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "linear",
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        _activation(activation)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class MappingNetwork(nn.Module):
    """z (and the label c, embedded) -> w, broadcast to num_ws, with truncation toward ``w_avg``."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        num_ws: int | None,
        num_layers: int = 8,
        embed_features: int | None = None,
        layer_features: int | None = None,
        activation: str = "lrelu",
        last_activation: str | None = None,
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.998,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            act = last_activation if (idx == num_layers - 1 and last_activation) else activation
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=act, lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self, z: Tensor, c: Tensor | None, truncation_psi: float = 1.0, truncation_cutoff: int | None = None
    ) -> Tensor:
        x = None
        if self.z_dim > 0:
            if z.ndim != 2 or z.shape[1] != self.z_dim:
                raise ValueError(f"z must be (N, {self.z_dim}), got {tuple(z.shape)}")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            if c is None or c.ndim != 2 or c.shape[1] != self.c_dim:
                shape = None if c is None else tuple(c.shape)
                raise ValueError(f"c must be (N, {self.c_dim}), got {shape}")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = y if x is None else torch.cat([x, y], dim=1)
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, but this mapping network was built with w_avg_beta=None")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], 1)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


class Conv2dLayer(nn.Module):
    """Equalized-lr conv with optional FIR up/downsampling, bias, activation and clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        up: int = 1,
        down: int = 1,
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = _activation(activation)[2]
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, w, f=self.resample_filter, up=self.up, down=self.down, padding=self.padding,
                            flip_weight=self.up == 1)
        b = None if self.bias is None else self.bias.to(x.dtype)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally 2x upsampling) + per-pixel noise + bias + lrelu, clamped to +-conv_clamp."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        kernel_size: int = 3,
        up: int = 1,
        use_noise: bool = True,
        activation: str = "lrelu",
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = _activation(activation)[2]
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn(out_channels, in_channels, kernel_size, kernel_size).to(memory_format=memory_format)
        self.weight = nn.Parameter(weight)
        if use_noise:
            self.register_buffer("noise_const", torch.randn(resolution, resolution))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool = True,
        gain: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        in_resolution = self.resolution // self.up
        if x.shape[1:] != (self.in_channels, in_resolution, in_resolution):
            raise ValueError(
                f"expected input (N, {self.in_channels}, {in_resolution}, {in_resolution}), got {tuple(x.shape)}"
            )
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            shape = (x.shape[0], 1, self.resolution, self.resolution)
            noise = torch.randn(shape, device=x.device, generator=generator) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=self.up == 1,
                             fused_modconv=fused_modconv)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, "
                f"resolution={self.resolution}, up={self.up}, activation={self.activation}")


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv without demodulation; the weight gain is folded into the styles."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        kernel_size: int = 1,
        conv_clamp: float | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weight = torch.randn(out_channels, in_channels, kernel_size, kernel_size).to(memory_format=memory_format)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}"


def resolve_fused_modconv(fused_modconv: bool | str | None, default: bool | str, training: bool) -> bool:
    """'inference_only' means fused in eval mode and unfused in training, as in StyleGAN2-ADA."""
    value = default if fused_modconv is None else fused_modconv
    if value == "inference_only":
        return not training
    return bool(value)


class SynthesisBlock(nn.Module):
    """One resolution of the StyleGAN2 synthesis network: [const | conv0 (up 2)] -> conv1 -> ToRGB,
    with the 'skip' image path upsampled by the FIR filter and summed (or 'resnet' / 'orig')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        is_last: bool,
        architecture: str = "skip",
        resample_filter: Sequence[float] = DEFAULT_FILTER,
        conv_clamp: float | None = 256,
        use_fp16: bool = False,
        fp16_channels_last: bool = False,
        fused_modconv_default: bool | str = True,
        **layer_kwargs,
    ) -> None:
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels = in_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.architecture = architecture
        self.use_fp16 = use_fp16
        self.channels_last = use_fp16 and fp16_channels_last
        self.fused_modconv_default = fused_modconv_default
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=2,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp,
                                        channels_last=self.channels_last, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, channels_last=self.channels_last, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp,
                                    channels_last=self.channels_last)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=2,
                                    resample_filter=resample_filter)

    def forward(
        self,
        x: Tensor | None,
        img: Tensor | None,
        ws: Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | str | None = None,
        force_fp32: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """ws: (N, num_conv + num_torgb, w_dim). Returns the features and the accumulated float32 image."""
        if ws.ndim != 3 or ws.shape[1] != self.num_conv + self.num_torgb:
            raise ValueError(f"block b{self.resolution} expects ws (N, {self.num_conv + self.num_torgb}, "
                             f"{self.w_dim}), got {tuple(ws.shape)}")
        w_iter = iter(ws.unbind(dim=1))
        # fp16 only pays off (and is only exercised by the original) on CUDA.
        fp16 = self.use_fp16 and not force_fp32 and ws.device.type == "cuda"
        dtype = torch.float16 if fp16 else torch.float32
        memory_format = torch.channels_last if self.channels_last and fp16 else torch.contiguous_format
        fused = resolve_fused_modconv(fused_modconv, self.fused_modconv_default, self.training)
        layer_kwargs = {"noise_mode": noise_mode, "fused_modconv": fused, "generator": generator}

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype, memory_format=memory_format)
            x = x.unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), **layer_kwargs)
        else:
            x = x.to(dtype=dtype, memory_format=memory_format)
            if self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = self.conv0(x, next(w_iter), **layer_kwargs)
                x = self.conv1(x, next(w_iter), gain=math.sqrt(0.5), **layer_kwargs)
                x = y + x
            else:
                x = self.conv0(x, next(w_iter), **layer_kwargs)
                x = self.conv1(x, next(w_iter), **layer_kwargs)

        if img is not None:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter), fused_modconv=fused)
            y = y.to(dtype=torch.float32, memory_format=torch.contiguous_format)
            img = y if img is None else img + y
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}"


class SynthesisNetwork(nn.Module):
    """StyleGAN2 synthesis from a learned 4x4 constant to ``img_resolution``; blocks b4, b8, ..., channels
    min(channel_base / res, channel_max); the last ``num_fp16_res`` resolutions run fp16 on CUDA."""

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int = 32768,
        channel_max: int = 512,
        num_fp16_res: int = 4,
        **block_kwargs,
    ) -> None:
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        super().__init__()
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_resolution_log2 = int(math.log2(img_resolution))
        self.img_channels = img_channels
        self.num_fp16_res = num_fp16_res
        self.block_resolutions = [2**i for i in range(2, self.img_resolution_log2 + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        fp16_resolution = max(2 ** (self.img_resolution_log2 + 1 - num_fp16_res), 8)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, use_fp16=res >= fp16_resolution,
                                   **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(
        self,
        ws: Tensor,
        noise_mode: NoiseMode = "random",
        fused_modconv: bool | str | None = None,
        force_fp32: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # Consecutive blocks share one w: a block's ToRGB w is the next block's conv0 w.
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, noise_mode=noise_mode, fused_modconv=fused_modconv,
                           force_fp32=force_fp32, generator=generator)
        return img

    def extra_repr(self) -> str:
        return (f"w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}, "
                f"img_channels={self.img_channels}, num_fp16_res={self.num_fp16_res}")


class StyleGAN2Backbone(nn.Module):
    """Mapping + synthesis (NVlabs' networks_stylegan2.Generator); in PanoHead it produces the tri-grid."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        mapping_kwargs: dict | None = None,
        **synthesis_kwargs,
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))
