"""The demo's learning task: deterministic non-IID splits, a model that can learn the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhub.task import (
    DemoWorkload,
    dirichlet_split,
    evaluate,
    load_digits_split,
    make_model,
    train_one_round,
)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """The digits training labels."""
    return load_digits_split()[2]


def _label_shares(y: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(y[p], minlength=10) / max(len(p), 1) for p in parts])


def test_split_sizes_and_types():
    """80/20 of the 1797 digits, features scaled into [0, 1] as float32."""
    x_train, x_test, y_train, y_test = load_digits_split()
    assert (x_train.shape, x_test.shape, y_train.shape, y_test.shape) == (
        (1437, 64),
        (360, 64),
        (1437,),
        (360,),
    )
    assert x_train.dtype == np.float32
    assert x_train.min() >= 0.0
    assert x_train.max() <= 1.0


def test_dirichlet_split_is_deterministic_for_a_seed(labels):
    """The same seed gives the same split; another seed another one."""
    a = dirichlet_split(labels, 5, alpha=0.5, seed=3)
    b = dirichlet_split(labels, 5, alpha=0.5, seed=3)
    c = dirichlet_split(labels, 5, alpha=0.5, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_dirichlet_split_is_a_partition(labels, num_clients):
    """Every index goes to exactly one client, and each client's indices are sorted."""
    parts = dirichlet_split(labels, num_clients, seed=0)
    assert len(parts) == num_clients
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_dirichlet_split_is_non_iid(labels):
    """With alpha 0.5 clients' label distributions differ a lot; with a huge alpha they barely do."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    skewed = _label_shares(labels, dirichlet_split(labels, 5, alpha=0.5, seed=0))
    even = _label_shares(labels, dirichlet_split(labels, 5, alpha=1000.0, seed=0))
    skewed_tv = 0.5 * np.abs(skewed - overall).sum(axis=1)
    even_tv = 0.5 * np.abs(even - overall).sum(axis=1)
    assert skewed_tv.min() > 0.1
    assert skewed_tv.max() > 0.3
    assert even_tv.max() < 0.05


def test_make_model_is_seeded():
    """The same seed gives the same initial weights."""
    a, b, c = make_model(1).state_dict(), make_model(1).state_dict(), make_model(2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_one_round_is_deterministic_per_round_and_client():
    """Same round and client: same weights; another client: another batch order, other weights."""
    x, _, y, _ = load_digits_split()
    x, y = x[:200], y[:200]
    runs = []
    for client in (0, 0, 1):
        model = make_model(0)
        train_one_round(model, x, y, round=3, client=client, epochs=2)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_centralised_training_reaches_the_demo_bar():
    """Ten epochs on the whole training split reach at least 90 % test accuracy."""
    x_train, x_test, y_train, y_test = load_digits_split()
    model = make_model(0)
    for epoch in range(10):
        metrics = train_one_round(model, x_train, y_train, round=epoch, client=0)
    n, test = evaluate(model, x_test, y_test)
    assert n == 360
    assert metrics["loss"] > 0
    assert test["accuracy"] >= 0.9


def test_empty_data_leaves_the_model_alone():
    """A client without data trains nothing and reports zeros."""
    model = make_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empty_x, empty_y = np.zeros((0, 64), np.float32), np.zeros(0, np.int64)
    assert train_one_round(model, empty_x, empty_y, round=1, client=0) == {"loss": 0.0, "accuracy": 0.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert evaluate(model, empty_x, empty_y)[0] == 0


def test_workload_local_splits_partition_each_client_share():
    """Each client's local train and validation split its Dirichlet share about 80/20, without overlap."""
    workload = DemoWorkload.create(4, seed=0)
    shares = dirichlet_split(workload.y_train, 4, seed=0)
    for data, share in zip(workload.clients, shares, strict=True):
        assert np.array_equal(np.sort(np.concatenate([data.train, data.validation])), share)
        assert abs(len(data.train) - 0.8 * len(share)) <= 1


def test_workload_callbacks_plug_into_the_client_shapes():
    """fit returns new weights, the local train size and metrics; evaluate the local validation size."""
    workload = DemoWorkload.create(3, seed=0)
    start = workload.initial_weights()
    weights, n, metrics = workload.fit_fn(1, epochs=1)(start, {"round": 1, "training_id": "t"})
    assert n == len(workload.clients[1].train)
    assert set(metrics) == {"loss", "accuracy"}
    assert weights.keys() == start.keys()
    assert not all(torch.equal(weights[k], start[k]) for k in start)
    again, _, _ = workload.fit_fn(1, epochs=1)(start, {"round": 1})
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    n_val, val = workload.evaluate_fn(1)(weights, {"round": 1})
    assert n_val == len(workload.clients[1].validation)
    assert set(val) == {"loss", "accuracy"}
    accuracy, loss = workload.global_accuracy(weights)
    assert 0.0 <= accuracy <= 1.0
    assert loss == pytest.approx(
        evaluate(workload._model(weights), workload.x_test, workload.y_test)[1]["loss"]
    )


def test_proximal_term_keeps_the_weights_closer_to_the_global_model():
    """FedProx: with mu > 0 the trained weights end nearer the start than without; mu = 0 is plain SGD."""
    x, _, y, _ = load_digits_split()
    x, y = x[:300], y[:300]
    start = make_model(0).state_dict()

    def distance(mu: float) -> tuple[float, dict[str, torch.Tensor]]:
        model = make_model(0)
        train_one_round(model, x, y, round=1, client=0, epochs=3, lr=0.1, mu=mu)
        state = model.state_dict()
        return sum(float(torch.sum((state[k] - start[k]) ** 2)) for k in start) ** 0.5, state

    plain, plain_state = distance(0.0)
    default = make_model(0)
    train_one_round(default, x, y, round=1, client=0, epochs=3, lr=0.1)
    assert all(torch.equal(plain_state[k], v) for k, v in default.state_dict().items())
    near, _ = distance(1.0)
    nearer, _ = distance(5.0)
    assert nearer < near < plain


def test_fit_reads_mu_from_the_round_config():
    """The workload's fit applies the proximal term when the round's config carries a mu."""
    workload = DemoWorkload.create(3, seed=0)
    start = workload.initial_weights()
    plain, _, _ = workload.fit_fn(0, epochs=2, lr=0.1)(start, {"round": 1, "mu": 0.0})
    prox, _, _ = workload.fit_fn(0, epochs=2, lr=0.1)(start, {"round": 1, "mu": 5.0})

    def moved(weights: dict[str, torch.Tensor]) -> float:
        return sum(float(torch.sum((weights[k] - start[k]) ** 2)) for k in start)

    assert moved(prox) < moved(plain)
