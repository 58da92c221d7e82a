"""The PanoHead-compatible generator: StyleGAN2 layers, tri-grid renderer, super-resolution, composition."""

from headstyle.generator.base import Generator, RenderOutput
from headstyle.generator.superresolution import SuperresolutionHybrid8XDC
from headstyle.generator.triplane import OSGDecoder, TriPlaneGenerator

__all__ = ["Generator", "OSGDecoder", "RenderOutput", "SuperresolutionHybrid8XDC", "TriPlaneGenerator"]
