"""Where bytes go: the `ObjectStore` interface and its `file://` backend.

Keys are `/`-separated paths relative to the store's root URI. A store never interprets what it holds;
the checkpoint manager decides what is committed. `open_store(uri)` maps a URI to a backend:
a plain path or `file://PATH` gives a `LocalStore`; `s3://BUCKET/PREFIX` the S3 backend.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Protocol


class StorageError(RuntimeError):
    """A store operation failed for good (after any retries); the message names the URI."""


class TransientStorageError(StorageError):
    """A failure that is safe to retry (timeouts, 5xx, resets)."""


class ObjectStore(Protocol):
    uri: str

    def put_file(self, local_path: Path, key: str) -> None: ...
    def get_file(self, key: str, local_path: Path) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


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


class LocalStore:
    """A folder on a local or shared filesystem. Writes go to a temp name then `os.replace`, so a
    reader never sees a half-written object."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(self, target: Path, write) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.uri}/{target.relative_to(self.root)}: write failed: {err}") from err

    def put_file(self, local_path: Path, key: str) -> None:
        self._atomic_write(self._path(key), lambda tmp: shutil.copyfile(local_path, tmp))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, local_path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{self.uri}/{key}: no such object")
        local_path.parent.mkdir(parents=True, exist_ok=True)
        if source.resolve() != Path(local_path).resolve():
            shutil.copyfile(source, local_path)

    def get_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                handle.seek(start or 0)
                return handle.read() if end is None else handle.read(end - (start or 0))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: no such object") from None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        keys = []
        for path in base.rglob("*") if base.is_dir() else [base]:
            if path.is_file() and not path.name.startswith(".") and ".tmp-" not in path.name:
                keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def open_store(uri: str, storage_spec=None) -> ObjectStore:
    """The store for a URI: a plain path or file://PATH -> LocalStore; s3://BUCKET/PREFIX -> S3."""
    if uri.startswith("s3://"):
        from .s3 import S3Store  # boto3 is imported only when a bucket is used

        return S3Store.from_uri(uri, storage_spec)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a path, file:// or s3://)")
    return LocalStore(uri.removeprefix("file://"))


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])
