"""The `fedhub` command line: the demo, an embedded server, and (later) each service on its own."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shared.logging import configure_logging

app = typer.Typer(help="fedhub: a federated-learning server.", no_args_is_help=True, add_completion=False)


@app.command()
def demo(
    clients: Annotated[int, typer.Option(min=1, help="simulated clients")] = 8,
    rounds: Annotated[int, typer.Option(min=1, help="federated rounds")] = 10,
    seed: Annotated[int, typer.Option(help="seed of the data split, the model and the local training")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write a JSON summary here")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of accuracy and loss per round here")] = None,
    local_epochs: Annotated[int, typer.Option(min=1, help="local epochs per round")] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="clients' SGD learning rate")] = 0.2,
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="services as separate processes over RabbitMQ and PostgreSQL "
            "(FEDHUB_AMQP_URL, FEDHUB_DATABASE_URL; local ones by default)",
        ),
    ] = False,
    aggregators: Annotated[int, typer.Option(min=1, help="aggregator replicas with --distributed")] = 2,
) -> None:
    """Run a real federated training in embedded mode: server, clients and live progress in one process."""
    from fedhub.demo import DemoOptions, run_demo, write_outputs

    configure_logging("WARNING")
    console = Console()
    options = DemoOptions(
        clients=clients,
        rounds=rounds,
        seed=seed,
        local_epochs=local_epochs,
        lr=lr,
        distributed=distributed,
        aggregators=aggregators,
    )
    summary = asyncio.run(run_demo(options, console))
    write_outputs(summary, json_path, plot)
    console.line()
    console.print(
        f"[bold]{summary.state}[/bold]: {summary.rounds} rounds with {summary.clients} clients in "
        f"{summary.duration_s:.1f} s; final global test accuracy [bold]{summary.final_accuracy:.4f}[/bold]"
        f" (initial {summary.accuracy[0]:.4f})"
    )
    for label, path in (("summary", json_path), ("plot", plot)):
        if path is not None:
            console.print(f"{label}: {path}")
    if summary.state != "COMPLETED":
        raise typer.Exit(code=1)


@app.command()
def serve(
    data_dir: Annotated[Path, typer.Option(help="where the SQLite database and blobs live")] = Path(
        ".fedhub"
    ),
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1")] = 8000,
    admin_token: Annotated[
        str | None, typer.Option(envvar="FEDHUB_ADMIN_TOKEN", help="the bootstrap actor's token")
    ] = None,
) -> None:
    """Run fedhub in embedded mode (all services, one process) until Ctrl-C."""
    from fedhub.embedded import EmbeddedServer, EmbeddedSettings
    from shared.runtime import collect_less_often

    kwargs: dict[str, object] = {"data_dir": data_dir, "port": port}
    if admin_token:
        kwargs["admin_token"] = admin_token
    settings = EmbeddedSettings(**kwargs)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_format)
    collect_less_often()  # this process only serves

    async def _serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with EmbeddedServer(settings) as server:
            Console().print(
                f"fedhub listening on {server.base_url}\nadmin token: {server.admin_token}\n(Ctrl-C to stop)"
            )
            await stop.wait()

    asyncio.run(_serve())


@app.command()
def api() -> None:
    """Run the API service alone (distributed mode; configured by FEDHUB_* variables)."""
    from services.api.main import main as run

    run()


@app.command()
def orchestrator() -> None:
    """Run the orchestrator service alone (distributed mode; configured by FEDHUB_* variables)."""
    from services.orchestrator.service import main as run

    run()


@app.command()
def aggregator() -> None:
    """Run one aggregator replica (distributed mode; configured by FEDHUB_* variables)."""
    from services.aggregator.service import main as run

    run()


@app.command()
def notifier() -> None:
    """Run the notifier service alone (distributed mode; configured by FEDHUB_* variables)."""
    from services.notifier.service import main as run

    run()


db_app = typer.Typer(help="Database schema (PostgreSQL, via Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration to FEDHUB_DATABASE_URL (idempotent)."""
    from fedhub.db import main_upgrade

    main_upgrade()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
