"""The `file://` backend: a folder on a local or shared filesystem."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .base import ObjectNotFound, StorageError, check_key, sha256_file


class LocalStore:
    """A folder on a local or shared filesystem. Writes go to a temp name then `os.replace`, so a
    reader never sees a half-written object."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _atomic_write(self, target: Path, write) -> None:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # e.g. its folder could not be made
                pass
            raise StorageError(f"{self.uri}/{target.relative_to(self.root)}: write failed: {err}") from err

    def put_file(self, local_path: Path, key: str) -> None:
        self._atomic_write(self._path(key), lambda tmp: shutil.copyfile(local_path, tmp))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))

    def get_file(self, key: str, local_path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such object")
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
            raise ObjectNotFound(f"{self.uri}/{key}: no such object") from None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def stat(self, key: str) -> tuple[int, str] | None:
        """(size, modification time in ns) of the file; None when it is missing."""
        try:
            info = self._path(key).stat()
        except FileNotFoundError:
            return None
        return info.st_size, str(info.st_mtime_ns)

    def sha256(self, key: str) -> str | None:
        """The sha256 of the object's bytes, hashed where they lie (None: no such object)."""
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

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
        """Delete one object (a missing one is no error) and the folders it leaves empty."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._remove_empty_parents(path.parent)

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def move(self, key: str, new_key: str) -> None:
        """Rename an object (atomic on one filesystem); the target's folders are created."""
        source, target = self._path(key), self._path(new_key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such object")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except OSError as err:
            raise StorageError(f"{self.uri}/{key}: cannot move to {new_key}: {err}") from err
        self._remove_empty_parents(source.parent)

    def _remove_empty_parents(self, folder: Path) -> None:
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return
            folder = folder.parent
