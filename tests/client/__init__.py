"""Tests of the client SDK and the demo learning task."""
