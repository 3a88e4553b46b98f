"""Tests of the aggregator service."""
