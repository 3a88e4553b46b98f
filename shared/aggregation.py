"""What a training says about its aggregation: the method, the method's parameters, the update kind.

This is a contract: the API validates a training's choice against it when the training is created
(so a bad parameter is a 422 naming it, before anything runs), the orchestrator copies it into each
aggregation job, and the aggregator builds the method from it. The formulas live with the methods
(`services/aggregator/methods/`) and in docs/aggregation.md.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import MalformedPayload


class AggregationMethod(enum.StrEnum):
    """Server-side aggregation methods a training may name."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"
    MULTI_KRUM = "multi_krum"
    BULYAN = "bulyan"
    DP_FEDAVG = "dp_fedavg"
    ENSEMBLE = "ensemble"
    SWAG = "swag"


class UpdateKind(enum.StrEnum):
    """What clients upload: their full weights, or the difference to the round's global model (delta_w)."""

    WEIGHTS = "weights"
    DELTA = "delta"


_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
_Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
_Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class MethodParams(BaseModel):
    """Base of every method's parameters: immutable, unknown names refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FedAvgParams(MethodParams):
    """FedAvg has no parameters."""


class FedProxParams(MethodParams):
    """FedProx: the server part is FedAvg; `mu` is the clients' proximal weight (sent to them)."""

    mu: _NonNegative = 0.01


class FedAvgMParams(MethodParams):
    """FedAvgM (Hsu et al. 2019): server learning rate and server momentum."""

    server_lr: _Positive = 1.0
    momentum: _Beta = 0.9


class FedAdamParams(MethodParams):
    """FedAdam and FedYogi (Reddi et al. 2021); defaults as Flower's strategies."""

    server_lr: _Positive = 0.1
    beta1: _Beta = 0.9
    beta2: _Beta = 0.99
    tau: _Positive = 1e-9


class FedAdagradParams(MethodParams):
    """FedAdagrad (Reddi et al. 2021); defaults as Flower's strategy."""

    server_lr: _Positive = 0.1
    tau: _Positive = 1e-9


class MedianParams(MethodParams):
    """Coordinate-wise median has no parameters."""


class TrimmedMeanParams(MethodParams):
    """Trimmed mean: `beta` is the share cut from each end per coordinate (0 <= beta < 0.5)."""

    beta: Annotated[float, Field(ge=0, lt=0.5, allow_inf_nan=False)] = 0.1


class KrumParams(MethodParams):
    """Krum (Blanchard et al. 2017): `f`, the number of Byzantine clients tolerated."""

    f: Annotated[int, Field(ge=0)] = 1


class MultiKrumParams(MethodParams):
    """Multi-Krum: `f` as Krum; `m` updates selected and averaged (None: n - f)."""

    f: Annotated[int, Field(ge=0)] = 1
    m: Annotated[int, Field(ge=1)] | None = None


class BulyanParams(MethodParams):
    """Bulyan (El Mhamdi et al. 2018): `f` Byzantine clients tolerated (needs n >= 4f + 3)."""

    f: Annotated[int, Field(ge=0)] = 1


class DPFedAvgParams(MethodParams):
    """Central DP-FedAvg (McMahan et al. 2018): L2 clip of each update's delta, Gaussian noise."""

    clip_norm: _Positive = 1.0
    noise_multiplier: _NonNegative = 1.0


class EnsembleParams(MethodParams):
    """Ensemble has no parameters: the round keeps every accepted client model as a member."""


class SwagParams(MethodParams):
    """SWAG moments: tensors named `<name><second_moment_suffix>` are second moments of `<name>`."""

    second_moment_suffix: Annotated[str, Field(min_length=1)] = ".sq_mean"


