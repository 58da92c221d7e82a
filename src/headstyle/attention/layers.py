"""Which UNet attention layers are self-attention, and swapping their processors in and out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from diffusers.models.attention_processor import Attention
from torch import nn

from headstyle.attention.config import LAYER_SETS, LayerSet


def self_attention_layers(unet: nn.Module, where: LayerSet = "all") -> dict[str, Attention]:
    """The transformer blocks' self-attention (attn1) layers in forward order, by module name.

    where="decoder" keeps the up blocks only (the output blocks StyleID modifies).
    """
    if where not in LAYER_SETS:
        raise ValueError(f"layers must be one of {LAYER_SETS}, got {where!r}")
    layers = {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.endswith(".attn1") and not module.is_cross_attention
    }
    if where == "decoder":
        layers = {name: module for name, module in layers.items() if name.startswith("up_blocks.")}
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no {where} self-attention layers")
    return layers


def set_processors(layers: dict[str, Attention], make: Callable[[str], object]) -> dict[str, object]:
    """Give every layer the processor make(name); return the processors it had, to restore them."""
    originals = {}
    for name, attn in layers.items():
        originals[name] = attn.get_processor()
        attn.set_processor(make(name))
    return originals


def restore_processors(layers: dict[str, Attention], originals: dict[str, object]) -> None:
    """Put back the exact processor objects set_processors returned."""
    for name, processor in originals.items():
        layers[name].set_processor(processor)


@contextmanager
def swapped_processors(layers: dict[str, Attention], make: Callable[[str], object]) -> Iterator[None]:
    """set_processors for the duration of a with-block, restored even on error."""
    originals = set_processors(layers, make)
    try:
        yield
    finally:
        restore_processors(layers, originals)
