"""What every store is: the `ObjectStore` protocol, its settings, key rules and the errors it raises.

Keys are `/`-separated paths relative to the store's root URI. A store never interprets what it holds;
the checkpoint code decides what is committed. Backends: `local.LocalStore` (a folder, `file://`) and
`s3.S3Store` (`s3://`); `cosctl.storage.open_store` picks one for a URI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from ..common.errors import BucketNotFound, ObjectNotFound, StorageError, StoreUnavailable, TransientStorageError

__all__ = [
    "BucketNotFound",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "StoreSettings",
    "StoreUnavailable",
    "TransientStorageError",
    "check_key",
    "join_uri",
    "sha256_file",
]


@dataclass(frozen=True)
class StoreSettings:
    """How to reach an S3-compatible store (a local folder needs none of it). Plain values, so the
    storage package never depends on the run spec; `StorageSpec.to_settings()` builds one."""

    endpoint_url: str | None = None  # None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region: str | None = None
    path_style: bool = False
    max_concurrency: int = 8
    multipart_chunk_mb: int = 16
    timeout_s: float = 120.0  # a request (all its attempts) that gets no answer fails within this long


class ObjectStore(Protocol):
    uri: str

    def put_file(self, local_path: Path, key: str) -> None: ...
    def get_file(self, key: str, local_path: Path) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes: ...
    def size(self, key: str) -> int | None: ...
    def stat(self, key: str) -> tuple[int, str] | None: ...  # (size, what changes when it is rewritten)
    def sha256(self, key: str) -> str | None: ...  # as the store can say without a download; None: it cannot
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def move(self, key: str, new_key: str) -> None: ...


def check_key(key: str) -> str:
    """Reject keys that could escape the store's root (absolute, `..`, backslashes, empty parts)."""
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"unsafe object key {key!r}")
    parts = PurePosixPath(key).parts
    if any(part in ("", ".", "..") for part in parts) or "//" in key:
        raise StorageError(f"unsafe object key {key!r}")
    return key


def sha256_file(path: Path, chunk_size: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])
