"""`headstyle app`: the local web page (Gradio) over the library: photo, generate, style image, train, the lab.

The module is not named app.py: the package's `app` is the Typer application."""

from __future__ import annotations

import typer

from headstyle.cli.common import UserError, app


@app.command("app")
def web_app(
    host: str = typer.Option("127.0.0.1", help="Address to serve on (this computer only by default)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    config: str | None = typer.Option(None, help="App TOML with the sections models (paths or hub ids), styles "
                                      "(name = checkpoint), photo, render, lab and server; models that are missing "
                                      "grey out their tabs."),
    listen: bool = typer.Option(False, "--listen", help="Serve on every network interface (0.0.0.0), not only "
                                "this computer: anyone who can reach it may run jobs."),
    share: bool = typer.Option(False, "--share", help="Also open a public Gradio share link (needs the internet)."),
    workdir: str | None = typer.Option(None, help="Where jobs and trained styles are written (server.workdir)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: section.field=value, e.g. "
                                   "--set photo.steps=200 --set render.mesh_resolution=128."),
    print_config: bool = typer.Option(False, help="Print the resolved app config as TOML and exit."),
) -> None:
    """Serve the headstyle web page: drop in a photo, pick a style, take home a turntable and a mesh."""
    import os

    from headstyle.app.config import dumps, load_app_config, with_workdir
    from headstyle.cli.common import check_out_dir
    from headstyle.settings import ConfigError

    if listen and host != "127.0.0.1":
        raise UserError("give --listen or --host, not both")
    if not 1 <= port <= 65535:
        raise UserError(f"--port must lie in [1, 65535], got {port}")
    try:
        cfg = load_app_config(config, list(set_))
    except ConfigError as exc:
        raise UserError(f"{exc} (see headstyle app --print-config)") from None
    if workdir is not None:
        cfg = with_workdir(cfg, workdir)
    if print_config:
        typer.echo(dumps(cfg), nl=False)
        return
    check_out_dir(cfg.server.workdir, "server.workdir")
    if cfg.server.threads:
        import torch

        torch.set_num_threads(cfg.server.threads)
        os.environ["OMP_NUM_THREADS"] = str(cfg.server.threads)  # training processes read it
    try:
        from headstyle.app.page import launch
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        raise UserError("the web app needs Gradio: pip install 'headstyle[app]'") from None

    address = "0.0.0.0" if listen else host
    typer.echo(f"headstyle app on http://{address}:{port} (jobs write into {cfg.server.workdir}); Ctrl-C stops it")
    launch(cfg, address, port, share=share, block=True)
