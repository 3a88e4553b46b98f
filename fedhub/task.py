"""The demo's and benchmarks' learning task: scikit-learn digits, a small MLP, non-IID client splits.

Everything is deterministic for a seed: the split, the model's initial weights and each client's
batch order in each round. Threads are the caller's choice (`torch.set_num_threads(1)` per process
keeps many simulated clients from fighting over cores); nothing is set at import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedhub.client.types import EvaluateFn, FitFn

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

NUM_FEATURES = 64
NUM_CLASSES = 10
LOCAL_TRAIN_FRACTION = 0.8


@functools.cache
def load_digits_split() -> tuple[FloatArray, FloatArray, IntArray, IntArray]:
    """`(x_train, x_test, y_train, y_test)`: digits scaled to [0, 1], an 80/20 split with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    for array in (x_train, x_test, y_train, y_test):
        # The cache hands the same arrays to every caller; nobody may change them under the others.
        array.setflags(write=False)
    return x_train, x_test, y_train, y_test


def dirichlet_split(y: np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0) -> list[np.ndarray]:
    """Split indices of `y` among clients with per-class proportions drawn from Dirichlet(alpha).

    Smaller `alpha` gives more skewed (non-IID) label distributions. For each class in order its
    indices are permuted and cut at `cumsum(p) * n`; every index goes to exactly one client and each
    client's indices come back sorted. Some clients may get few or no indices.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(y):
        indices = rng.permutation(np.flatnonzero(y == label))
        proportions = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(indices, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


def make_model(seed: int = 0) -> nn.Module:
    """The task's MLP (64 -> 64 -> ReLU -> 10), initialised from `seed`."""
    torch.manual_seed(seed)
    return _architecture()


def _architecture() -> nn.Module:
    return nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def train_one_round(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    round: int,
    client: int,
    epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 32,
    mu: float = 0.0,
) -> dict[str, float]:
    """Train `model` in place with SGD for `epochs`; return mean train loss and accuracy over them.

    The batch order of epoch `e` comes from a generator seeded `1000 * round + client + 100000 * e`,
    so a client's round is reproducible. With no data the model is left as it is.

    With ``mu > 0`` (FedProx; Li et al. 2020, "Federated Optimization in Heterogeneous Networks",
    https://arxiv.org/abs/1812.06127) each batch minimises ``loss + mu / 2 * ||w - w_global||^2``,
    ``w_global`` being the parameters the model had when called (the round's global model). The
    reported loss is the data loss alone.
    """
    n = len(y)
    if n == 0:
        return {"loss": 0.0, "accuracy": 0.0}
    inputs = torch.tensor(np.asarray(x, dtype=np.float32))
    targets = torch.tensor(np.asarray(y, dtype=np.int64))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    model.train()
    total_loss = 0.0
    correct = 0
    seen = 0
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(1000 * round + client + 100000 * epoch)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            logits = model(inputs[batch])
            loss = loss_fn(logits, targets[batch])
            objective = loss
            if anchor:
                proximal = sum(
                    (torch.sum((p - w0) ** 2) for p, w0 in zip(model.parameters(), anchor, strict=True)),
                    start=torch.zeros(()),
                )
                objective = loss + mu / 2 * proximal
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(dim=1) == targets[batch]).sum())
            seen += len(batch)
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[int, dict[str, float]]:
    """`(n, {"loss", "accuracy"})` of `model` on `x`, `y` (zeros when there is no data)."""
    n = len(y)
    if n == 0:
        return 0, {"loss": 0.0, "accuracy": 0.0}
    model.eval()
    logits = model(torch.tensor(np.asarray(x, dtype=np.float32)))
    targets = torch.tensor(np.asarray(y, dtype=np.int64))
    loss = nn.functional.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    return n, {"loss": loss, "accuracy": accuracy}


# eq=False: arrays have no single truth value, so a generated __eq__ would raise; identity it is.
@dataclass(frozen=True, slots=True, eq=False)
class ClientData:
    """One client's share of the training split: local train and local validation indices."""

    train: np.ndarray
    validation: np.ndarray


# eq=False for the same reason as ClientData.
@dataclass(frozen=True, slots=True, eq=False)
class DemoWorkload:
    """The demo's data and callbacks: non-IID client splits, the held-out test split, fit / evaluate."""

    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray
    clients: tuple[ClientData, ...]
    seed: int = 0

    @classmethod
    def create(cls, num_clients: int, seed: int = 0, alpha: float = 0.5) -> DemoWorkload:
        """Split the digits training set among `num_clients` with Dirichlet(`alpha`), each 80/20 local."""
        x_train, x_test, y_train, y_test = load_digits_split()
        shares = dirichlet_split(y_train, num_clients, alpha=alpha, seed=seed)
        clients = []
        for index, share in enumerate(shares):
            shuffled = np.random.default_rng([seed, index]).permutation(share)
            cut = round(LOCAL_TRAIN_FRACTION * len(shuffled))
            clients.append(ClientData(train=np.sort(shuffled[:cut]), validation=np.sort(shuffled[cut:])))
        return cls(x_train, y_train, x_test, y_test, tuple(clients), seed)

    @property
    def num_clients(self) -> int:
        """How many clients the training split is shared among."""
        return len(self.clients)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The starting global model (`make_model(seed)`'s weights)."""
        return {k: v.detach().clone() for k, v in make_model(self.seed).state_dict().items()}

    def fit_fn(self, client_index: int, epochs: int = 1, lr: float = 0.05) -> FitFn:
        """A `FitFn` training on client `client_index`'s local train split for `epochs`.

        A ``mu`` in the round's config (FedProx) adds the proximal term (see `train_one_round`).
        """
        data = self.clients[client_index]
        x, y = self.x_train[data.train], self.y_train[data.train]

        def fit(
            weights: dict[str, torch.Tensor], config: dict[str, Any]
        ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
            model = self._model(weights)
            metrics = train_one_round(
                model,
                x,
                y,
                round=int(config["round"]),
                client=client_index,
                epochs=epochs,
                lr=lr,
                mu=float(config.get("mu") or 0.0),
            )
            new_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return new_weights, len(y), metrics

        return fit

    def evaluate_fn(self, client_index: int) -> EvaluateFn:
        """An `EvaluateFn` scoring a model on client `client_index`'s local validation split."""
        data = self.clients[client_index]
        x, y = self.x_train[data.validation], self.y_train[data.validation]

        def evaluate_local(
            weights: dict[str, torch.Tensor], config: dict[str, Any]
        ) -> tuple[int, dict[str, float]]:
            return evaluate(self._model(weights), x, y)

        return evaluate_local

    def global_accuracy(self, state_dict: dict[str, torch.Tensor]) -> tuple[float, float]:
        """`(accuracy, loss)` of a model on the held-out test split."""
        _, metrics = evaluate(self._model(state_dict), self.x_test, self.y_test)
        return metrics["accuracy"], metrics["loss"]

    def _model(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        # The weights replace the initial ones, so the global RNG need not be re-seeded (a side
        # effect other threads would see).
        model = _architecture()
        model.load_state_dict(weights)
        return model
