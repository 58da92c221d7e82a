"""The `headstyle` command line: parses arguments, builds configs, calls the library.

Every command turns a user error (bad path, bad value) into a one-line message and exit 2.
Each command lives in its own module; importing this package registers them all.
"""

from __future__ import annotations

import typer

from headstyle.cli import lab, mesh, photo, render, style_views, stylize  # noqa: F401  (registers the commands)
from headstyle.cli.common import UserError, app

__all__ = ["UserError", "app", "main"]


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
