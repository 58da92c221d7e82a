"""Style Fusion Attention (DiffStyle360, Sec. 3.3-3.5) as a diffusers attention processor.

Queries come from the latent features F_l; keys and values from F_l, the content bank F_c and the
style bank F_s, all through the MAIN layer's W_K, W_V. With K_hat = AdaIN(K_c, K_s) (Eq. 1):

    K = [K_l, K_hat, tau * K_s],   V = [V_l, V_s, V_c]      ("paper" pairing, as written)
                                   V = [V_l, V_c, V_s]      ("matched": each key with its own value)

and one joint softmax (Eq. 2, PyTorch SDPA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor

from headstyle.attention.banks import ReferenceBank
from headstyle.attention.config import PAIRINGS, Pairing

ADAIN_EPS = 1e-5


def adain(x: Tensor, y: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """AdaIN(x, y) over the token axis (-2): x re-normalised to y's per-channel mean and std.

    Both standard deviations include eps, so AdaIN(x, x) == x up to rounding.
    """
    mu_x, mu_y = x.mean(dim=-2, keepdim=True), y.mean(dim=-2, keepdim=True)
    sigma_x = (x.var(dim=-2, keepdim=True, unbiased=False) + eps).sqrt()
    sigma_y = (y.var(dim=-2, keepdim=True, unbiased=False) + eps).sqrt()
    return (x - mu_x) / sigma_x * sigma_y + mu_y


def _tile_batch(x: Tensor, batch: int) -> Tensor:
    """Bank tensors have 1 group or one per sample group; CFG stacks [uncond; cond], so tile groups."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"reference bank has {x.shape[0]} groups, which does not divide the batch {batch}")
    return x.expand(batch, -1, -1) if x.shape[0] == 1 else x.repeat(batch // x.shape[0], 1, 1)


@dataclass
class FusedKV:
    """Keys and values of the joint softmax, (B, T, C) each, and each segment's token range."""

    key: Tensor
    value: Tensor
    segments: dict[str, slice]


def fuse_keys_values(
    k_l: Tensor,
    v_l: Tensor,
    content: tuple[Tensor, Tensor] | None,
    style: tuple[Tensor, Tensor] | None,
    tau: float,
    pairing: Pairing = "paper",
    mask_content: Tensor | None = None,
    mask_style: Tensor | None = None,
) -> FusedKV:
    """Concatenate latent, fused-content and scaled-style keys/values on the token axis.

    k_l, v_l: (B, N, C). content = (K_c, V_c), style = (K_s, V_s): (G, M, C), G groups tiled over B.
    Segments: "latent" (K_l, V_l); "fused" (K_hat, V_s | V_c); "style" (tau K_s, V_c | V_s).
    mask_content (M_c,) / mask_style (M_s,) in [0, 1] are the style mask on each bank's tokens:
    the fused segment is lerp((K_c, V_c), (K_hat, V_pair), m), the style keys are multiplied by m,
    and style tokens with m == 0 are left out, so an all-zero mask gives exactly the content path
    [K_l, K_c], [V_l, V_c]. Without content the style tokens join alone; without style the
    content tokens do (reference-only attention).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    keys, values, names = [k_l], [v_l], ["latent"]
    if content is not None and style is None:
        keys.append(content[0])
        values.append(content[1])
        names.append("content")
    elif style is not None:
        k_s, v_s = style
        if content is None:
            fused = None
            style_values = v_s
        else:
            k_c, v_c = content
            if pairing == "paper" and k_c.shape[-2] != k_s.shape[-2]:
                raise ValueError(
                    f"pairing='paper' pairs K_hat (content tokens, {k_c.shape[-2]}) with V_s (style tokens, "
                    f"{k_s.shape[-2]}): give the content and style banks the same number of images, "
                    "or use pairing='matched'"
                )
            k_hat = adain(k_c.float(), k_s.float()).to(k_c.dtype)  # token statistics in fp32 for fp16 models
            fused_value = v_s if pairing == "paper" else v_c
            style_values = v_c if pairing == "paper" else v_s
            if mask_content is not None:
                m = mask_content.to(k_c.dtype).unsqueeze(-1)
                k_hat = torch.lerp(k_c, k_hat, m)
                fused_value = torch.lerp(v_c, fused_value, m)
            fused = (k_hat, fused_value)
        style_keys = tau * k_s
        if mask_style is not None:
            keep = mask_style > 0
            style_keys = (style_keys * mask_style.to(k_s.dtype).unsqueeze(-1))[..., keep, :]
            style_values = style_values[..., keep, :]
        if fused is not None:
            keys.append(fused[0])
            values.append(fused[1])
            names.append("fused")
        keys.append(style_keys)
        values.append(style_values)
        names.append("style")
    batch = k_l.shape[0]
    keys = [_tile_batch(k, batch) for k in keys]
    values = [_tile_batch(v, batch) for v in values]
    segments, start = {}, 0
    for name, k in zip(names, keys, strict=True):
        segments[name] = slice(start, start + k.shape[-2])
        start += k.shape[-2]
    return FusedKV(torch.cat(keys, dim=-2), torch.cat(values, dim=-2), segments)


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's token grid with num_tokens tokens, for a reference latent of size latent_hw."""
    h0, w0 = latent_hw
    h = max(1, round((num_tokens * h0 / w0) ** 0.5))
    w = num_tokens // h
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid with the latent's aspect {h0}x{w0}")
    return h, w


def mask_tokens(mask: Tensor, grid: tuple[int, int], num_images: int) -> Tensor:
    """A mask in [0, 1] area-resized to the token grid and flattened in the bank's token order: (H, W)
    tiled once per bank image, or (num_images, H, W), one mask per image (e.g. each view's region mask)."""
    if mask.ndim == 3 and mask.shape[0] != num_images:
        raise ValueError(f"{mask.shape[0]} per-image masks for a bank of {num_images} images")
    if mask.ndim not in (2, 3):
        raise ValueError(f"a style mask is (H, W) or (images, H, W), got {tuple(mask.shape)}")
    per_image = mask.float().reshape(-1, 1, *mask.shape[-2:])
    m = F.interpolate(per_image, size=grid, mode="area").reshape(per_image.shape[0], -1)
    return m.reshape(-1) if mask.ndim == 3 else m.reshape(-1).repeat(num_images)


def _bank_mask(mask: Tensor, features: Tensor, bank: ReferenceBank) -> Tensor:
    """The style mask on one bank's tokens at this layer (its grid follows from the token count)."""
    grid = token_grid(features.shape[-2] // bank.num_images, bank.latent_hw)
    return mask_tokens(mask, grid, bank.num_images).to(features.device)


def _project(attn: Attention, features: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    features = features.to(dtype)
    return attn.to_k(features), attn.to_v(features)


def _style_key_values(attn: Attention, styles: list[Tensor], alpha: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """K_s, V_s of one style bank, or (1 - alpha) W F_s1 + alpha W F_s2 for two, one bank at a time."""
    k_s, v_s = _project(attn, styles[0], dtype)
    if len(styles) == 2:
        k_s2, v_s2 = _project(attn, styles[1], dtype)
        k_s = (1 - alpha) * k_s + alpha * k_s2
        v_s = (1 - alpha) * v_s + alpha * v_s2
    return k_s, v_s


@dataclass
class StyleFusionState:
    """What every installed processor reads: the banks and the fusion settings.

    styles: one style bank, or two interpolated with alpha (0: first style, 1: second).
    tau: style key scaling (paper default 1.05). style_mask: (H, W) in [0, 1], 1 = stylise, on every
    bank image, or (n, H, W), one per style image; content_mask: the content bank's own masks, (H, W) or
    (n_c, H, W) (default style_mask): a region mask differs between a content view and a style exemplar.
    """

    content: ReferenceBank | None = None
    styles: list[ReferenceBank] = field(default_factory=list)
    tau: float = 1.05
    alpha: float = 0.5
    pairing: Pairing = "paper"
    style_mask: Tensor | None = None
    content_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")

    def set_banks(self, content: ReferenceBank | None, styles: list[ReferenceBank]) -> None:
        if len(styles) > 2:
            raise ValueError(f"at most two style banks can be interpolated, got {len(styles)}")
        if len(styles) == 2 and styles[0].num_images != styles[1].num_images:
            raise ValueError("the two style banks must hold the same number of images to be interpolated")
        self.content, self.styles = content, list(styles)

    def clear(self) -> None:
        self.content, self.styles = None, []


class StyleFusionAttnProcessor:
    """Self-attention of the main UNet reading the content/style banks of one layer from ``state``.

    Per-call overrides (diffusers passes cross_attention_kwargs by name): tau, alpha, style_mask.
    With no banks in ``state`` it computes ordinary self-attention.
    """

    def __init__(self, name: str, state: StyleFusionState) -> None:
        self.name = name
        self.state = state

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        tau: float | None = None,
        alpha: float | None = None,
        style_mask: Tensor | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: Style Fusion Attention is for token self-attention only")
        if attention_mask is not None:
            raise ValueError(f"{self.name}: attention masks are not supported with reference banks")
        state = self.state
        tau = state.tau if tau is None else tau
        alpha = state.alpha if alpha is None else alpha
        style_mask = state.style_mask if style_mask is None else style_mask
        dtype = hidden_states.dtype
        batch, num_tokens, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        k_l, v_l = attn.to_k(hidden_states), attn.to_v(hidden_states)

        content = state.content.features.get(self.name) if state.content is not None else None
        styles = [bank.features[self.name] for bank in state.styles if self.name in bank.features]
        content_kv = _project(attn, content, dtype) if content is not None else None
        style_kv = _style_key_values(attn, styles, alpha, dtype) if styles else None
        mask_c = mask_s = None
        content_mask = style_mask if state.content_mask is None else state.content_mask
        if style_kv is not None and style_mask is not None:
            mask_s = _bank_mask(style_mask, styles[0], state.styles[0])
        if style_kv is not None and content is not None and content_mask is not None:
            mask_c = _bank_mask(content_mask, content, state.content)
        fused = fuse_keys_values(k_l, v_l, content_kv, style_kv, tau, state.pairing, mask_c, mask_s)
        key, value = fused.key, fused.value

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
