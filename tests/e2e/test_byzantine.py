"""Byzantine clients in a real training: robust aggregation keeps the model, FedAvg loses it.

Ten SDK clients train the digits MLP through an embedded fedhub over real HTTP. Two of them are
Byzantine: they run the same SDK and train honestly, but their `fit` returns a malicious model. Five
trainings from the same start: all-honest FedAvg (the reference), then with the two attackers
FedAvg, median, trimmed mean (beta 0.2) and Krum (f 2). The robust methods must end within 5
accuracy points of the reference on the held-out test split; FedAvg must fall far below it.

The attacks, both deterministic:

- the flipper sends the global model minus 10 times its honest step, ``g - 10 (w - g)``: pulling
  the mean back along the direction the others push (a sign-flip, scaled so one client outweighs
  the other nine in a mean);
- the noiser sends its honest model plus Gaussian noise of std 1 per weight (about ten times the
  weights' own scale), drawn from a generator seeded with the run's seed, its index and the round.

The split is IID-ish (Dirichlet alpha 100: every client holds about a tenth of each digit). Median,
trimmed mean and Krum assume the honest updates are alike; on a strongly non-IID split they trade
accuracy for robustness even without attackers (Krum keeps one client's model, trained on that
client's labels only), and that known cost is not what this test is about.

Local training is long enough (3 epochs of batches of 8, the lr decaying over 6 rounds) for every
client's model to be nearly as good as the mean: Krum's model is one client's, and with 1 local epoch
over 5 rounds it lagged the reference by up to 15 points. Over seeds 0-15 the reference ends at
0.933-0.944, median and trimmed mean at most 0.014 below it, Krum at most 0.033 below, and attacked
FedAvg 0.75-0.92 below it (at 0.03-0.18).

The five trainings run once, sequentially in one embedded server (a module fixture); the tests read
their outcomes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
import torch

from fedhub.client import ActorClient, Client
from fedhub.client.types import FitFn
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from fedhub.task import DemoWorkload, make_model, train_one_round

pytestmark = pytest.mark.e2e

State = dict[str, torch.Tensor]

SEED = 0
NUM_CLIENTS = 10
FLIPPER, NOISER = 8, 9
"""The Byzantine clients' indices (their data shares go unused beyond their honest step)."""
ROUNDS = 6
LOCAL_EPOCHS = 3
BATCH_SIZE = 8
LR = 0.3
LR_DECAY = 0.6
"""Round r trains with lr LR * LR_DECAY ** (r - 1): large early steps, a settled last round."""
FLIP_SCALE = 10.0
NOISE_STD = 1.0

ROBUST_TOLERANCE = 0.05
"""A robust method under attack may end at most this far below the all-honest reference."""
FEDAVG_MARGIN = 0.5
"""Attacked FedAvg must end at least this far below the reference (it ends near chance, 0.1)."""

RUNS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "reference": ("fedavg", {}, False),
    "fedavg": ("fedavg", {}, True),
    "median": ("median", {}, True),
    "trimmed_mean": ("trimmed_mean", {"beta": 0.2}, True),
    "krum": ("krum", {"f": 2}, True),
}
"""name -> (aggregation, aggregation_params, with the two attackers)."""


@dataclass(frozen=True)
class Outcome:
    """A finished training: its final test accuracy, its rounds' JSON and models' records."""

    accuracy: float
    rounds: list[dict[str, Any]]
    records: list[dict[str, Any] | None]
    clients: list[UUID]
    """The clients' principal ids by index."""


def honest_fit(workload: DemoWorkload, index: int) -> FitFn:
    """SGD on client `index`'s whole share (local train and validation: no test rounds run here)."""
    data = workload.clients[index]
    share = np.sort(np.concatenate([data.train, data.validation]))
    x, y = workload.x_train[share], workload.y_train[share]
    # Built here, in the test's thread (make_model seeds torch's global generator); each round's
    # fit loads the global weights into it, and a client's rounds run one after the other.
    model = make_model(workload.seed)

    def fit(weights: State, config: dict[str, Any]) -> tuple[State, int, dict[str, float]]:
        round_ = int(config["round"])
        model.load_state_dict(weights)
        metrics = train_one_round(
            model,
            x,
            y,
            round=round_,
            client=index,
            epochs=LOCAL_EPOCHS,
            lr=LR * LR_DECAY ** (round_ - 1),
            batch_size=BATCH_SIZE,
        )
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(y), metrics

    return fit


def flipping(fit: FitFn, scale: float) -> FitFn:
    """`fit`, but returning ``g - scale * (w - g)`` for the global model g and the honest result w."""

    def flipped(weights: State, config: dict[str, Any]) -> tuple[State, int, dict[str, float]]:
        new, n, metrics = fit(weights, config)
        return {k: weights[k] - scale * (new[k] - weights[k]) for k in new}, n, metrics

    return flipped


def noisy(fit: FitFn, std: float, index: int) -> FitFn:
    """`fit`, but adding N(0, std^2) to every weight; the generator is seeded per run, client and round."""

    def noised(weights: State, config: dict[str, Any]) -> tuple[State, int, dict[str, float]]:
        new, n, metrics = fit(weights, config)
        generator = torch.Generator().manual_seed(1_000_000 * SEED + 1000 * int(config["round"]) + index)
        return {k: v + std * torch.randn(v.shape, generator=generator) for k, v in new.items()}, n, metrics

    return noised


