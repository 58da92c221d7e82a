"""What every command shares: the Typer app and the one-line user error."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="headstyle: identity-preserving 3D head stylisation (PanoHead + Stable Diffusion score distillation). "
    "Bad input gets a one-line error and exit code 2.",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""
