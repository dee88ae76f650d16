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

The key is a sha256 of what decides the arrays: the data file's content (sha256 of the JSON, not its
size or mtime), the tokenizer (`data.tokenizer_fingerprint`), the image root, `data.max_text_tokens`,
`data.image_check` and the format version. A requeued or restarted run with the same inputs finds the
store and maps it; anything else prepares a new one next to it.

Preparing is split over the ranks (each validates, tokenises and checks the images of a contiguous
slice of the records, with `data.num_workers` processes) and merged by rank 0. `<prepared>` defaults
to `<data.root>/prepared` and may be an `s3://` URI; a remote store is copied into the local cache
before it is read. Host memory per rank for the data is a few arrays of one number per record (the
lengths, offsets and image positions, mapped); tokens and strings are read with pread, through the page
cache that the ranks share, when a micro-batch is built, so they never stay in a rank's resident set.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cos_model import IGNORE_INDEX

from .data import (
    MAX_REPORTED_BAD_IDS,
    DataReport,
    LengthStats,
    check_bad_fraction,
    encode_records,
    image_token_id,
    read_records,
    tokenizer_fingerprint,
)
from .errors import DataError, ObjectNotFound, StorageError
from .images import DEFAULT_CACHE_BYTES, ImageSource, default_cache_dir
from .log import log
from .storage import LocalStore, ObjectStore, StoreSettings, join_uri, open_store, sha256_file

FORMAT = 1
META = "meta.json"
ARRAYS = ("tokens", "labels", "offsets", "image_pos", "image_ref", "task_ref", "id_offsets", "image_offsets")
BLOBS = ("ids.bin", "images.bin")
CHUNK_RECORDS = 4096
T = TypeVar("T")


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
        return {"folder": self.folder, "meta": self.meta, "reused": self.reused, "uri": self.uri}

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
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
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
        array = self[0:self.size]
        return array if dtype is None else array.astype(dtype)

    def __del__(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)


def _blob_string(blob: Column, offsets: np.ndarray, index: int) -> str:
    return blob[int(offsets[index]):int(offsets[index + 1])].tobytes().decode("utf-8")


class StoreRecords:
    """A prepared split as the loader reads it: lengths with `num_visual_tokens` slots per image, and
    samples built from the mapped arrays on demand (`cosctl.batching` takes it like a list of
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

    def sample(self, index: int) -> Sample:
        ids, mask, image_pos = self.store.text(index)
        ids = ids.astype(np.int64)
        labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
        if image_pos >= 0:
            ids = np.concatenate([ids[:image_pos], np.full(self.num_visual_tokens, self.image_id, np.int64),
                                  ids[image_pos:]])
            labels = np.concatenate([labels[:image_pos], np.full(self.num_visual_tokens, IGNORE_INDEX, np.int64),
                                     labels[image_pos:]])
        return Sample(self.store.record_id(index), ids, labels, self.store.image(index))


# --- the key ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSource:
    """Everything that goes into preparing one split; `key()` names its store."""

    root: str  # data.root: a folder or s3:// URI
    name: str  # the JSON file, relative to root
    max_text_tokens: int
    image_check: str  # decode | exists | none
    settings: StoreSettings | None = None
    cache_dir: Path | None = None
    image_cache_bytes: int = DEFAULT_CACHE_BYTES
    prepared: str | None = None  # where stores go; default <root>/prepared

    @property
    def remote(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def root_id(self) -> str:
        return self.root if self.remote else str(Path(self.root.removeprefix("file://")).expanduser().resolve())

    @property
    def prepared_uri(self) -> str:
        return self.prepared or join_uri(self.root, "prepared")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def images(self) -> ImageSource:
        return ImageSource(self.root, self.settings, self.cache / "data", self.image_cache_bytes)

    def json_uri(self) -> str:
        return join_uri(self.root, self.name)

    def local_json(self) -> Path:
        """The data file on this machine: itself for a local root, else a copy fetched into the cache."""
        if not self.remote:
            return Path(self.root.removeprefix("file://")) / self.name
        target = self.cache / "data" / "json" / hashlib.sha256(self.root.encode()).hexdigest()[:16] / self.name
        try:
            open_store(self.root, self.settings).get_file(self.name, target)
        except ObjectNotFound as err:
            raise DataError(f"{self.json_uri()}: data file not found ({err})") from err
        return target

    def key(self, json_sha256: str, tokenizer_sha256: str) -> str:
        inputs = {"format": FORMAT, "json_sha256": json_sha256, "tokenizer_sha256": tokenizer_sha256,
                  "root": self.root_id, "max_text_tokens": self.max_text_tokens, "image_check": self.image_check}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def folder_name(self, key: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem) or "split"
        return f"{stem}-{key[:16]}"


def split_source(data, name: str, settings: StoreSettings | None) -> SplitSource:
    """The `SplitSource` of a run spec's `data` section for the file `name`."""
    return SplitSource(root=data.root, name=name, max_text_tokens=data.max_text_tokens, image_check=data.image_check,
                       settings=settings, cache_dir=Path(data.cache_dir) if data.cache_dir else None,
                       image_cache_bytes=data.image_cache_mb << 20, prepared=data.prepared)


