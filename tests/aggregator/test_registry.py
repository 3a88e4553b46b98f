"""Every method a training may name has a class, with the right parameter model."""

from __future__ import annotations

from services.aggregator.methods import METHODS
from shared.aggregation import PARAMS, AggregationMethod


def test_every_aggregation_method_has_a_registered_class() -> None:
    assert set(METHODS) == set(AggregationMethod)


def test_each_class_implements_its_name_with_its_parameter_model() -> None:
    for method, cls in METHODS.items():
        assert cls.name == method, cls
        assert cls.params_type is PARAMS[method], cls


def test_only_per_coordinate_methods_are_shardable() -> None:
    shardable = {method for method, cls in METHODS.items() if cls.shardable}
    assert shardable == {AggregationMethod.MEDIAN, AggregationMethod.TRIMMED_MEAN}
