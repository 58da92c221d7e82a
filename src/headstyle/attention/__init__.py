"""DiffStyle360's Style Fusion Attention as diffusers attention processors.

config (settings, no diffusers import) -> layers, banks, processors, install (the processors on a UNet)
-> prior (StyleFusionPrior: a ScorePrior with fused attention) -> views (img2img of rendered views).
Import from the submodules: importing this package loads nothing, so configs stay light.
"""