# --- ranks -----------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _everyone(compute: Callable[[], T]) -> list[T]:
    """`compute()` on every rank, and every rank's result on every rank. If any rank raised, every
    rank raises the lowest failing rank's error (so none waits in a later collective)."""
    try:
        outcome: tuple[bool, Any] = (True, compute())
    except Exception as err:  # re-raised below on every rank
        outcome = (False, err)
    rank, world = _world()
    outcomes = [outcome]
    if world > 1:
        import torch.distributed as dist

        outcomes = [None] * world
        dist.all_gather_object(outcomes, outcome)
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


def _on_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result (or its error) on every rank."""
    rank, _ = _world()
    return _everyone(lambda: compute() if rank == 0 else None)[0]


def _on_local_main(compute: Callable[[], T]) -> None:
    """`compute()` on the first rank of each machine; every rank waits for all of them."""
    _everyone(lambda: compute() if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None)


# --- loading a split (what a training stage calls) --------------------------------------------------


def load_split(source: SplitSource, tokenizer, *, num_visual_tokens: int, max_bad_fraction: float,
               workers: int = 0) -> StoreRecords:
    """The split's prepared store, mapped on every rank: found by its key, or prepared now (split over
    the ranks). Collective when a process group is up. Raises a DataError, naming the file and the
    settings to change, when more than `max_bad_fraction` of the records are bad."""
    store = prepare_split(source, tokenizer, workers=workers)
    report = store.report
    log.info(f"data: {report.summary()}")
    check_bad_fraction(report, max_bad_fraction)
    return store.records(num_visual_tokens, image_token_id(tokenizer), source.images())


def prepare_split(source: SplitSource, tokenizer, *, workers: int = 0) -> TokenStore:
    """Find or build the split's token store and map it on this rank (collective; see `load_split`)."""
    started = time.monotonic()
    # The preparation's own id keeps the parts of two jobs preparing the same store at once apart.
    key, json_path, attempt = _on_main(lambda: (*_split_key(source, tokenizer), uuid.uuid4().hex[:8]))
    location = StoreLocation(source, key, attempt)
    found = _on_main(location.published)
    if found:
        log.info(f"data: using prepared {location.uri} (key {key[:16]})")
    else:
        rank, world = _world()
        log.info(f"data: preparing {source.json_uri()} into {location.uri} (key {key[:16]}) over {world} rank(s)")
        # In a forked child each: parsing a large JSON leaves memory the rank's allocator would keep.
        _everyone(lambda: _in_child(_prepare_part, source, tokenizer, location, json_path if rank == 0 else None,
                                    workers, rank, world))
        _on_main(lambda: _in_child(location.merge_parts, world))
        log.info(f"data: prepared {location.uri} in {time.monotonic() - started:.1f} s")
    _on_local_main(location.fetch)
    store = TokenStore(location.local)
    store.reused = found
    store.uri = location.uri
    return store


