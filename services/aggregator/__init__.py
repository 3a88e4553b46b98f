"""The aggregator service: turns a round's client updates into the next global model."""
