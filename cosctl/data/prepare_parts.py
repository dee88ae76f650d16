"""The work of preparing a store, done in forked processes: each rank's slice of the records validated,
tokenised and image-checked into a part (`prepare_part`; for shards, each rank's slice of the shards,
each read once: `prepare_shard_part`), and the parts merged into the store's files
(`cosctl.data.split.write_store`, where `StoreLocation` says). Nothing here uses the process group;
`cosctl.data.prepare` orchestrates the ranks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from ..common.errors import DataError
from ..storage import open_store
from .conversation import encode_records
from .records import read_records
from .shards import Shard, ShardScan, read_shard, shard_location
from .split import SplitSource, StoreLocation
from .tokenstore import pack_strings

CHUNK_RECORDS = 4096

_JOB: dict[str, Any] = {}  # what pool workers read; set before they fork


def in_child(function: Callable[..., None], *args) -> None:
    """`function(*args)` in a fresh (spawned) Python process, its error raised here: what it allocates
    goes back to the system when it exits. `function` and `args` must pickle; it must not use the
    process group.

    Spawned, not forked: a rank runs gloo/NCCL threads, and CPython 3.11 forked while one of them holds
    the interpreter's thread-state lock leaves the child blocked forever in `os.fork()` (seen here: a
    two-rank run hung in `_PyThreadState_DeleteExcept`). A spawned child has no such threads, so the
    worker pool it forks is safe."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(writer, function, args), name="cosctl-prepare")
    process.start()
    writer.close()
    try:
        ok, error = reader.recv()
    except EOFError:
        process.join()
        ok, error = (
            False,
            DataError(
                f"preparing the data failed: its process ended with exit code {process.exitcode} (out of memory?)"
            ),
        )
    process.join()
    if not ok:
        raise error


def in_this_process(function: Callable[..., None], *args) -> None:
    """`function(*args)` here: for data files small enough that the memory parsing leaves is no concern."""
    function(*args)


def _child_main(writer, function: Callable[..., None], args: tuple) -> None:
    try:
        function(*args)
        outcome: tuple[bool, BaseException | None] = (True, None)
    except BaseException as err:  # sent to the parent, which raises it
        outcome = (False, err)
    try:
        writer.send(outcome)
    except Exception:  # an error that does not pickle: its text
        writer.send((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))


def prepare_part(
    source: SplitSource, tokenizer, location: StoreLocation, json_path: Path | None, workers: int, rank: int, world: int
) -> None:
    """This rank's contiguous slice of the records: validated, tokenised, images checked -> a part."""
    records = read_records(json_path or source.local_json())
    lo, hi = len(records) * rank // world, len(records) * (rank + 1) // world
    _JOB.update(
        records=records,
        tokenizer=tokenizer,
        max_text_tokens=source.max_text_tokens,
        images=source.images(),
        decode=source.image_check == "decode",
    )
    try:
        chunks = [(start, min(start + CHUNK_RECORDS, hi)) for start in range(lo, hi, CHUNK_RECORDS)]
        with _pool(workers) as pool:
            encoded = list(pool(_encode_chunk, chunks))
            images = sorted({name for chunk in encoded for name in chunk["image_names"]})
            problems: dict[str, str | None] = {}
            if source.image_check != "none" and images:
                batches = [images[i : i + 256] for i in range(0, len(images), 256)]
                for batch, result in zip(batches, pool(_check_images, batches), strict=True):
                    problems.update(zip(batch, result, strict=True))
    finally:
        _JOB.clear()
    part = _assemble_part(encoded, problems, len(records))
    location.write_part(part, rank)


def prepare_shard_part(
    source: SplitSource, tokenizer, location: StoreLocation, shards: list[Shard], workers: int, rank: int, world: int
) -> None:
    """This rank's contiguous slice of the shards, each read once front to back (by `workers` processes,
    a shard each): its samples validated, tokenised and image-checked -> a part that also records each
    shard's sha256 and sample count."""
    lo, hi = len(shards) * rank // world, len(shards) * (rank + 1) // world
    _JOB.update(shards=shards, source=source, tokenizer=tokenizer)
    try:
        with _pool(workers) as pool:
            results = list(pool(_shard_chunk, range(lo, hi)))
    finally:
        _JOB.clear()
    problems = {ref: reason for _, found, _ in results for ref, reason in found.items()}
    part = _assemble_part([chunk for chunk, _, _ in results], problems, sum(row["num_samples"] for *_, row in results))
    part["shards"], part["shards_offsets"] = pack_strings([json.dumps(row) for *_, row in results])
    location.write_part(part, rank)