def prepare_spec(spec, tokenizer, *, workers: int | None = None) -> list[dict]:
    """`cosctl data prepare`: the train and eval splits of a training spec prepared (or found), with
    what each holds. Bad records are reported, not refused: the run applies data.max_bad_fraction."""
    settings = spec.storage.to_settings()
    summary = []
    for name in [spec.data.train] + ([spec.data.eval] if spec.data.eval else []):
        store = prepare_split(split_source(spec.data, name, settings), tokenizer,
                              workers=spec.data.num_workers if workers is None else workers)
        report = store.report
        summary.append({"split": name, "store": store.uri, "local": str(store.folder), "key": store.key,
                        "reused": store.reused, "records": report.num_records, "ok": report.num_ok,
                        "bad": report.bad, "first_bad_ids": report.bad_ids, "truncated": report.num_truncated,
                        "text_only": report.num_text_only, "text_tokens": store.meta["num_tokens"],
                        "bad_fraction": round(report.num_bad / max(report.num_records, 1), 6),
                        "within_max_bad_fraction": report.num_bad <= spec.data.max_bad_fraction * report.num_records})
    return summary


def _split_key(source: SplitSource, tokenizer) -> tuple[str, Path]:
    json_path = source.local_json()
    if not json_path.is_file():
        raise DataError(f"{source.json_uri()}: data file not found (data.root={source.root})")
    return source.key(sha256_file(json_path), tokenizer_fingerprint(tokenizer)), json_path


