"""Putting Style Fusion Attention on a UNet's self-attention layers and taking it off again exactly."""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import nn

from headstyle.attention.layers import LayerSet, restore_processors, self_attention_layers, set_processors
from headstyle.attention.processors import StyleFusionAttnProcessor, StyleFusionState


class StyleFusion:
    """Installed Style Fusion Attention: the shared state all its processors read, and the originals.

    Use as a context manager, or call uninstall(); both put back the original processor objects.
    """

    def __init__(self, unet: nn.Module, state: StyleFusionState, where: LayerSet = "all") -> None:
        self.unet = unet
        self.state = state
        self.layers: dict[str, Attention] = self_attention_layers(unet, where)
        for name, attn in self.layers.items():
            _check_supported(name, attn)
        self._originals: dict[str, object] | None = set_processors(
            self.layers, lambda name: StyleFusionAttnProcessor(name, state)
        )

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def uninstall(self) -> None:
        if self._originals is not None:
            restore_processors(self.layers, self._originals)
            self._originals = None

    def __enter__(self) -> StyleFusion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def _check_supported(name: str, attn: Attention) -> None:
    unsupported = [
        part for part in ("spatial_norm", "group_norm", "norm_q", "norm_k") if getattr(attn, part, None) is not None
    ]
    if unsupported:
        raise ValueError(f"{name} uses {unsupported}: Style Fusion Attention supports SD 1.x/2.x self-attention only")


def install_style_fusion(
    unet: nn.Module, state: StyleFusionState | None = None, where: LayerSet = "all"
) -> StyleFusion:
    """Put Style Fusion Attention processors on all self-attention layers, or the decoder's only."""
    return StyleFusion(unet, StyleFusionState() if state is None else state, where)
