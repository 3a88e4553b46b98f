"""Distributed mode on one machine: each service its own OS process over RabbitMQ and PostgreSQL.

`LocalCluster` is what `fedhub demo --distributed` and the distributed end-to-end tests run: it
migrates the database, then starts the api, the notifier, the orchestrator and N aggregator
replicas as `fedhub <service>` processes, and waits until every one answers `/readyz`.
In Kubernetes the same commands run as pods (deploy/k8s).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from shared.bus.rabbitmq import RabbitMQBus

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CONSUMER_QUEUES = ("orchestrator", "aggregator", "notifier")
"""The queues the services consume from (each under the cluster's namespace)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    """One service process and where its probes answer."""

    name: str
    args: list[str]
    env: dict[str, str]
    health_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn it, output to its log file."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedhub.cli", *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        """SIGKILL: the crash the fault tests inflict."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = 15) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it does not exit in time; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class ClusterSettings:
    """Where the cluster's state lives and how many aggregators it runs."""

    database_url: str = field(
        default_factory=lambda: os.environ.get("FEDHUB_DATABASE_URL", DEFAULT_DATABASE_URL)
    )
    amqp_url: str = field(default_factory=lambda: os.environ.get("FEDHUB_AMQP_URL", DEFAULT_AMQP_URL))
    blob_backend: str = "postgres"
    aggregators: int = 2
    log_dir: Path = Path(".fedhub/logs")
    admin_token: str = field(default_factory=lambda: "fh_admin_" + secrets.token_urlsafe(24))
    log_level: str = "INFO"
    deadline_tick_s: float = 0.5
    bus_namespace: str = "fedhub"
    """Prefix of the exchange and queue names, so that clusters sharing a broker stay apart."""
    roles: frozenset[str] = frozenset({"api", "notifier", "orchestrator", "aggregator"})
    """Which services to start (a bench of aggregators alone starts only "aggregator")."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """More environment for every process, e.g. `FEDHUB_AGGREGATOR_BATCH_SIZE`."""
    delete_bus_namespace: bool = False
    """Delete the namespace's queues and exchange when the cluster stops (tests and benchmarks on a
    shared broker); the demo keeps its durable `fedhub` namespace."""


class LocalCluster:
    """`async with LocalCluster(settings) as cluster:` runs the services as processes until the block ends."""

    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.services: dict[str, ServiceProcess] = {}
        self.api_port = free_port()
        self.notifier_port = free_port()

    @property
    def base_url(self) -> str:
        """The API's address."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def events_url(self) -> str:
        """The notifier's address (`/v1/events`)."""
        return f"http://127.0.0.1:{self.notifier_port}"

    @property
    def admin_token(self) -> str:
        """The bootstrap actor's token."""
        return self.settings.admin_token

    def _env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDHUB_")}
        env.update(
            FEDHUB_DATABASE_URL=s.database_url,
            FEDHUB_AMQP_URL=s.amqp_url,
            FEDHUB_BLOB_BACKEND=s.blob_backend,
            FEDHUB_BLOB_PATH=str(s.log_dir.parent / "blobs"),
            FEDHUB_ADMIN_TOKEN=s.admin_token,
            FEDHUB_LOG_LEVEL=s.log_level,
            FEDHUB_LOG_FORMAT="json",
            FEDHUB_DEADLINE_TICK_S=str(s.deadline_tick_s),
            FEDHUB_BUS_NAMESPACE=s.bus_namespace,
        )
        env.update(s.extra_env)
        env.update(extra)
        return env

    def _add(self, name: str, args: list[str], health_port: int, **env: str) -> ServiceProcess:
        service = ServiceProcess(
            name=name,
            args=args,
            env=self._env(**env),
            health_port=health_port,
            log_path=self.settings.log_dir / f"{name}.log",
        )
        self.services[name] = service
        return service

    async def __aenter__(self) -> Self:
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._migrate)
        roles = self.settings.roles
        if "api" in roles:
            self._add("api", ["api"], self.api_port, FEDHUB_HOST="127.0.0.1", FEDHUB_PORT=str(self.api_port))
        if "notifier" in roles:
            self._add(
                "notifier",
                ["notifier"],
                self.notifier_port,
                FEDHUB_HOST="127.0.0.1",
                FEDHUB_PORT=str(self.notifier_port),
            )
        if "orchestrator" in roles:
            port = free_port()
            self._add(
                "orchestrator",
                ["orchestrator"],
                port,
                FEDHUB_HEALTH_HOST="127.0.0.1",
                FEDHUB_HEALTH_PORT=str(port),
            )
        for i in range(self.settings.aggregators if "aggregator" in roles else 0):
            port = free_port()
            self._add(
                f"aggregator-{i + 1}",
                ["aggregator"],
                port,
                FEDHUB_AGGREGATOR_HEALTH_HOST="127.0.0.1",
                FEDHUB_AGGREGATOR_HEALTH_PORT=str(port),
            )
        try:
            for service in self.services.values():
                service.start()
            await self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
        if self.settings.delete_bus_namespace:
            await self.delete_bus_namespace()

    async def delete_bus_namespace(self) -> None:
        """Delete this cluster's queues and exchange from the broker (its processes are stopped)."""
        ns = self.settings.bus_namespace
        bus = RabbitMQBus(self.settings.amqp_url, exchange=f"{ns}.events", queue_prefix=f"{ns}.")
        await bus.start()
        try:
            await bus.delete_namespace(CONSUMER_QUEUES)
        finally:
            await bus.close()

    def _migrate(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "fedhub.cli", "db", "upgrade"],
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"fedhub db upgrade failed:\n{result.stdout}{result.stderr}")

    async def wait_ready(self, names: list[str] | None = None, timeout_s: float = 60) -> None:
        """Wait until the named services (all by default) answer `/readyz` with 200."""
        pending = list(names or self.services)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as http:
            while pending:
                name = pending[0]
                service = self.services[name]
                if service.process is not None and service.process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {service.process.returncode}; see {service.log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{service.health_port}/readyz")).status_code == 200:
                        pending.pop(0)
                        continue
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout_s} s; see {service.log_path}")
                await asyncio.sleep(0.1)

    async def restart(self, name: str) -> None:
        """Start a (killed) service again and wait until it is ready."""
        self.services[name].start()
        await self.wait_ready([name])

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every service (api last, so in-flight requests finish); return their exit codes."""
        order = [n for n in self.services if n != "api"] + (["api"] if "api" in self.services else [])
        return {name: self.services[name].terminate() for name in order}
