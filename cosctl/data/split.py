"""One split of a run's data, as preparation sees it: where its records and images come from
(`SplitSource`: a LLaVA JSON file and an image root, or webdataset tar shards) and what names its token
store (the key: the JSON's content, the tokenizer, the data settings and the image root; the data key a
checkpoint pins is the same without the root). Shards are named by where they are and their size and
version (`cosctl.data.shards`); the data key of a shard split is then fixed by the content hashes that
preparing it records (`SplitSource.pinned_key`).
`StoreLocation` says where the store lives and is mapped from, and publishes it (`write_store` merges the
ranks' parts into its files); `cosctl.data.prepare` finds or builds it, `cosctl.data.prepare_parts` does
the work per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..common.errors import DataError, ObjectNotFound, StorageError
from ..spec.data import DEFAULT_CAPTION_PROMPT
from ..storage import LocalStore, ObjectStore, StoreSettings, join_uri, open_store, sha256_file
from .images import DEFAULT_CACHE_BYTES, ImageSource, default_cache_dir
from .records import MAX_REPORTED_BAD_IDS, DataReport, tokenizer_fingerprint
from .shards import Shard, ShardImages, describe_shards, shard_location, shard_uri, shards_fingerprint
from .tokenstore import FORMAT, META, TokenStore, pack_strings, unpack_strings


@dataclass(frozen=True)
class SplitSource:
    """Everything that goes into preparing one split; `key()` names its store."""

    root: str  # data.root: a folder or s3:// URI
    name: str  # the JSON file, relative to root (unused when `shards` are given)
    max_text_tokens: int
    image_check: str  # decode | exists | none
    settings: StoreSettings | None = None
    cache_dir: Path | None = None
    image_cache_bytes: int = DEFAULT_CACHE_BYTES
    prepared: str | None = None  # where stores go; default <root>/prepared
    shards: tuple[str, ...] = ()  # data.format webdataset: the tar shards, patterns expanded
    caption_prompt: str = DEFAULT_CAPTION_PROMPT  # the human turn a .txt caption answers

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
        if self.shards:
            remote = any(shard_location(name, self.root)[0].startswith("s3://") for name in self.shards)
            return ShardImages(self.root, self.settings, self.cache / "data", self.image_cache_bytes, remote=remote)
        return ImageSource(self.root, self.settings, self.cache / "data", self.image_cache_bytes)

    def describe(self) -> str:
        """What the split reads, for messages and reports: the JSON file's URI, or the shards."""
        if not self.shards:
            return self.json_uri()
        first = shard_uri(self.shards[0], self.root)
        if len(self.shards) == 1:
            return first
        return f"{first} .. {Path(shard_uri(self.shards[-1], self.root)).name} ({len(self.shards)} shards)"

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
        image root (a checkpoint pins it, docs/design.md §5). For shards, whose identity here (`json_sha256`
        is `shards_fingerprint`) names where they are, not what they hold, the settings only: the
        shards' content hashes are added once preparation has read them (`pinned_key`)."""
        content = self._content(json_sha256, tokenizer_sha256)
        if self.shards:
            del content["shards"]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def pinned_key(self, data_key: str, meta: dict) -> str:
        """The data key a checkpoint pins for the store `meta` describes: `data_key` for a JSON split;
        for shards, `data_key` with the sha256 of every shard's bytes, in order, as preparation read
        them (the same shards elsewhere pin the same key; a shard rewritten with other bytes another)."""
        if not self.shards:
            return data_key
        hashes = [shard["sha256"] for shard in meta["shards"]]
        return hashlib.sha256(json.dumps([data_key, hashes]).encode()).hexdigest()

    def _content(self, json_sha256: str, tokenizer_sha256: str) -> dict:
        if self.shards:
            return {
                "format": FORMAT,
                "source": "webdataset",
                "shards": json_sha256,
                "caption_prompt": self.caption_prompt,
                "tokenizer_sha256": tokenizer_sha256,
                "max_text_tokens": self.max_text_tokens,
                "image_check": self.image_check,
            }
        return {
            "format": FORMAT,
            "json_sha256": json_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "max_text_tokens": self.max_text_tokens,
            "image_check": self.image_check,
        }

    def folder_name(self, key: str) -> str:
        stem = "shards" if self.shards else re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.name).stem) or "split"
        return f"{stem}-{key[:16]}"