def client_fit(workload: DemoWorkload, index: int, attacked: bool) -> FitFn:
    """What client `index` runs: honest, or its attack when the run has attackers."""
    fit = honest_fit(workload, index)
    if attacked and index == FLIPPER:
        return flipping(fit, FLIP_SCALE)
    if attacked and index == NOISER:
        return noisy(fit, NOISE_STD, index)
    return fit


async def train(
    server: EmbeddedServer, workload: DemoWorkload, aggregation: str, params: dict[str, Any], attacked: bool
) -> Outcome:
    """One training of the ten clients from the workload's initial model, to its end."""
    actor = ActorClient(server.base_url, server.admin_token)
    try:
        principals = [await actor.create_principal(f"site-{i}") for i in range(NUM_CLIENTS)]
        model = await actor.upload_model(workload.initial_weights(), name="mlp")
        training = await actor.create_training(
            model.id,
            [p.id for p in principals],
            rounds=ROUNDS,
            aggregation=aggregation,
            aggregation_params=params,
            skip_model_tests=True,
        )
        training_id = UUID(str(training["id"]))
        clients = [
            Client(server.base_url, p.token, fit=client_fit(workload, i, attacked), training_id=training_id)
            for i, p in enumerate(principals)
        ]
        runs = [asyncio.create_task(c.run()) for c in clients]
        await actor.start_training(training_id)
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
        assert all(r.state == "COMPLETED" for r in results), results
        rounds = await actor.get_rounds(training_id)
        records = [(await actor.get_model(r["model_id"])).record for r in rounds]
        final = await actor.download_model(rounds[-1]["model_id"])
        accuracy, _ = workload.global_accuracy(final)
        return Outcome(accuracy, rounds, records, [p.id for p in principals])
    finally:
        await actor.aclose()


async def train_all(data_dir: Path) -> dict[str, Outcome]:
    """The five trainings, one after the other, in one embedded server."""
    # alpha 100: an IID-ish split (see the module docstring).
    workload = DemoWorkload.create(NUM_CLIENTS, seed=SEED, alpha=100.0)
    settings = EmbeddedSettings(
        data_dir=data_dir, log_level="WARNING", deadline_tick_s=0.2, outbox_poll_s=0.05
    )
    async with EmbeddedServer(settings) as server:
        return {
            name: await train(server, workload, aggregation, params, attacked)
            for name, (aggregation, params, attacked) in RUNS.items()
        }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every run's outcome, trained once for the module."""
    return asyncio.run(train_all(tmp_path_factory.mktemp("byzantine")))


def table(outcomes: dict[str, Outcome]) -> str:
    """Every run's final accuracy, for assertion messages."""
    return ", ".join(f"{name} {o.accuracy:.3f}" for name, o in outcomes.items())


def check_all_updates_taken(outcome: Outcome, message: str) -> None:
    """Every round aggregated all ten updates: the attackers were not rejected before the method."""
    assert [r["num_updates"] for r in outcome.rounds] == [NUM_CLIENTS] * ROUNDS, message
    assert [r["rejected"] for r in outcome.rounds] == [[]] * ROUNDS, message


def test_the_honest_reference_learns(outcomes: dict[str, Outcome]) -> None:
    """Without attackers FedAvg reaches a good model, so the comparisons below mean something."""
    reference = outcomes["reference"]
    check_all_updates_taken(reference, table(outcomes))
    assert reference.accuracy >= 0.85, table(outcomes)


def test_attacked_fedavg_falls_well_below_the_reference(outcomes: dict[str, Outcome]) -> None:
    """Two attackers out of ten take FedAvg's model far from the reference."""
    attacked = outcomes["fedavg"]
    check_all_updates_taken(attacked, table(outcomes))
    reference = outcomes["reference"].accuracy
    assert attacked.accuracy <= reference - FEDAVG_MARGIN, (
        f"attacked FedAvg {attacked.accuracy:.3f} is not {FEDAVG_MARGIN} below the reference "
        f"{reference:.3f} ({table(outcomes)})"
    )


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum"])
def test_a_robust_method_stays_near_the_reference(outcomes: dict[str, Outcome], method: str) -> None:
    """With the same two attackers a robust method ends within 5 points of the all-honest reference."""
    robust = outcomes[method]
    check_all_updates_taken(robust, table(outcomes))
    # The method itself saw all ten, the attackers' included (the trimmed mean cuts 2 per end).
    for record in robust.records:
        assert record is not None and record["n"] == NUM_CLIENTS, record
        if method == "trimmed_mean":
            assert record["trimmed_per_end"] == 2, record
    reference = outcomes["reference"].accuracy
    assert robust.accuracy >= reference - ROBUST_TOLERANCE, (
        f"{method} {robust.accuracy:.3f} is more than {ROBUST_TOLERANCE} below the reference "
        f"{reference:.3f} ({table(outcomes)})"
    )


def test_krum_never_selects_an_attacker(outcomes: dict[str, Outcome]) -> None:
    """Krum's record names the update it kept each round: never the flipper's nor the noiser's.

    The aggregator is handed a round's updates ordered by client id, so a position in its record
    is an index into the sorted client ids.
    """
    krum = outcomes["krum"]
    order = sorted(krum.clients)
    attackers = {krum.clients[FLIPPER], krum.clients[NOISER]}
    for round_, record in enumerate(krum.records, start=1):
        assert record is not None and record["n"] == NUM_CLIENTS and record["f"] == 2, record
        (selected,) = record["selected"]
        assert order[selected] not in attackers, f"round {round_}: Krum kept an attacker's update ({record})"
