"""Contracts and plumbing shared by every fedhub service: events, codec, bus, db, blobs, settings."""
