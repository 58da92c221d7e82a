"""The `headstyle` command line: parses arguments, builds configs, calls the library.

Every command turns a user error (bad path, bad value) into a one-line message and exit 2.
"""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def main() -> None:
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(2) from None
