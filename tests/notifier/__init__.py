"""Tests of the notifier service: event streams, webhooks, storage."""