PARAMS: Mapping[AggregationMethod, type[MethodParams]] = MappingProxyType(
    {
        AggregationMethod.FEDAVG: FedAvgParams,
        AggregationMethod.FEDPROX: FedProxParams,
        AggregationMethod.FEDAVGM: FedAvgMParams,
        AggregationMethod.FEDADAM: FedAdamParams,
        AggregationMethod.FEDYOGI: FedAdamParams,
        AggregationMethod.FEDADAGRAD: FedAdagradParams,
        AggregationMethod.MEDIAN: MedianParams,
        AggregationMethod.TRIMMED_MEAN: TrimmedMeanParams,
        AggregationMethod.KRUM: KrumParams,
        AggregationMethod.MULTI_KRUM: MultiKrumParams,
        AggregationMethod.BULYAN: BulyanParams,
        AggregationMethod.DP_FEDAVG: DPFedAvgParams,
        AggregationMethod.ENSEMBLE: EnsembleParams,
        AggregationMethod.SWAG: SwagParams,
    }
)
"""Each method's parameter model; a new method adds its line here and its class in the aggregator."""


def _unknown_method(method: object) -> str:
    known = ", ".join(m.value for m in AggregationMethod)
    return f"unknown aggregation method {method!r} (known: {known})"


def method_params(method: AggregationMethod | str, params: Mapping[str, Any] | None = None) -> MethodParams:
    """Validate `params` for `method`; `MalformedPayload` names the method and the bad parameter."""
    try:
        chosen = AggregationMethod(method)
    except ValueError:
        raise MalformedPayload(_unknown_method(method)) from None
    try:
        return PARAMS[chosen].model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
        )
        raise MalformedPayload(f"aggregation_params for {chosen.value}: {problems}") from None


class AggregationSpec(BaseModel):
    """A training's aggregation: method and parameters, update kind, excluded tensors, norm bound."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: AggregationMethod = AggregationMethod.FEDAVG
    params: dict[str, Any] = Field(default_factory=dict)
    update_kind: UpdateKind = UpdateKind.WEIGHTS
    exclude_vars: str | None = None
    """A regex (`re.search`); matching tensors are left out by clients and keep the server's values."""
    max_update_norm: _Positive | None = None
    """Updates whose delta to the global model has a larger L2 norm (over all tensors) are rejected."""

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: object) -> object:
        if isinstance(value, str) and value not in AggregationMethod.__members__.values():
            raise ValueError(_unknown_method(value))
        return value

    @model_validator(mode="after")
    def _check(self) -> AggregationSpec:
        try:
            method_params(self.method, self.params)
        except MalformedPayload as exc:
            raise ValueError(exc.detail) from None
        if self.exclude_vars is not None:
            try:
                re.compile(self.exclude_vars)
            except re.error as exc:
                raise ValueError(
                    f"exclude_vars {self.exclude_vars!r} is not a valid regular expression: {exc}"
                ) from None
        return self

    def typed_params(self) -> MethodParams:
        """`params` as the method's parameter model (with its defaults filled in)."""
        return method_params(self.method, self.params)

    def excluded(self, name: str) -> bool:
        """Whether tensor `name` is left out of client updates and keeps the server's value."""
        return excluded_by(self.exclude_vars, name)


def excluded_by(exclude_vars: str | None, name: str) -> bool:
    """Whether a training's `exclude_vars` (a `re.search` pattern, or None) leaves tensor `name` out."""
    return exclude_vars is not None and re.search(exclude_vars, name) is not None


def parse_spec(**fields: Any) -> AggregationSpec:
    """An `AggregationSpec` from its fields; `MalformedPayload` names every problem."""
    try:
        return AggregationSpec(**fields)
    except ValidationError as exc:
        raise MalformedPayload("; ".join(_problem(err) for err in exc.errors())) from None


def _problem(err: Mapping[str, Any]) -> str:
    """One pydantic error as `field: message`, or a validator's own words."""
    where = ".".join(str(p) for p in err["loc"]) or "aggregation"
    cause = err.get("ctx", {}).get("error")
    return str(cause) if err["type"] == "value_error" and cause is not None else f"{where}: {err['msg']}"
