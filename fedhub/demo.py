"""`fedhub demo`: a real federated training on this machine, in embedded mode, in under a minute.

An embedded fedhub server (real uvicorn on 127.0.0.1) and N simulated clients built on the client
SDK, which talk real HTTP and server-sent events to it. They train a small MLP on scikit-learn's
digits, split across clients non-IID (Dirichlet over labels, seeded); the operator side evaluates
every round's global model on the held-out test split.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

import torch
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedhub.client import ActorClient, Client
from fedhub.distributed import ClusterSettings, LocalCluster
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from fedhub.task import DemoWorkload, make_model


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What `fedhub demo` runs."""

    clients: int = 8
    rounds: int = 10
    seed: int = 0
    alpha: float = 0.5
    local_epochs: int = 8
    lr: float = 0.2
    round_timeout_s: float = 120.0
    data_dir: Path | None = None
    distributed: bool = False
    """Run the services as separate processes over RabbitMQ and PostgreSQL instead of embedded."""
    aggregators: int = 2


@dataclass
class DemoSummary:
    """The demo's outcome, as written by `--json`."""

    training_id: str
    state: str
    clients: int
    rounds: int
    seed: int
    accuracy: list[float] = field(default_factory=list)
    """Global test accuracy per round, the initial model first."""
    loss: list[float] = field(default_factory=list)
    """Global test loss per round, the initial model first."""
    round_s: list[float] = field(default_factory=list)
    """Wall time of each round, from its start to the next round's start (or the end)."""
    client_test_accuracy: list[float | None] = field(default_factory=list)
    """Mean of the clients' own test reports per round, weighted by their example counts."""
    duration_s: float = 0.0
    final_accuracy: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The summary as plain JSON values."""
        return asdict(self)


async def run_demo(options: DemoOptions, console: Console | None = None) -> DemoSummary:
    """Run the whole demo and return its summary; `console` gets a live progress view."""
    console = console or Console()
    # Clients train in worker threads on a small machine: one torch thread each avoids oversubscription.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedhub-demo-") as tmp:
        data_dir = options.data_dir or Path(tmp)
        if options.distributed:
            cluster_settings = ClusterSettings(aggregators=options.aggregators, log_dir=data_dir / "logs")
            console.print(f"starting api, notifier, orchestrator and {options.aggregators} aggregators ...")
            async with LocalCluster(cluster_settings) as cluster:
                return await _run(cluster, options, console)
        settings = EmbeddedSettings(data_dir=data_dir, log_level="WARNING", deadline_tick_s=0.5)
        async with EmbeddedServer(settings) as server:
            return await _run(server, options, console)


class Server(Protocol):
    """Where clients reach a running fedhub: an `EmbeddedServer` or a `LocalCluster`."""

    @property
    def base_url(self) -> str: ...
    @property
    def events_url(self) -> str: ...
    @property
    def admin_token(self) -> str: ...


async def _run(server: Server, options: DemoOptions, console: Console) -> DemoSummary:
    workload = DemoWorkload.create(options.clients, seed=options.seed, alpha=options.alpha)
    actor = ActorClient(server.base_url, server.admin_token, events_url=server.events_url)
    try:
        principals = [await actor.create_principal(f"hospital-{i + 1}") for i in range(options.clients)]
        initial = make_model(options.seed).state_dict()
        model = await actor.upload_model(initial, name="digits-mlp")
        training = await actor.create_training(
            model.id,
            [p.id for p in principals],
            rounds=options.rounds,
            round_timeout_s=options.round_timeout_s,
        )
        training_id = UUID(str(training["id"]))
        clients = [
            Client(
                server.base_url,
                p.token,
                fit=workload.fit_fn(i, epochs=options.local_epochs, lr=options.lr),
                evaluate=workload.evaluate_fn(i),
                training_id=training_id,
                name=p.name,
                events_url=server.events_url,
            )
            for i, p in enumerate(principals)
        ]
        names = {str(p.id): p.name for p in principals}
        client_tasks = [asyncio.create_task(c.run(), name=f"client-{i}") for i, c in enumerate(clients)]
        started = time.perf_counter()
        await actor.start_training(training_id)
        summary = DemoSummary(
            training_id=str(training_id),
            state="ONGOING",
            clients=options.clients,
            rounds=options.rounds,
            seed=options.seed,
        )
        acc, loss = workload.global_accuracy(initial)
        summary.accuracy.append(acc)
        summary.loss.append(loss)
        await _watch(actor, workload, training_id, names, summary, console, client_tasks)
        summary.duration_s = round(time.perf_counter() - started, 3)
        summary.final_accuracy = summary.accuracy[-1]
        await asyncio.gather(*client_tasks, return_exceptions=True)
        return summary
    finally:
        await actor.aclose()


async def _watch(
    actor: ActorClient,
    workload: DemoWorkload,
    training_id: UUID,
    names: dict[str, str],
    summary: DemoSummary,
    console: Console,
    client_tasks: Sequence[asyncio.Task[Any]],
) -> None:
    """Follow the training until it ends, evaluating each new global model once."""
    evaluated: set[str] = set()
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        while True:
            training = await actor.get_training(training_id)
            rounds = await actor.get_rounds(training_id)
            for r in rounds:
                model_id = r.get("model_id")
                if model_id and model_id not in evaluated:
                    evaluated.add(model_id)
                    weights: dict[str, torch.Tensor] = await actor.download_model(UUID(model_id))
                    acc, loss = workload.global_accuracy(weights)
                    summary.accuracy.append(acc)
                    summary.loss.append(loss)
            summary.state = str(training["state"])
            live.update(_view(training, rounds, names, summary))
            if summary.state in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            failed = [t for t in client_tasks if t.done() and t.exception() is not None]
            if failed:
                raise RuntimeError(f"a client stopped: {failed[0].exception()!r}")
            await asyncio.sleep(0.1)
    summary.round_s = _round_durations(rounds)
    summary.client_test_accuracy = [_num(r.get("test_metrics", {}).get("accuracy")) for r in rounds]


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _round_durations(rounds: Sequence[dict[str, Any]]) -> list[float]:
    out = []
    for i, r in enumerate(rounds):
        start = datetime.fromisoformat(str(r["started_at"]))
        end_raw = rounds[i + 1]["started_at"] if i + 1 < len(rounds) else r.get("finished_at")
        if end_raw:
            out.append(round((datetime.fromisoformat(str(end_raw)) - start).total_seconds(), 3))
    return out


def _view(
    training: dict[str, Any], rounds: Sequence[dict[str, Any]], names: dict[str, str], summary: DemoSummary
) -> Group:
    header = Text.assemble(
        ("fedhub demo ", "bold"),
        f"training {training['id']}  ",
        (f"{training['state']}", "bold green" if training["state"] == "COMPLETED" else "bold"),
        f"  round {training['round']}/{training['rounds']}  {training.get('phase') or ''}",
    )
    uploaded = set(training.get("uploaded", []))
    clients = Text("clients: ")
    for cid, name in names.items():
        clients.append(f"{name} ", style="green" if cid in uploaded else "dim")
    table = Table(show_header=True, header_style="bold")
    table.add_column("round", justify="right")
    table.add_column("updates", justify="right")
    table.add_column("global test accuracy", justify="right")
    table.add_column("global test loss", justify="right")
    table.add_column("clients' own test accuracy", justify="right")
    table.add_row("0", "-", f"{summary.accuracy[0]:.4f}", f"{summary.loss[0]:.4f}", "-")
    for r in rounds:
        i = int(r["round"])
        if i < len(summary.accuracy):
            client_acc = _num(r.get("test_metrics", {}).get("accuracy"))
            table.add_row(
                str(i),
                str(r.get("num_updates") or "-"),
                f"{summary.accuracy[i]:.4f}",
                f"{summary.loss[i]:.4f}",
                f"{client_acc:.4f}" if client_acc is not None else "-",
            )
    return Group(header, clients, table)


def write_outputs(summary: DemoSummary, json_path: Path | None, plot_path: Path | None) -> None:
    """Write the JSON summary and the accuracy/loss plot where asked."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_path.parent.mkdir(parents=True, exist_ok=True)
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        xs = list(range(len(summary.accuracy)))
        ax_acc.plot(xs, summary.accuracy, marker="o")
        ax_acc.set(xlabel="round", ylabel="global test accuracy", title="Accuracy", ylim=(0, 1))
        ax_acc.grid(alpha=0.3)
        ax_loss.plot(xs, summary.loss, marker="o", color="tab:red")
        ax_loss.set(xlabel="round", ylabel="global test loss", title="Loss")
        ax_loss.grid(alpha=0.3)
        fig.suptitle(f"fedhub demo: {summary.clients} clients, FedAvg, digits (non-IID)")
        fig.tight_layout()
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
