"""Prepared token stores: a split's records validated, tokenised and written once as flat arrays that
every rank memory-maps (docs/design.md §5).

A store holds text tokens only; the visual-token slots are inserted when a sample is read, so one store
serves every stage (32 or 528 visual tokens). Layout of `<prepared>/<split>-<key16>/`:

    tokens.npy       int32   text token ids of every kept record, back to back
    labels.npy       uint8   1 where the token is a label (answers and their eos)
    offsets.npy      int64   record i is tokens[offsets[i]:offsets[i + 1]]   (num_records + 1)
    image_pos.npy    int32   text position where the visual tokens go; -1 for a text-only record
    image_ref.npy    int32   row of the record's image in images.bin; -1 for none
    task_ref.npy     uint16  row of the record's task in meta.json's `tasks`
    ids.bin, id_offsets.npy          record ids, UTF-8, back to back
    images.bin, image_offsets.npy    distinct image names, UTF-8, back to back
    meta.json        written last: the key and what made it, the report (bad records by reason,
                     truncated, text-only), tasks, the size of every file

Stores are found or built by `cosctl.data.prepare`; this module reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cos_model import IGNORE_INDEX

from ..common.errors import DataError
from .images import ImageSource
from .records import (
    DataReport,
    LengthStats,
)

FORMAT = 1
META = "meta.json"
ARRAYS = ("tokens", "labels", "offsets", "image_pos", "image_ref", "task_ref", "id_offsets", "image_offsets")
BLOBS = ("ids.bin", "images.bin")


# --- what a sample is, once read -------------------------------------------------------------------


class Sample:
    """One record as model input: `input_ids` and `labels` (int64 arrays, visual slots inserted) and
    its image name (None: text-only)."""

    __slots__ = ("image", "input_ids", "labels", "record_id")

    def __init__(self, record_id: str, input_ids: np.ndarray, labels: np.ndarray, image: str | None):
        self.record_id, self.input_ids, self.labels, self.image = record_id, input_ids, labels, image

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


# --- the store on disk -----------------------------------------------------------------------------


class TokenStore:
    """A prepared split, memory-mapped read-only. Picklable: a copy reopens the files by path."""

    reused: bool = True  # set by prepare_split: found (True) or prepared by this call
    uri: str = ""  # where it is published (a folder or s3:// URI); `folder` is where it is mapped from
    data_key: str = ""  # set by prepare_split: the key without the image root (`SplitSource.data_key`)

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.folder}: not a prepared token store ({err})") from err
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{self.folder}: token store format {self.meta.get('format')}, expected {FORMAT}")
        for name, size in self.meta["files"].items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise DataError(f"{path}: missing or of the wrong size; delete {self.folder} to prepare it again")
        self._open()

    def _open(self) -> None:
        # Per-record arrays are mapped; the per-token ones and the strings are read with pread: reading
        # samples through a mapping would leave every page an epoch touched in this process's RSS.
        for name in ARRAYS:
            path = self.folder / f"{name}.npy"
            setattr(self, name, Column(path) if name in ("tokens", "labels") else np.load(path, mmap_mode="r"))
        self.ids_blob = Column(self.folder / "ids.bin", np.uint8)
        self.images_blob = Column(self.folder / "images.bin", np.uint8)
        self.tasks: list[str] = list(self.meta["tasks"])

    def __getstate__(self) -> dict:
        return {
            "folder": self.folder,
            "meta": self.meta,
            "reused": self.reused,
            "uri": self.uri,
            "data_key": self.data_key,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def report(self) -> DataReport:
        return DataReport(**self.meta["report"])

    def record_id(self, index: int) -> str:
        return _blob_string(self.ids_blob, self.id_offsets, index)

    def image(self, index: int) -> str | None:
        ref = int(self.image_ref[index])
        return None if ref < 0 else _blob_string(self.images_blob, self.image_offsets, ref)

    def task(self, index: int) -> str:
        return self.tasks[int(self.task_ref[index])]

    def text(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(text token ids, label mask, visual-token position or -1) of record `index`."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.tokens[lo:hi], self.labels[lo:hi], int(self.image_pos[index])

    def text_lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def records(self, num_visual_tokens: int, image_id: int, images: ImageSource) -> StoreRecords:
        return StoreRecords(self, num_visual_tokens, image_id, images)


class Column:
    """A flat array in a file (`.npy`, or raw bytes when `dtype` is given) whose slices are read with
    `os.pread`: through the page cache, shared by every process, but never mapped, so reading a whole
    epoch does not grow the reader's resident memory. Picklable by path; forked workers reopen it."""

    def __init__(self, path: Path, dtype=None):
        self.path = path
        if dtype is None:
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, header_dtype = read_header(handle)
                self.start, self.dtype, self.size = handle.tell(), np.dtype(header_dtype), int(np.prod(shape))
        else:
            self.start, self.dtype = 0, np.dtype(dtype)
            self.size = path.stat().st_size // self.dtype.itemsize
        self._fd, self._pid = -1, -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}

    def __len__(self) -> int:
        return self.size

    def _handle(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, span: slice) -> np.ndarray:
        lo, hi, _ = span.indices(self.size)
        if hi <= lo:
            return np.zeros(0, self.dtype)
        width = self.dtype.itemsize
        data = os.pread(self._handle(), (hi - lo) * width, self.start + lo * width)
        if len(data) != (hi - lo) * width:
            raise DataError(f"{self.path}: shorter than its index says; delete its folder to prepare it again")
        return np.frombuffer(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[0 : self.size]
        return array if dtype is None else array.astype(dtype)

    def __del__(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)


def _blob_string(blob: Column, offsets: np.ndarray, index: int) -> str:
    return blob[int(offsets[index]) : int(offsets[index + 1])].tobytes().decode("utf-8")


class StoreRecords:
    """A prepared split as the loader reads it: lengths with `num_visual_tokens` slots per image, and
    samples built from the mapped arrays on demand (`cosctl.train.batching` takes it like a list of
    examples). `num_source_records` and `num_bad` (dropped at preparation) size the budget of
    `data.max_bad_fraction` for images that fail at run time."""

    def __init__(self, store: TokenStore, num_visual_tokens: int, image_id: int, images: ImageSource):
        self.store, self.num_visual_tokens, self.image_id, self.images = store, num_visual_tokens, image_id, images
        self._lengths: np.ndarray | None = None
        report = store.report
        self.num_source_records, self.num_bad = report.num_records, report.num_bad

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lengths": None}

    def __len__(self) -> int:
        return len(self.store)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample (text + visual), int32, one per record."""
        if self._lengths is None:
            lengths = self.store.text_lengths()
            lengths += (np.asarray(self.store.image_pos) >= 0).astype(np.int32) * self.num_visual_tokens
            self._lengths = lengths
        return self._lengths

    def length_stats(self) -> LengthStats:
        text = self.store.text_lengths()
        return LengthStats(int(text.min()), int(text.sum()) // len(text), int(self.lengths.max()))

    def record_id(self, index: int) -> str:
        return self.store.record_id(index)

    def image(self, index: int) -> str | None:
        return self.store.image(index)

    def data_pin(self) -> dict:
        """What a checkpoint's loader position records of the data it reads: the number of records and
        the data key (the JSON's content, tokenizer and data settings; not where the files lie)."""
        return {"records": len(self), "key": self.store.data_key or self.store.key}

    def sample(self, index: int) -> Sample:
        ids, mask, image_pos = self.store.text(index)
        ids = ids.astype(np.int64)
        labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
        if image_pos >= 0:
            ids = np.concatenate(
                [ids[:image_pos], np.full(self.num_visual_tokens, self.image_id, np.int64), ids[image_pos:]]
            )
            labels = np.concatenate(
                [labels[:image_pos], np.full(self.num_visual_tokens, IGNORE_INDEX, np.int64), labels[image_pos:]]
            )
        return Sample(self.store.record_id(index), ids, labels, self.store.image(index))


def pack_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A string table as the store writes it: UTF-8 back to back, and offsets (one more than strings)."""
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    """The strings of a table `pack_strings` wrote."""
    data = blob.tobytes()
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
