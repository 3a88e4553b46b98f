"""Blob store for model tensors: large payloads live here; the database and events carry keys only."""

from shared.blobs.base import DEFAULT_CHUNK_SIZE, BlobNotFound, BlobStore, content_key, update_key
from shared.blobs.local import LocalBlobStore
from shared.blobs.postgres import PostgresBlobStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobNotFound",
    "BlobStore",
    "LocalBlobStore",
    "PostgresBlobStore",
    "content_key",
    "update_key",
]
