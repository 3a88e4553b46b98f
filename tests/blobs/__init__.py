"""The blob store contract, run against every store."""
