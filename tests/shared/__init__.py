"""Tests of the shared contracts and plumbing."""
