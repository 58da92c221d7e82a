"""DiffStyle360's trainable parts around Style Fusion Attention (headstyle.attention).

dataset (the paired multi-view data that stylised generators make, Sec. 3.4) -> module (the Style
Appearance Module: a copy of the appearance UNet that writes the style bank, Sec. 3.2) -> train (the
diffusion loss on the ground-truth stylised views, content bank frozen, style module trained).
Import from the submodules: importing this package loads nothing.
"""
