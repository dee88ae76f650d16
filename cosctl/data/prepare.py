"""Finding or building a split's token store (`cosctl.data.tokenstore` reads it; docs/design.md §5).

The key is a sha256 of what decides the arrays: the data file's content (sha256 of the JSON, not its
size or mtime), the tokenizer (`data.tokenizer_fingerprint`), the image root, `data.max_text_tokens`,
`data.image_check` and the format version; for webdataset shards, every shard's location, size and
version instead of the JSON's content (reading 65M images' shards to hash them at every start would
cost more than the run's start-up), plus `data.caption_prompt`. A requeued or restarted run with the
same inputs finds the store and maps it; anything else prepares a new one next to it.

Preparing is split over the ranks (each validates, tokenises and checks the images of a contiguous
slice of the records, or for webdataset shards of a contiguous slice of the shards, each read once, with
`data.num_workers` processes) and merged by rank 0. `<prepared>` defaults
to `<data.root>/prepared` and may be an `s3://` URI; a remote store is copied into the local cache
before it is read. Host memory per rank for the data is a few arrays of one number per record (the
lengths, offsets and image positions, mapped); tokens and strings are read with pread, through the page
cache that the ranks share, when a micro-batch is built, so they never stay in a rank's resident set.
"""

from __future__ import annotations

import os
import time
import uuid

from ..common.dist import agreed, on_main, rank_and_world
from ..common.log import log
from .conversation import image_token_id
from .prepare_parts import in_child, in_this_process, prepare_part, prepare_shard_part
from .records import check_bad_fraction
from .split import SplitSource, StoreLocation, split_key, split_source
from .tokenstore import StoreRecords, TokenStore

# Data files this large are prepared in a child process per rank (parsing a 500 MB JSON leaves ~2.5 GB
# the rank's allocator would otherwise keep); smaller ones in the rank, without a child's start-up.
CHILD_MIN_BYTES = 64 << 20


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
    key, data_key, inputs, attempt = on_main(lambda: (*split_key(source, tokenizer), uuid.uuid4().hex[:8]))
    location = StoreLocation(source, key, attempt)
    found = on_main(location.published)
    if found:
        log.info(f"data: using prepared {location.uri} (key {key[:16]})")
    else:
        rank, world = rank_and_world()
        log.info(f"data: preparing {source.describe()} into {location.uri} (key {key[:16]}) over {world} rank(s)")
        if source.shards:  # `inputs`: every shard with its size
            size = sum(shard.size for shard in inputs)
            work = (prepare_shard_part, source, tokenizer, location, inputs, workers, rank, world)
        else:  # `inputs`: the data file on rank 0
            size = on_main(lambda: inputs.stat().st_size)
            work = (prepare_part, source, tokenizer, location, inputs if rank == 0 else None, workers, rank, world)
        # Parsing a large JSON leaves memory the rank's allocator would keep: a child process frees it.
        run = in_child if workers > 0 or size >= child_min_bytes else in_this_process
        agreed(lambda: run(*work))
        on_main(lambda: run(location.merge_parts, world))
        log.info(f"data: prepared {location.uri} in {time.monotonic() - started:.1f} s")
    agreed(lambda: location.fetch() if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None)
    store = TokenStore(location.local)
    store.reused = found
    store.uri = location.uri
    store.data_key = source.pinned_key(data_key, store.meta)
    return store


def prepare_spec(spec, tokenizer, *, workers: int | None = None) -> list[dict]:
    """`cosctl data prepare`: the train and eval splits of a training spec prepared (or found), with
    what each holds. Bad records are reported, not refused: the run applies data.max_bad_fraction."""
    settings = spec.storage.to_settings()
    summary = []
    for name in [spec.data.train] + ([spec.data.eval] if spec.data.eval else []):
        source = split_source(spec.data, name, settings)
        store = prepare_split(source, tokenizer, workers=spec.data.num_workers if workers is None else workers)
        report = store.report
        summary.append(
            {
                "split": source.describe() if source.shards else name,
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