def split_source(data, name: str, settings: StoreSettings | None) -> SplitSource:
    """The `SplitSource` of a run spec's `data` section for the file `name`; the training split
    (`data.train`) of `data.format: webdataset` is its shards (the eval split stays LLaVA JSON)."""
    webdataset = getattr(data, "format", "llava") == "webdataset" and name == data.train
    return SplitSource(
        root=data.root,
        name=name,
        max_text_tokens=data.max_text_tokens,
        image_check=data.image_check,
        settings=settings,
        cache_dir=Path(data.cache_dir) if data.cache_dir else None,
        image_cache_bytes=data.image_cache_mb << 20,
        prepared=data.prepared,
        shards=tuple(data.shard_names()) if webdataset else (),
        caption_prompt=data.caption_prompt if webdataset else DEFAULT_CAPTION_PROMPT,
    )


def split_key(source: SplitSource, tokenizer) -> tuple[str, str, Path | list[Shard]]:
    """(the store's key, the data key a checkpoint pins, what preparation reads: the data file on this
    machine, or every shard with its size and version). A shard split's pinned key follows from its
    store (`SplitSource.pinned_key`)."""
    if source.shards:
        shards = describe_shards(list(source.shards), source.root, source.settings)
        fingerprint, tokenizer_sha256 = shards_fingerprint(shards), tokenizer_fingerprint(tokenizer)
        return source.key(fingerprint, tokenizer_sha256), source.data_key(fingerprint, tokenizer_sha256), shards
    json_path = source.local_json()
    if not json_path.is_file():
        raise DataError(f"{source.json_uri()}: data file not found (data.root={source.root})")
    json_sha256, tokenizer_sha256 = sha256_file(json_path), tokenizer_fingerprint(tokenizer)
    return source.key(json_sha256, tokenizer_sha256), source.data_key(json_sha256, tokenizer_sha256), json_path


def write_store(folder: Path, parts: list[dict[str, np.ndarray]], key: str, source: SplitSource) -> dict:
    """Merge the parts (in rank order, i.e. record order) into the store's files under `folder`."""
    images: list[str] = []
    image_rows: dict[str, int] = {}
    tasks: list[str] = []
    task_rows: dict[str, int] = {}
    image_refs, task_refs = [], []
    for part in parts:
        local_images = unpack_strings(part["image_table"], part["image_table_offsets"])
        for image in local_images:
            if image not in image_rows:
                image_rows[image] = len(images)
                images.append(image)
        remap = np.array([image_rows[image] for image in local_images] + [-1], dtype=np.int32)
        image_refs.append(remap[part["image_ref"]])  # -1 indexes the trailing -1
        local_tasks = unpack_strings(part["task_table"], part["task_table_offsets"])
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
    image_blob, image_offsets = pack_strings(images)
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
    bad = [tuple(json.loads(item)) for part in parts for item in unpack_strings(part["bad"], part["bad_offsets"])]
    bad.sort()
    if source.shards:  # a part holds its own shards' samples, in rank (= shard) order
        shards = [json.loads(row) for part in parts for row in unpack_strings(part["shards"], part["shards_offsets"])]
        if [shard["name"] for shard in shards] != list(source.shards):
            raise RuntimeError(f"prepared {len(shards)} shards of {len(source.shards)}")
        num_records = sum(int(part["num_records"][0]) for part in parts)
    else:
        num_records = int(parts[0]["num_records"][0])  # every part holds the file's record count
    num_text_only = int((arrays["image_pos"] < 0).sum())
    report = DataReport(
        source.describe(),
        num_records,
        len(lengths),
        dict(Counter(reason for _, _, reason in bad)),
        [record_id for _, record_id, _ in bad[:MAX_REPORTED_BAD_IDS]],
        int(sum(int(part["truncated"].sum()) for part in parts)),
        num_text_only,
    )
    if report.num_ok + len(bad) != num_records:
        raise RuntimeError(f"prepared {report.num_ok} + {len(bad)} bad records of {num_records}")
    meta = {
        "format": FORMAT,
        "key": key,
        "created": time.time(),
        "source": source.describe(),
        "root": source.root_id,
        "max_text_tokens": source.max_text_tokens,
        "image_check": source.image_check,
        "num_tokens": int(offsets[-1]),
        "tasks": tasks,
        "report": report.to_dict(),
        "files": files,
    }
    if source.shards:
        meta.update(caption_prompt=source.caption_prompt, shards=shards)
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta


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
