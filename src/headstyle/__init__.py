"""headstyle: identity-preserving 3D head stylisation by multi-view score distillation."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_generator"]


def __getattr__(name: str):
    # Lazy, so that `import headstyle` (and the CLI's --help) does not import torch.
    if name == "load_generator":
        from headstyle.generator.checkpoint import load_generator

        return load_generator
    raise AttributeError(f"module 'headstyle' has no attribute {name!r}")
