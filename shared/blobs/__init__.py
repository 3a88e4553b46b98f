"""Blob store for model tensors: large payloads live here; the database and events carry keys only."""

from shared.blobs.base import DEFAULT_CHUNK_SIZE, BlobNotFound, BlobStore, content_key, update_key
from shared.blobs.local import LocalBlobStore
from shared.blobs.postgres import PostgresBlobStore
from shared.blobs.tiered import TieredBlobStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BlobNotFound",
    "BlobStore",
    "LocalBlobStore",
    "PostgresBlobStore",
    "TieredBlobStore",
    "content_key",
    "update_key",
]
