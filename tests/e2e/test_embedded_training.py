"""A full federated training in embedded mode, through real HTTP and server-sent events."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
import torch

from fedhub.client import ActorClient, Client
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from fedhub.task import DemoWorkload, make_model

pytestmark = pytest.mark.e2e


async def test_three_clients_three_rounds_with_test_rounds(tmp_path: Path) -> None:
    """3 clients, 3 rounds: every round yields a new global model, tests run, accuracy improves."""
    workload = DemoWorkload.create(3, seed=1)
    settings = EmbeddedSettings(data_dir=tmp_path, log_level="WARNING", deadline_tick_s=0.2)
    async with EmbeddedServer(settings) as server:
        actor = ActorClient(server.base_url, server.admin_token)
        principals = [await actor.create_principal(f"site-{i}") for i in range(3)]
        initial = make_model(1).state_dict()
        model = await actor.upload_model(initial, name="mlp")
        training = await actor.create_training(model.id, [p.id for p in principals], rounds=3)
        training_id = UUID(str(training["id"]))
        assert training["state"] == "INITIAL"

        seen: list[tuple[str, int]] = []

        async def watch() -> None:
            async for note in actor.events(training_id=training_id, last_event_id=0):
                seen.append((note.notification_type, int(note.body["round"])))
                if note.notification_type == "TRAINING_FINISHED":
                    return

        watcher = asyncio.create_task(watch())
        clients = [
            Client(
                server.base_url,
                p.token,
                fit=workload.fit_fn(i, epochs=1, lr=0.1),
                evaluate=workload.evaluate_fn(i),
                training_id=training_id,
            )
            for i, p in enumerate(principals)
        ]
        runs = [asyncio.create_task(c.run()) for c in clients]
        await actor.start_training(training_id)
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=90)
        await asyncio.wait_for(watcher, timeout=10)

        final = await actor.get_training(training_id)
        assert final["state"] == "COMPLETED", final
        assert final["round"] == 3
        assert all(r.rounds_trained == (1, 2, 3) and r.rounds_tested == (1, 2, 3) for r in results)

        rounds = await actor.get_rounds(training_id)
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["num_updates"] == 3 for r in rounds)
        assert all(r["test_metrics"].get("accuracy") is not None for r in rounds)
        model_ids = [r["model_id"] for r in rounds]
        assert len(set(model_ids)) == 3 and str(model.id) not in model_ids
        assert final["current_model_id"] == model_ids[-1]

        states = [initial] + [await actor.download_model(UUID(m)) for m in model_ids]
        for before, after in itertools.pairwise(states):
            assert any(not torch.equal(before[k], after[k]) for k in before), (
                "a round left the model unchanged"
            )
        initial_acc, _ = workload.global_accuracy(initial)
        final_acc, _ = workload.global_accuracy(states[-1])
        assert final_acc > initial_acc + 0.3, (initial_acc, final_acc)

        assert seen == [
            ("TRAINING_START", 1),
            ("UPDATE_ROUND_START", 1),
            ("MODEL_TEST_ROUND", 1),
            ("UPDATE_ROUND_START", 2),
            ("MODEL_TEST_ROUND", 2),
            ("UPDATE_ROUND_START", 3),
            ("MODEL_TEST_ROUND", 3),
            ("TRAINING_FINISHED", 3),
        ]
        await actor.aclose()


def test_demo_command_completes_and_writes_its_summary_and_plot(tmp_path: Path) -> None:
    """`fedhub demo` at a small size: exit 0, a JSON summary with a rising accuracy curve, a PNG."""
    summary_path, plot_path = tmp_path / "summary.json", tmp_path / "curves.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhub.cli",
            "demo",
            "--clients",
            "3",
            "--rounds",
            "2",
            "--json",
            str(summary_path),
            "--plot",
            str(plot_path),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(summary_path.read_text())
    assert summary["state"] == "COMPLETED"
    assert len(summary["accuracy"]) == 3 and len(summary["round_s"]) == 2
    assert summary["final_accuracy"] == summary["accuracy"][-1] > summary["accuracy"][0]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
