"""Blob store for model tensors: large payloads live here; the database and events carry keys only."""

from shared.blobs.base import BlobStore, content_key, update_key
from shared.blobs.local import LocalBlobStore

__all__ = ["BlobStore", "LocalBlobStore", "content_key", "update_key"]