class StoreLocation:
    """Where a store with `key` lives (`uri`, any store) and is mapped from (`local`)."""

    def __init__(self, source: SplitSource, key: str, attempt: str = ""):
        self.source, self.key, self.attempt = source, key, attempt
        self.name = source.folder_name(key)
        self.uri = join_uri(source.prepared_uri, self.name)
        self.store: ObjectStore = open_store(source.prepared_uri, source.settings)
        if isinstance(self.store, LocalStore):
            self.local = self.store.root / self.name
        else:
            where = hashlib.sha256(source.prepared_uri.encode()).hexdigest()[:16]
            self.local = source.cache / "prepared" / where / self.name

    def parts_key(self, rank: int | None = None) -> str:
        folder = f".parts-{self.key[:16]}-{self.attempt}"
        return folder if rank is None else f"{folder}/part-{rank:05d}.npz"

    def _meta(self) -> dict | None:
        try:
            meta = json.loads(self.store.get_bytes(f"{self.name}/{META}"))
        except ObjectNotFound:
            return None
        except ValueError:
            return None  # a damaged meta.json: prepare again
        except OSError as err:  # a local path that cannot be a folder; a store that is down raises itself
            raise DataError(f"cannot read prepared data under {self.source.prepared_uri} ({err}); set "
                            "data.prepared to a writable folder or s3:// URI") from err
        return meta if meta.get("key") == self.key and meta.get("format") == FORMAT else None

    def published(self) -> bool:
        return self._meta() is not None

    def write_part(self, part: dict[str, np.ndarray], rank: int) -> None:
        staging = self.source.cache / "staging" / f"{self.key[:16]}-{uuid.uuid4().hex[:8]}.npz"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            np.savez(staging, **part)
            self._put(staging, self.parts_key(rank))
        finally:
            staging.unlink(missing_ok=True)

    def _put(self, path: Path, key: str) -> None:
        try:
            self.store.put_file(path, key)
        except StorageError as err:
            raise DataError(f"cannot write the prepared data under {self.source.prepared_uri} ({err}); set "
                            "data.prepared to a writable folder or s3:// URI") from err

    def _read_part(self, rank: int) -> dict[str, np.ndarray]:
        key = self.parts_key(rank)
        if isinstance(self.store, LocalStore):
            path = self.store.root / key
        else:
            path = self.source.cache / "staging" / f"{self.key[:16]}-part-{rank:05d}.npz"
            self.store.get_file(key, path)
        with np.load(path) as npz:
            part = {name: npz[name] for name in npz.files}
        if not isinstance(self.store, LocalStore):
            path.unlink(missing_ok=True)
        return part

    def merge_parts(self, world: int) -> None:
        """Rank 0: every rank's part -> one store, published files first and meta.json last."""
        parts = [self._read_part(rank) for rank in range(world)]
        staging = self.source.cache / "staging" / f"{self.name}-{uuid.uuid4().hex[:8]}"
        if isinstance(self.store, LocalStore):
            staging = self.local.parent / f".tmp-{self.name}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True, exist_ok=True)
            meta = _write_store(staging, parts, self.key, self.source)
            if isinstance(self.store, LocalStore):
                if (self.local / META).is_file():  # someone else published it meanwhile
                    shutil.rmtree(staging)
                else:
                    shutil.rmtree(self.local, ignore_errors=True)
                    os.replace(staging, self.local)
            else:
                for name in meta["files"]:
                    self._put(staging / name, f"{self.name}/{name}")
                self._put(staging / META, f"{self.name}/{META}")
                shutil.rmtree(self.local, ignore_errors=True)
                self.local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, self.local)
        except OSError as err:
            raise DataError(f"cannot write the prepared data to {staging} ({err}); set data.prepared (and "
                            "data.cache_dir) to writable folders") from err
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.store.delete_many(self.store.list(self.parts_key() + "/"))
        if isinstance(self.store, LocalStore):
            shutil.rmtree(self.store.root / self.parts_key(), ignore_errors=True)

    def fetch(self) -> None:
        """A remote store copied into the local cache (kept when the cached copy is complete)."""
        if isinstance(self.store, LocalStore):
            return
        meta_path = self.local / META
        if meta_path.is_file():
            try:
                TokenStore(self.local)
                return
            except DataError:
                pass
        meta = self._meta()
        if meta is None:
            raise DataError(f"{self.uri}: prepared data disappeared from the store; start the run again")
        staging = self.local.parent / f".tmp-{self.name}-{uuid.uuid4().hex[:8]}"
        try:
            for name in [*meta["files"], META]:
                self.store.get_file(f"{self.name}/{name}", staging / name)
            shutil.rmtree(self.local, ignore_errors=True)
            os.replace(staging, self.local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# --- preparing -------------------------------------------------------------------------------------

_JOB: dict[str, Any] = {}  # what pool workers read; set before they fork


def _in_child(function: Callable[..., None], *args) -> None:
    """`function(*args)` in a forked process, its error raised here: what it allocates goes back to the
    system when it exits. It must not use the process group."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)

    def run() -> None:
        try:
            function(*args)
            outcome: tuple[bool, BaseException | None] = (True, None)
        except BaseException as err:  # sent to the parent, which raises it
            outcome = (False, err)
        try:
            writer.send(outcome)
        except Exception:  # an error that does not pickle: its text
            writer.send((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))

    process = context.Process(target=run, name="cosctl-prepare")
    process.start()
    writer.close()
    try:
        ok, error = reader.recv()
    except EOFError:
        ok, error = False, DataError(f"preparing the data failed: its process ended with exit code "
                                     f"{process.join() or process.exitcode} (out of memory?)")
    process.join()
    if not ok:
        raise error


def _prepare_part(source: SplitSource, tokenizer, location: StoreLocation, json_path: Path | None,
                  workers: int, rank: int, world: int) -> None:
    """This rank's contiguous slice of the records: validated, tokenised, images checked -> a part."""
    records = read_records(json_path or source.local_json())
    lo, hi = len(records) * rank // world, len(records) * (rank + 1) // world
    _JOB.update(records=records, tokenizer=tokenizer, max_text_tokens=source.max_text_tokens,
                images=source.images(), decode=source.image_check == "decode")
    try:
        chunks = [(start, min(start + CHUNK_RECORDS, hi)) for start in range(lo, hi, CHUNK_RECORDS)]
        with _pool(workers) as pool:
            encoded = list(pool(_encode_chunk, chunks))
            images = sorted({name for chunk in encoded for name in chunk["image_names"]})
            problems: dict[str, str | None] = {}
            if source.image_check != "none" and images:
                batches = [images[i:i + 256] for i in range(0, len(images), 256)]
                for batch, result in zip(batches, pool(_check_images, batches), strict=True):
                    problems.update(zip(batch, result, strict=True))
    finally:
        _JOB.clear()
    part = _assemble_part(encoded, problems, len(records))
    location.write_part(part, rank)


class _pool:
    """`pool(fn, items)` -> results in order: `workers` forked processes, or this one when 0."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenise on one thread each
            self.pool = multiprocessing.get_context("fork").Pool(self.workers)
            return lambda fn, items: self.pool.imap(fn, items)
        return lambda fn, items: map(fn, items)

    def __exit__(self, *exc) -> None:
        if self.pool is None:
            return
        if exc[0] is None:
            self.pool.close()
        else:
            self.pool.terminate()
        self.pool.join()


def _encode_chunk(bounds: tuple[int, int]) -> dict:
    encoded, bad = encode_records(_JOB["records"], range(*bounds), _JOB["tokenizer"], _JOB["max_text_tokens"])
    lengths = np.array([len(item.ids) for item in encoded], dtype=np.int64)
    return {
        "index": np.array([item.index for item in encoded], dtype=np.int64),
        "tokens": np.fromiter(chain.from_iterable(item.ids for item in encoded), np.int32, int(lengths.sum())),
        "labels": np.fromiter(chain.from_iterable(item.mask for item in encoded), np.uint8, int(lengths.sum())),
        "lengths": lengths,
        "image_pos": np.array([item.image_pos for item in encoded], dtype=np.int32),
        "truncated": np.array([item.truncated for item in encoded], dtype=bool),
        "ids": [item.record_id for item in encoded],
        "tasks": [item.task for item in encoded],
        "images": [item.image for item in encoded],
        "image_names": {item.image for item in encoded if item.image is not None},
        "bad": bad,
    }


def _check_images(names: list[str]) -> list[str | None]:
    return [_JOB["images"].problem(name, decode=_JOB["decode"]) for name in names]


def _strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [value.encode("utf-8") for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(value) for value in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _assemble_part(chunks: list[dict], problems: dict[str, str | None], num_records: int) -> dict[str, np.ndarray]:
    """One rank's kept records as flat arrays (records whose image is bad move to the bad list)."""
    bad = [item for chunk in chunks for item in chunk["bad"]]
    keep_parts, token_parts, label_parts = [], [], []
    ids, tasks, images = [], [], []
    for chunk in chunks:
        keep = np.ones(len(chunk["index"]), dtype=bool)
        for row, image in enumerate(chunk["images"]):
            problem = problems.get(image) if image is not None else None
            if problem is not None:
                keep[row] = False
                bad.append((int(chunk["index"][row]), chunk["ids"][row], problem))
        token_keep = np.repeat(keep, chunk["lengths"])
        token_parts.append(chunk["tokens"][token_keep])
        label_parts.append(chunk["labels"][token_keep])
        keep_parts.append({name: chunk[name][keep] for name in ("index", "lengths", "image_pos", "truncated")})
        ids += [value for value, kept in zip(chunk["ids"], keep, strict=True) if kept]
        tasks += [value for value, kept in zip(chunk["tasks"], keep, strict=True) if kept]
        images += [value for value, kept in zip(chunk["images"], keep, strict=True) if kept]
    bad.sort()
    table = sorted({image for image in images if image is not None})
    rows = {image: row for row, image in enumerate(table)}
    task_table = sorted(set(tasks))
    task_rows = {task: row for row, task in enumerate(task_table)}
    id_blob, id_offsets = _strings(ids)
    image_blob, image_offsets = _strings(table)
    bad_blob, bad_offsets = _strings([json.dumps(item) for item in bad])
    task_blob, task_offsets = _strings(task_table)

    def joined(name: str, dtype) -> np.ndarray:
        return np.concatenate([part[name] for part in keep_parts]).astype(dtype) if keep_parts else np.zeros(0, dtype)

    return {
        "tokens": np.concatenate(token_parts).astype(np.int32) if token_parts else np.zeros(0, np.int32),
        "labels": np.concatenate(label_parts).astype(np.uint8) if label_parts else np.zeros(0, np.uint8),
        "lengths": joined("lengths", np.int64), "image_pos": joined("image_pos", np.int32),
        "truncated": joined("truncated", bool),
        "image_ref": np.array([-1 if image is None else rows[image] for image in images], dtype=np.int32),
        "task_ref": np.array([task_rows[task] for task in tasks], dtype=np.uint16),
        "ids": id_blob, "id_offsets": id_offsets, "image_table": image_blob, "image_table_offsets": image_offsets,
        "task_table": task_blob, "task_table_offsets": task_offsets, "bad": bad_blob, "bad_offsets": bad_offsets,
        "num_records": np.array([num_records], dtype=np.int64),
    }


def _blob_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _write_store(folder: Path, parts: list[dict[str, np.ndarray]], key: str, source: SplitSource) -> dict:
    """Merge the parts (in rank order, i.e. record order) into the store's files under `folder`."""
    images: list[str] = []
    image_rows: dict[str, int] = {}
    tasks: list[str] = []
    task_rows: dict[str, int] = {}
    image_refs, task_refs = [], []
    for part in parts:
        local_images = _blob_strings(part["image_table"], part["image_table_offsets"])
        for image in local_images:
            if image not in image_rows:
                image_rows[image] = len(images)
                images.append(image)
        remap = np.array([image_rows[image] for image in local_images] + [-1], dtype=np.int32)
        image_refs.append(remap[part["image_ref"]])  # -1 indexes the trailing -1
        local_tasks = _blob_strings(part["task_table"], part["task_table_offsets"])
        for task in local_tasks:
            if task not in task_rows:
                task_rows[task] = len(tasks)
                tasks.append(task)
        task_remap = np.array([task_rows[task] for task in local_tasks] or [0], dtype=np.uint16)
        task_refs.append(task_remap[part["task_ref"]] if len(part["task_ref"]) else part["task_ref"])
    lengths = np.concatenate([part["lengths"] for part in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    id_offsets = [np.zeros(1, np.int64)]
    base = 0
    for part in parts:
        id_offsets.append(part["id_offsets"][1:] + base)
        base += int(part["id_offsets"][-1])
    image_blob, image_offsets = _strings(images)
    arrays = {
        "tokens": np.concatenate([part["tokens"] for part in parts]),
        "labels": np.concatenate([part["labels"] for part in parts]),
        "offsets": offsets,
        "image_pos": np.concatenate([part["image_pos"] for part in parts]),
        "image_ref": np.concatenate(image_refs).astype(np.int32),
        "task_ref": np.concatenate(task_refs).astype(np.uint16),
        "id_offsets": np.concatenate(id_offsets),
        "image_offsets": image_offsets,
    }
    files = {}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
        files[f"{name}.npy"] = (folder / f"{name}.npy").stat().st_size
    blobs = {"ids.bin": b"".join(part["ids"].tobytes() for part in parts), "images.bin": image_blob.tobytes()}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
        files[name] = len(blob)
    bad = [tuple(json.loads(item)) for part in parts for item in _blob_strings(part["bad"], part["bad_offsets"])]
    bad.sort()
    num_records = int(parts[0]["num_records"][0])  # every part holds the file's record count
    num_text_only = int((arrays["image_pos"] < 0).sum())
    report = DataReport(source.json_uri(), num_records, len(lengths), dict(Counter(reason for _, _, reason in bad)),
                        [record_id for _, record_id, _ in bad[:MAX_REPORTED_BAD_IDS]],
                        int(sum(int(part["truncated"].sum()) for part in parts)), num_text_only)
    if report.num_ok + len(bad) != num_records:
        raise RuntimeError(f"prepared {report.num_ok} + {len(bad)} bad records of {num_records}")
    meta = {"format": FORMAT, "key": key, "created": time.time(), "source": source.json_uri(),
            "root": source.root_id, "max_text_tokens": source.max_text_tokens, "image_check": source.image_check,
            "num_tokens": int(offsets[-1]), "tasks": tasks, "report": report.to_dict(), "files": files}
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta
