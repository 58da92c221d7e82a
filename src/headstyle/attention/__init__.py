"""DiffStyle360's Style Fusion Attention and reference banks as diffusers attention processors."""

from headstyle.attention.banks import ReferenceBank, reference_latents, write_bank
from headstyle.attention.config import StyleFusionConfig, StyleViewsConfig
from headstyle.attention.install import StyleFusion, install_style_fusion, uninstall_style_fusion
from headstyle.attention.layers import self_attention_layers
from headstyle.attention.prior import StyleFusionPrior, load_image
from headstyle.attention.processors import (
    StyleFusionAttnProcessor,
    StyleFusionState,
    adain,
    fuse_keys_values,
)

__all__ = [
    "ReferenceBank",
    "StyleFusion",
    "StyleFusionAttnProcessor",
    "StyleFusionConfig",
    "StyleFusionPrior",
    "StyleFusionState",
    "StyleViewsConfig",
    "adain",
    "fuse_keys_values",
    "install_style_fusion",
    "load_image",
    "reference_latents",
    "self_attention_layers",
    "uninstall_style_fusion",
    "write_bank",
]
