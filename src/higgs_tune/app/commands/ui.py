"""`higgs-tune ui`: the local web UI (app/ui/) over the same library calls as the CLI."""

from __future__ import annotations

import click


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; only loopback without --public.")
@click.option("--port", default=7860, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A folder the UI may read and write (repeatable; default: the current folder). Every path typed "
    "in the page must lie under one; the first holds the UI's own files (.higgs-tune-ui/).",
)
@click.option(
    "--public",
    is_flag=True,
    help="Allow a non-loopback --host (e.g. 0.0.0.0): anyone who can reach the port can start jobs and read "
    "files under the roots. There is no login.",
)
def ui_command(host, port, roots, public):
    """Open a local web UI: prepare data, train (start / stop / resume), listen, compare and export.

    \b
      higgs-tune ui                               http://127.0.0.1:7860, paths under the current folder
      higgs-tune ui --root data --root runs       paths under data/ and runs/
    """
    from pathlib import Path

    from higgs_tune.app.ui.paths import Roots
    from higgs_tune.app.ui.server import demo_paths, is_loopback, make_server

    if not is_loopback(host) and not public:
        raise click.UsageError(
            f"--host {host} would make the UI reachable from other machines (no login; it starts jobs and "
            "reads files). Add --public to do that on purpose, or keep the default 127.0.0.1."
        )
    folders = [Path(r) for r in roots] or [Path.cwd()]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    demo = demo_paths()
    allowed = Roots(folders, read_only=[demo["dir"]] if demo else [])
    server, app = make_server(allowed, host, port)
    if public:
        click.secho(
            f"warning: the UI listens on {host}: anyone who can reach port {server.server_address[1]} can start "
            "training and read or write files under the roots. There is no login.",
            fg="yellow",
            err=True,
        )
    try:
        click.echo(f"higgs-tune ui: http://{host}:{server.server_address[1]}/  (Ctrl-C stops it)")
        click.echo(f"  paths allowed under: {', '.join(allowed.describe())}")
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopping: running jobs get Ctrl-C (training saves a verified checkpoint) ...", err=True)
    finally:
        server.server_close()
        app.jobs.shutdown()
