"""Server optimisers over FedAvg's mean: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Formula
-------
Each round, per floating tensor, the pseudo-gradient is the step FedAvg would take,
``d = mean - x`` (``mean`` the weighted mean of the clients' models, ``x`` the base model), and
the server moves along it with its own optimiser (all element-wise; ``eta`` = ``server_lr``)::

    FedAvgM:     m = momentum m + d                       x' = x + eta m
    FedAdam:     m = b1 m + (1 - b1) d,  v = b2 v + (1 - b2) d^2
    FedYogi:     m = b1 m + (1 - b1) d,  v = v - (1 - b2) d^2 sign(v - d^2)
    FedAdagrad:  m = d,                  v = v + d^2
    (the three)  x' = x + eta m / (sqrt(v) + tau)

In the first round ``m = 0`` and ``v = tau^2`` (Reddi et al.'s ``v_{-1} >= tau^2``); later rounds
read both from the previous round's `Aggregate.state` (`RoundContext.state`), under the keys
``m/<name>`` and ``v/<name>`` (FedAvgM keeps only ``m/<name>``, and none when momentum is 0).
No bias correction, as in the paper's Algorithm 2 and Flower's strategies. Where the paper leaves a
choice we follow Flower's strategies: FedAdagrad without first-moment decay (Flower's default
``beta_1 = 0``), FedAvgM's momentum buffer without dampening (PyTorch's SGD convention). Flower
starts ``v`` at 0 rather than ``tau^2``; with the default ``tau = 1e-9`` the two differ by 1e-18.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan (2021), "Adaptive Federated
Optimization", ICLR, https://arxiv.org/abs/2003.00295 (Algorithm 2).
Hsu, Qi, Brown (2019), "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", https://arxiv.org/abs/1909.06335 (FedAvgM).

Dtypes
------
Floating tensors are computed in float32 (float64 for float64 tensors), the state is kept in that
dtype, and the new model is cast back to the tensor's dtype. Integer and bool tensors take FedAvg's
value (no optimiser, no state).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from services.aggregator.methods.base import Aggregate, UpdateMismatch
from services.aggregator.methods.linear import LinearMethod, accumulation_dtype
from shared.aggregation import (
    AggregationMethod,
    FedAdagradParams,
    FedAdamParams,
    FedAvgMParams,
    MethodParams,
)

_CPU = torch.device("cpu")


class ServerOptimizer(LinearMethod):
    """FedAvg's mean, then one step of a server optimiser per floating tensor (see the module doc)."""

    @property
    @abstractmethod
    def server_lr(self) -> float:
        """The server learning rate ``eta``."""

    @abstractmethod
    def direction(self, name: str, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step direction for tensor `name` from its pseudo-gradient `d` (may be consumed).

        Reads the previous state with `previous_state` and puts the new state into `state`.
        """

    def finish(self, mean: dict[str, torch.Tensor]) -> Aggregate:
        """Step from the base along each floating tensor's pseudo-gradient; integer tensors as FedAvg."""
        state: dict[str, torch.Tensor] = {}
        for name, base in self.base.items():
            if not base.dtype.is_floating_point:
                continue
            x = self.base_on_device(name)
            d = mean[name].sub_(x)
            step = self.direction(name, d, state)
            mean[name] = step.mul_(self.server_lr).add_(x)
        return Aggregate(model=self.to_model(mean), state=state)

    def previous_state(self, key: str, name: str, first: float) -> torch.Tensor:
        """State `key/name` from the previous round (a copy on the device), or `first` everywhere."""
        base = self.base[name]
        dtype = accumulation_dtype(base.dtype)
        found = self.ctx.state.get(f"{key}/{name}")
        if found is None:
            return torch.full(base.shape, first, dtype=dtype, device=self.ctx.device)
        if found.dtype != dtype or found.shape != base.shape:
            raise UpdateMismatch(
                f"server state {key}/{name!r}: {found.dtype} {list(found.shape)}, "
                f"expected {dtype} {list(base.shape)}"
            )
        return found.to(self.ctx.device, copy=True)


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): ``m = momentum m + d``, ``x' = x + eta m``."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDAVGM
    params_type: ClassVar[type[MethodParams]] = FedAvgMParams
    params: FedAvgMParams

    @property
    def server_lr(self) -> float:
        """The server learning rate ``eta``."""
        return self.params.server_lr

    def direction(self, name: str, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The momentum buffer ``m = momentum m + d`` (just ``d`` when momentum is 0)."""
        momentum = self.params.momentum
        if momentum == 0:
            return d
        m = self.previous_state("m", name, 0.0).mul_(momentum).add_(d)
        state[f"m/{name}"] = m.to(_CPU, copy=True)
        return m


class _Adaptive(ServerOptimizer):
    """The shared step of FedAdam, FedYogi and FedAdagrad: ``m / (sqrt(v) + tau)``."""

    params: FedAdamParams | FedAdagradParams

    @property
    def server_lr(self) -> float:
        """The server learning rate ``eta``."""
        return self.params.server_lr

    @abstractmethod
    def moments(self, name: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new first and second moments of tensor `name` from its pseudo-gradient `d`."""

    def direction(self, name: str, d: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``m / (sqrt(v) + tau)``, keeping the moments in `state`."""
        m, v = self.moments(name, d)
        if m is not d:
            state[f"m/{name}"] = m.to(_CPU, copy=True)
        state[f"v/{name}"] = v.to(_CPU, copy=True)
        denominator = v.sqrt_().add_(self.params.tau)
        return torch.div(m, denominator, out=denominator)


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021): Adam's moments on the pseudo-gradient, no bias correction."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDADAM
    params_type: ClassVar[type[MethodParams]] = FedAdamParams
    params: FedAdamParams

    def moments(self, name: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2``."""
        p = self.params
        m = self.previous_state("m", name, 0.0).mul_(p.beta1).add_(d, alpha=1 - p.beta1)
        v = self.previous_state("v", name, p.tau**2).mul_(p.beta2).addcmul_(d, d, value=1 - p.beta2)
        return m, v


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021): Yogi's additive second moment on the pseudo-gradient."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDYOGI
    params_type: ClassVar[type[MethodParams]] = FedAdamParams
    params: FedAdamParams

    def moments(self, name: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m = b1 m + (1 - b1) d``, ``v = v - (1 - b2) d^2 sign(v - d^2)``."""
        p = self.params
        m = self.previous_state("m", name, 0.0).mul_(p.beta1).add_(d, alpha=1 - p.beta1)
        v = self.previous_state("v", name, p.tau**2)
        d2 = d * d
        sign = torch.sub(v, d2).sign_()
        v.addcmul_(d2, sign, value=-(1 - p.beta2))
        return m, v


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021): Adagrad's summed squares; ``m = d`` (Flower's ``beta_1 = 0``)."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDADAGRAD
    params_type: ClassVar[type[MethodParams]] = FedAdagradParams
    params: FedAdagradParams

    def moments(self, name: str, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m = d``, ``v = v + d^2``."""
        v = self.previous_state("v", name, self.params.tau**2).addcmul_(d, d)
        return d, v
