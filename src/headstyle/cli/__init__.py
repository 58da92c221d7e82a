"""The `headstyle` command line: parses arguments, builds configs, calls the library.

Every command turns a user error (bad path, bad value) into a one-line message and exit 2.
Each command lives in its own module; importing this package registers them all.
"""

from __future__ import annotations

import os
import warnings

import typer

from headstyle.cli import eval, lab, mesh, photo, render, sfa, style_views, stylize, webapp  # noqa: F401  (registers the commands)
from headstyle.cli.common import UserError, app

__all__ = ["UserError", "app", "main"]


# Quiet third-party output in normal runs (each can be turned back on by setting the variable).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
QUIET_MODULES = r"(diffusers|transformers|accelerate|huggingface_hub|torch|timm|trimesh)(\..*)?"


def quiet_third_party() -> None:
    """No weight-loading bars, deprecation notices or advisory warnings from the libraries headstyle drives."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)


def main() -> None:
    """The command line. SIGINT/SIGTERM end every command alike (headstyle.training.signals): a trainer checkpoints
    first, the command says how to resume, and the exit status is 130/143."""
    from headstyle.training.lock import FolderLockedError
    from headstyle.training.signals import STOP, Interrupted

    quiet_third_party()
    try:
        with STOP.installed():
            app()
    except (UserError, FolderLockedError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
    except Interrupted as exc:
        typer.secho(str(exc), err=True, fg=typer.colors.YELLOW)
        raise SystemExit(exc.exit_code) from None
