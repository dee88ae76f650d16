"""Reading a local Hugging Face model folder tensor by tensor: a single `model.safetensors`, a sharded
one with `model.safetensors.index.json`, or the older `pytorch_model.bin` (+ index), without
materialising the checkpoint twice, whole tensors or a flat range of one (`Checkpoint`); writing one
the same way, tensor by tensor into safetensors shards (`ShardWriter`); and the error every loading
problem becomes.
"""

from __future__ import annotations

import json
import math
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

    def dtype(self, key: str) -> torch.dtype:
        """The tensor's stored dtype, read from the file header (no data is read)."""
        path = self._key_file[key]
        if self.format == "safetensors":
            code = self._header(path)[1][key]["dtype"]
            if code not in SAFETENSORS_DTYPES:
                raise CheckpointMismatchError(f"{path}: {key} has a dtype this reader does not know ({code})")
            return SAFETENSORS_DTYPES[code]
        return self._handle(path)[key].dtype

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

    def flat(
        self, key: str, start: int, stop: int, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements `start:stop` of the tensor flattened in row-major order, cast to `dtype` like
        `tensor` (a ZeRO-3 rank's partition is such a range); written into `out` (1-D, of that many
        elements, any dtype and device) when given, and returned. From a safetensors file only those
        bytes are read, with plain file reads: straight into `out` when it is a CPU tensor of the stored
        dtype, else through a buffer of at most `FLAT_CHUNK_BYTES`, so nothing but `out` is left
        allocated. A `.bin` tensor is sliced from its memory-mapped shard."""
        path = self._key_file[key]
        stored = self.dtype(key)
        target = dtype if dtype is not None and stored.is_floating_point else stored
        if out is None:
            out = torch.empty(stop - start, dtype=target)
        if out.shape != (stop - start,):
            raise ValueError(f"{key}: out has shape {tuple(out.shape)}, not ({stop - start},)")
        if self.format != "safetensors":
            return out.copy_(self._handle(path)[key].reshape(-1)[start:stop])
        header_size, header = self._header(path)
        entry = header[key]
        if not 0 <= start <= stop <= math.prod(entry["shape"]):
            raise CheckpointMismatchError(f"{path}: {key} has no elements {start}:{stop}")
        size = stored.itemsize
        with open(path, "rb") as fh:
            fh.seek(header_size + entry["data_offsets"][0] + start * size)
            if out.device.type == "cpu" and out.dtype == stored and out.is_contiguous():
                _read_exactly(fh, out.view(torch.uint8), path, key)
                return out
            step = max(1, FLAT_CHUNK_BYTES // size)
            buffer = torch.empty(min(step, stop - start) * size, dtype=torch.uint8)
            for begin in range(0, stop - start, step):
                chunk = buffer[: min(step, stop - start - begin) * size]
                _read_exactly(fh, chunk, path, key)
                out[begin : begin + chunk.numel() // size].copy_(chunk.view(stored))
        return out

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


FLAT_CHUNK_BYTES = 16 * 2**20


def _read_exactly(fh, into: torch.Tensor, path: Path, key: str) -> None:
    if fh.readinto(memoryview(into.numpy())) != into.numel():
        raise CheckpointMismatchError(f"{path}: {key} is truncated")


SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class ShardWriter:
    """A model folder's weights written tensor by tensor, laid out as transformers' `save_pretrained`
    lays them out: one `model.safetensors` when they fit in `max_shard_bytes`, else
    `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`.

    `layout` (name, dtype, shape) fixes every tensor and its order up front, so each shard's header is
    written before its data and `write` keeps nothing: a caller can gather a partitioned model one
    tensor at a time and never hold more. Tensors must come in `layout` order; `close` checks that
    every one came (the `with` block closes).
    """

    def __init__(
        self,
        folder: str | Path,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self._layout = [(name, dtype, tuple(shape), math.prod(shape) * dtype.itemsize) for name, dtype, shape in layout]
        shards: list[list[int]] = [[]]
        shard_bytes = 0
        for index, (*_, nbytes) in enumerate(self._layout):
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(index)
            shard_bytes += nbytes
        count = len(shards)
        self._files = (
            [SAFE_WEIGHTS] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self._shards = shards
        self._metadata = {"format": "pt", **(metadata or {})}
        self._next = 0
        self._handle = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if exc_type is None:
            self.close()

    def _header(self, shard: int) -> bytes:
        header: dict[str, object] = {"__metadata__": self._metadata}
        offset = 0
        for index in self._shards[shard]:
            name, dtype, shape, nbytes = self._layout[index]
            header[name] = {
                "dtype": SAFETENSORS_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned; the format allows trailing spaces
        return len(text).to_bytes(8, "little") + text

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the layout, written through to its shard."""
        if self._next >= len(self._layout):
            raise ValueError(f"{name}: every tensor of the layout is written already")
        expected, dtype, shape, _ = self._layout[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} {tensor.dtype} {tuple(tensor.shape)}: expected {expected} {dtype} {shape} next in the layout"
            )
        shard = next(i for i, indices in enumerate(self._shards) if self._next in indices)
        if self._next == self._shards[shard][0]:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.folder / self._files[shard], "wb")
            self._handle.write(self._header(shard))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        if self._next == self._shards[shard][-1]:
            self._handle.close()
            self._handle = None
        self._next += 1

    def close(self) -> None:
        """Check every tensor was written; with several shards, write the index."""
        if self._next != len(self._layout):
            raise ValueError(f"{self.folder}: {len(self._layout) - self._next} tensors of the layout never written")
        if len(self._files) > 1:
            weight_map = {
                self._layout[index][0]: self._files[shard]
                for shard, indices in enumerate(self._shards)
                for index in indices
            }
            total = sum(nbytes for *_, nbytes in self._layout)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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
