"""headstyle: identity-preserving 3D head stylisation by multi-view score distillation."""

__version__ = "0.1.0"
