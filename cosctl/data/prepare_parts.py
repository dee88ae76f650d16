"""The work of preparing a store, done in forked processes: each rank's slice of the records validated,
tokenised and image-checked into a part (`prepare_part`), and the parts merged into the store's files
(`write_store`). Nothing here uses the process group; `cosctl.data.prepare` orchestrates the ranks.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..common.errors import DataError
from .conversation import encode_records
from .records import MAX_REPORTED_BAD_IDS, DataReport, read_records
from .tokenstore import FORMAT, META

if TYPE_CHECKING:
    from .prepare import SplitSource, StoreLocation

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


def _blob_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = blob.tobytes()
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def write_store(folder: Path, parts: list[dict[str, np.ndarray]], key: str, source: SplitSource) -> dict:
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
    report = DataReport(
        source.json_uri(),
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
        "source": source.json_uri(),
        "root": source.root_id,
        "max_text_tokens": source.max_text_tokens,
        "image_check": source.image_check,
        "num_tokens": int(offsets[-1]),
        "tasks": tasks,
        "report": report.to_dict(),
        "files": files,
    }
    (folder / META).write_text(json.dumps(meta, indent=1))
    return meta
