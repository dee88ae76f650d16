"""Where bytes go: `open_store(uri, settings)` maps a URI to a backend.

    a plain path or file://PATH  -> local.LocalStore   (a folder on a local or shared filesystem)
    s3://BUCKET/PREFIX           -> s3.S3Store         (AWS S3, Ceph radosgw, MinIO, moto)

The protocol, the settings and the errors live in `base`; boto3 is imported only when a bucket is used.

May import: `cosctl.common` (the errors) only: plain settings, never a run spec.
"""

from __future__ import annotations

from .base import (
    BucketNotFound,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StoreSettings,
    StoreUnavailable,
    TransientStorageError,
    check_key,
    join_uri,
    sha256_file,
)
from .local import LocalStore

__all__ = [
    "BucketNotFound",
    "LocalStore",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StoreSettings",
    "StoreUnavailable",
    "TransientStorageError",
    "check_key",
    "join_uri",
    "open_store",
    "sha256_file",
]


def open_store(uri: str, settings: StoreSettings | None = None) -> ObjectStore:
    """The store for a URI; `settings` matter only for s3:// (default: `StoreSettings()`)."""
    if uri.startswith("s3://"):
        from .s3 import S3Store

        return S3Store.from_uri(uri, settings)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a path, file:// or s3://)")
    return LocalStore(uri.removeprefix("file://"))
