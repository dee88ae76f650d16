"""Reading a local Hugging Face model folder tensor by tensor: a single `model.safetensors`, a sharded
one with `model.safetensors.index.json`, or the older `pytorch_model.bin` (+ index), without
materialising the checkpoint twice; and the error every loading problem becomes.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

NUM_KEYS_SHOWN = 3
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointMismatchError(ValueError):
    """A folder's weights cannot be loaded exactly into the module asked for: no weights file, a
    missing key, a shape mismatch or an incompatible architecture. The message is one line that names
    the folder and the first offending keys."""


def first_keys(keys: Iterable[str], n: int = NUM_KEYS_SHOWN) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


class Checkpoint:
    """The weights of a local Hugging Face folder, read lazily, one tensor at a time.

    Reads `model.safetensors` or its sharded form (`model.safetensors.index.json`), else
    `pytorch_model.bin` (+ `.index.json`) with `torch.load(weights_only=True, mmap=True)`.

    Memory: a tensor kept in its stored dtype comes straight from the memory-mapped file (`safe_open`;
    copy-on-write, so writing to it never touches the file, and its pages are shared page cache until
    written). A safetensors tensor cast to another dtype is read with a plain file read and cast at
    once, so neither the file's pages nor a second copy of the checkpoint stay in memory. A `.bin`
    shard is memory-mapped whole: the pages of a shard read for a cast stay mapped until the shard is
    released (`in_shard_order` and `tensors` release each shard after its last key; `close()` all).

    Raises `CheckpointMismatchError` when the folder has no weights file or an index names a missing
    shard.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.format, self._key_file, opened = _index_folder(self.folder)
        self._handles: dict[Path, object] = opened
        self._headers: dict[Path, tuple[int, dict]] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the open files (tensors already returned stay valid)."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def _handle(self, path: Path):
        if path not in self._handles:
            if self.format == "safetensors":
                from safetensors import safe_open

                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            else:
                self._handles[path] = _load_bin(path)
        return self._handles[path]

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            with open(path, "rb") as fh:
                length = int.from_bytes(fh.read(8), "little")
                self._headers[path] = (8 + length, json.loads(fh.read(length)))
        return self._headers[path]

    def shape(self, key: str) -> torch.Size:
        """The tensor's shape, read from the file header (no data is read)."""
        path = self._key_file[key]
        if self.format == "safetensors":
            return torch.Size(self._header(path)[1][key]["shape"])
        return self._handle(path)[key].shape

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor; floating-point tensors are cast to `dtype` when given, others never are."""
        path = self._key_file[key]
        if self.format == "safetensors":
            start, header = self._header(path)
            entry = header[key]
            stored = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None or stored is None or not stored.is_floating_point or stored == dtype:
                return self._handle(path).get_tensor(key)
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            with open(path, "rb") as fh:
                fh.seek(start + begin)
                if fh.readinto(memoryview(raw.numpy())) != end - begin:
                    raise CheckpointMismatchError(f"{path}: {key} is truncated")
            return raw.view(stored).reshape(entry["shape"]).to(dtype)
        tensor = self._handle(path)[key]
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def in_shard_order(self, keys: Iterable[str]) -> Iterator[str]:
        """`keys` grouped by shard in file order; a shard is released once the loop moves past its
        last key, so at most one `.bin` shard is mapped at a time."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._key_file[key], []).append(key)
        for path, file_keys in by_file.items():
            yield from file_keys
            self._handles.pop(path, None)

    def tensors(
        self, keys: Iterable[str] | None = None, prefix: str = "", dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys` (default: all) that start with `prefix`, shard by shard."""
        wanted = [key for key in (self.keys() if keys is None else keys) if key.startswith(prefix)]
        for key in self.in_shard_order(wanted):
            yield key, self.tensor(key, dtype)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_checkpoint(
    folder: str | Path, prefix: str = "", dtype: torch.dtype | None = None, strip_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """The folder's tensors whose keys start with `prefix` (all by default), floating ones cast to
    `dtype`, as a dict; with `strip_prefix` the keys lose the prefix. Raises `CheckpointMismatchError`
    when the folder has no weights file."""
    with Checkpoint(folder) as checkpoint:
        return {
            (key[len(prefix) :] if strip_prefix else key): tensor
            for key, tensor in checkpoint.tensors(prefix=prefix, dtype=dtype)
        }


def _index_folder(folder: Path) -> tuple[str, dict[str, Path], dict[Path, object]]:
    """The folder's format, the file of every key, and any file already opened to list its keys."""
    if not folder.is_dir():
        raise CheckpointMismatchError(f"{folder}: not a local model folder")
    for fmt, single, index in (("safetensors", SAFE_WEIGHTS, SAFE_INDEX), ("bin", BIN_WEIGHTS, BIN_INDEX)):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointMismatchError(f"{folder}: {index} has no readable weight_map ({err})") from None
            files = {name: folder / name for name in set(weight_map.values())}
            absent = sorted(name for name, path in files.items() if not path.is_file())
            if absent:
                raise CheckpointMismatchError(f"{folder}: {index} names missing shards {first_keys(absent)}")
            return fmt, {key: files[name] for key, name in weight_map.items()}, {}
        if (folder / single).is_file():
            path = folder / single
            if fmt == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    return fmt, dict.fromkeys(handle.keys(), path), {}
            state = _load_bin(path)
            return fmt, dict.fromkeys(state, path), {path: state}
    raise CheckpointMismatchError(
        f"{folder}: no {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX} in the folder"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # A pre-zip (torch < 1.6) file cannot be memory-mapped: it is read whole, one shard at a time.
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointMismatchError(f"{path}: cannot read: {first_line}") from err
