"""Finding or building a split's token store (`cosctl.data.tokenstore` reads it; docs/design.md §5).

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
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.dist import agreed, on_main, rank_and_world
from ..common.errors import DataError, ObjectNotFound, StorageError
from ..common.log import log
from ..storage import LocalStore, ObjectStore, StoreSettings, join_uri, open_store, sha256_file
from .conversation import image_token_id
from .images import DEFAULT_CACHE_BYTES, ImageSource, default_cache_dir
from .prepare_parts import in_child, in_this_process, prepare_part, write_store
from .records import check_bad_fraction, tokenizer_fingerprint
from .tokenstore import FORMAT, META, StoreRecords, TokenStore

# Data files this large are prepared in a child process per rank (parsing a 500 MB JSON leaves ~2.5 GB
# the rank's allocator would otherwise keep); smaller ones in the rank, without a child's start-up.
CHILD_MIN_BYTES = 64 << 20


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
        """The store's name: what decides its arrays, and where its images are (`data_key` + root)."""
        inputs = {**self._content(json_sha256, tokenizer_sha256), "root": self.root_id}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()

    def data_key(self, json_sha256: str, tokenizer_sha256: str) -> str:
        """What identifies the records a run trains on, wherever they lie: the store's key without the
        image root (a checkpoint pins it, docs/design.md §5)."""
        return hashlib.sha256(
            json.dumps(self._content(json_sha256, tokenizer_sha256), sort_keys=True).encode()
        ).hexdigest()

    def _content(self, json_sha256: str, tokenizer_sha256: str) -> dict:
        return {
            "format": FORMAT,
            "json_sha256": json_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "max_text_tokens": self.max_text_tokens,
            "image_check": self.image_check,
        }

    def folder_name(self, key: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem) or "split"
        return f"{stem}-{key[:16]}"


def split_source(data, name: str, settings: StoreSettings | None) -> SplitSource:
    """The `SplitSource` of a run spec's `data` section for the file `name`."""
    return SplitSource(
        root=data.root,
        name=name,
        max_text_tokens=data.max_text_tokens,
        image_check=data.image_check,
        settings=settings,
        cache_dir=Path(data.cache_dir) if data.cache_dir else None,
        image_cache_bytes=data.image_cache_mb << 20,
        prepared=data.prepared,
    )


# --- loading a split (what a training stage calls) --------------------------------------------------


def load_split(
    source: SplitSource, tokenizer, *, num_visual_tokens: int, max_bad_fraction: float, workers: int = 0
) -> StoreRecords:
    """The split's prepared store, mapped on every rank: found by its key, or prepared now (split over
    the ranks). Collective when a process group is up. Raises a DataError, naming the file and the
    settings to change, when more than `max_bad_fraction` of the records are bad."""
    store = prepare_split(source, tokenizer, workers=workers)
    report = store.report
    log.info(f"data: {report.summary()}")
    check_bad_fraction(report, max_bad_fraction)
    return store.records(num_visual_tokens, image_token_id(tokenizer), source.images())


def prepare_split(
    source: SplitSource, tokenizer, *, workers: int = 0, child_min_bytes: int = CHILD_MIN_BYTES
) -> TokenStore:
    """Find or build the split's token store and map it on this rank (collective; see `load_split`).
    The preparation runs in a spawned process per rank when `workers` > 0 or the data file has at least
    `child_min_bytes`, else in the rank itself."""
    started = time.monotonic()
    # The preparation's own id keeps the parts of two jobs preparing the same store at once apart.
    key, data_key, json_path, attempt = on_main(lambda: (*_split_key(source, tokenizer), uuid.uuid4().hex[:8]))
    location = StoreLocation(source, key, attempt)
    found = on_main(location.published)
    if found:
        log.info(f"data: using prepared {location.uri} (key {key[:16]})")
    else:
        rank, world = rank_and_world()
        log.info(f"data: preparing {source.json_uri()} into {location.uri} (key {key[:16]}) over {world} rank(s)")
        # Parsing a large JSON leaves memory the rank's allocator would keep: a child process frees it.
        isolate = workers > 0 or on_main(lambda: json_path.stat().st_size) >= child_min_bytes
        run = in_child if isolate else in_this_process
        agreed(
            lambda: run(
                prepare_part, source, tokenizer, location, json_path if rank == 0 else None, workers, rank, world
            )
        )
        on_main(lambda: run(location.merge_parts, world))
        log.info(f"data: prepared {location.uri} in {time.monotonic() - started:.1f} s")
    agreed(lambda: location.fetch() if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None)
    store = TokenStore(location.local)
    store.reused = found
    store.uri = location.uri
    store.data_key = data_key
    return store


def prepare_spec(spec, tokenizer, *, workers: int | None = None) -> list[dict]:
    """`cosctl data prepare`: the train and eval splits of a training spec prepared (or found), with
    what each holds. Bad records are reported, not refused: the run applies data.max_bad_fraction."""
    settings = spec.storage.to_settings()
    summary = []
    for name in [spec.data.train] + ([spec.data.eval] if spec.data.eval else []):
        store = prepare_split(
            split_source(spec.data, name, settings),
            tokenizer,
            workers=spec.data.num_workers if workers is None else workers,
        )
        report = store.report
        summary.append(
            {
                "split": name,
                "store": store.uri,
                "local": str(store.folder),
                "key": store.key,
                "reused": store.reused,
                "records": report.num_records,
                "ok": report.num_ok,
                "bad": report.bad,
                "first_bad_ids": report.bad_ids,
                "truncated": report.num_truncated,
                "text_only": report.num_text_only,
                "text_tokens": store.meta["num_tokens"],
                "bad_fraction": round(report.num_bad / max(report.num_records, 1), 6),
                "within_max_bad_fraction": report.num_bad <= spec.data.max_bad_fraction * report.num_records,
            }
        )
    return summary


def _split_key(source: SplitSource, tokenizer) -> tuple[str, str, Path]:
    """(the store's key, the data key a checkpoint pins, the data file on this machine)."""
    json_path = source.local_json()
    if not json_path.is_file():
        raise DataError(f"{source.json_uri()}: data file not found (data.root={source.root})")
    json_sha256, tokenizer_sha256 = sha256_file(json_path), tokenizer_fingerprint(tokenizer)
    return source.key(json_sha256, tokenizer_sha256), source.data_key(json_sha256, tokenizer_sha256), json_path


class StoreLocation:
    """Where a store with `key` lives (`uri`, any store) and is mapped from (`local`). Pickles as its
    inputs (a preparing child process opens its own store client)."""

    def __reduce__(self):
        return StoreLocation, (self.source, self.key, self.attempt)

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
            raise DataError(
                f"cannot read prepared data under {self.source.prepared_uri} ({err}); set "
                "data.prepared to a writable folder or s3:// URI"
            ) from err
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
            raise DataError(
                f"cannot write the prepared data under {self.source.prepared_uri} ({err}); set "
                "data.prepared to a writable folder or s3:// URI"
            ) from err

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
            meta = write_store(staging, parts, self.key, self.source)
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
            raise DataError(
                f"cannot write the prepared data to {staging} ({err}); set data.prepared (and "
                "data.cache_dir) to writable folders"
            ) from err
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