def _shard_chunk(position: int) -> tuple[dict, dict[str, str], dict]:
    """Shard `position` read once: (its encoded records as `_encode_chunk` gives them, images that do not
    decode, the shard's row in meta.json). Record indices are `position << 32` + the sample's place in
    the shard, so bad records sort in shard order."""
    shard, source = _JOB["shards"][position], _JOB["source"]
    scan = _read(shard, source)
    if scan.num_bytes != shard.size:
        raise DataError(f"{shard.uri}: {scan.num_bytes} bytes, {shard.size} when preparing began; was it rewritten?")
    chunk = _encoded(scan.records, range(len(scan.records)), _JOB["tokenizer"], source.max_text_tokens)
    places = np.array(scan.places, dtype=np.int64)
    base = position << 32
    chunk["index"] = base + places[chunk["index"]]
    chunk["bad"] = [(base + int(places[index]), record_id, reason) for index, record_id, reason in chunk["bad"]]
    chunk["bad"] += [(base + place, key, reason) for place, key, reason in scan.bad]
    row = {
        "name": shard.name,
        "uri": shard.uri,
        "size": shard.size,
        "version": shard.version,
        "sha256": scan.sha256,
        "num_samples": len(scan.records) + len(scan.bad),
    }
    return chunk, scan.problems, row


def _read(shard: Shard, source: SplitSource) -> ShardScan:
    """One pass over the shard: a local file in place, an object downloaded once into the cache (and
    deleted when read)."""
    base, key = shard_location(shard.name, source.root)
    options = {"caption_prompt": source.caption_prompt, "decode": source.image_check == "decode", "where": shard.uri}
    if not base.startswith("s3://"):
        with open(Path(base) / key, "rb") as handle:
            return read_shard(handle, shard.name, **options)
    staging = source.cache / "staging" / f"shard-{uuid.uuid4().hex[:12]}.tar"
    try:
        open_store(base, source.settings).get_file(key, staging)
        with open(staging, "rb") as handle:
            return read_shard(handle, shard.name, **options)
    finally:
        staging.unlink(missing_ok=True)


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
    return _encoded(_JOB["records"], range(*bounds), _JOB["tokenizer"], _JOB["max_text_tokens"])


def _encoded(records: list, indices: range, tokenizer, max_text_tokens: int) -> dict:
    """`records[i]` for i in `indices` validated, tokenised and truncated, as flat arrays plus lists."""
    encoded, bad = encode_records(records, indices, tokenizer, max_text_tokens)
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
    id_blob, id_offsets = pack_strings(ids)
    image_blob, image_offsets = pack_strings(table)
    bad_blob, bad_offsets = pack_strings([json.dumps(item) for item in bad])
    task_blob, task_offsets = pack_strings(task_table)

    def joined(name: str, dtype) -> np.ndarray:
        return np.concatenate([part[name] for part in keep_parts]).astype(dtype) if keep_parts else np.zeros(0, dtype)

    return {
        "tokens": np.concatenate(token_parts).astype(np.int32) if token_parts else np.zeros(0, np.int32),
        "labels": np.concatenate(label_parts).astype(np.uint8) if label_parts else np.zeros(0, np.uint8),
        "lengths": joined("lengths", np.int64),
        "image_pos": joined("image_pos", np.int32),
        "truncated": joined("truncated", bool),
        "image_ref": np.array([-1 if image is None else rows[image] for image in images], dtype=np.int32),
        "task_ref": np.array([task_rows[task] for task in tasks], dtype=np.uint16),
        "ids": id_blob,
        "id_offsets": id_offsets,
        "image_table": image_blob,
        "image_table_offsets": image_offsets,
        "task_table": task_blob,
        "task_table_offsets": task_offsets,
        "bad": bad_blob,
        "bad_offsets": bad_offsets,
        "num_records": np.array([num_records], dtype=np.int64),
    }
