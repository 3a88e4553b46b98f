"""The four fedhub services: api, orchestrator, aggregator, notifier. None imports another."""
