"""Image-text samples kept as webdataset tar shards, as img2dataset writes them (docs/design.md §5):
`00000.tar` holding `KEY.jpg` with `KEY.txt` (its caption) and/or `KEY.json` (img2dataset's metadata,
or a LLaVA `conversations` list, which then wins over the caption).

    describe_shards  each shard's identity without reading it: size and version (S3 ETag, local mtime)
    read_shard       one pass over a shard: its samples as LLaVA-shaped records, each image named by where
                     it lies (`shard_ref`), the images checked, and the sha256 of the shard's bytes
    ShardImages      an `ImageSource` that reads one image with a ranged read of its shard (a seek on a
                     local file, a ranged GET on S3), never the whole shard, through the same cache

An image inside a shard is named `SHARD#MEMBER@OFFSET+SIZE`, e.g. `shards/00000.tar#000012.jpg@1536+48211`:
the shard as data.shards names it, the tar member and where its bytes lie. The token store keeps these
names as it keeps image file names, so the loader, batching, resume and the skip list of images that
fail treat shards and loose files alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..common.errors import DataError, ObjectNotFound, StorageError
from ..storage import ObjectStore, StoreSettings, open_store
from .images import DEFAULT_CACHE_BYTES, ImageSource, decodes

# webdataset's image extensions (its `imagehandler`), and bmp.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp"})
READ_BLOCK = 1 << 20
STAT_THREADS = 16  # concurrent HEADs when describing shards in a bucket
_REF = re.compile(r"^([^#]*)#(.*)@(\d+)\+(\d+)$")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key.extension split


@dataclass(frozen=True)
class ShardRef:
    """Where one image lies: the shard (as data.shards names it), the tar member, its bytes."""

    shard: str
    member: str
    offset: int
    size: int


def shard_ref(shard: str, member: str, offset: int, size: int) -> str:
    """The image name the token store keeps for a member of a shard."""
    return f"{shard}#{member}@{offset}+{size}"


def parse_ref(ref: str) -> ShardRef:
    match = _REF.match(ref)
    if match is None:
        raise DataError(f"{ref!r}: not an image inside a shard (SHARD#MEMBER@OFFSET+SIZE)")
    shard, member, offset, size = match.groups()
    return ShardRef(shard, member, int(offset), int(size))


def shard_location(name: str, root: str) -> tuple[str, str]:
    """(the store URI, the key in it) of the shard `name`: an s3:// URI or an absolute path as it is,
    anything else under `root` (a folder or s3:// URI)."""
    if name.startswith("s3://"):
        base, _, key = name.rpartition("/")
        return base, key
    path = name.removeprefix("file://")
    if not Path(path).is_absolute():
        if root.startswith("s3://"):
            return root.rstrip("/"), path
        path = str(Path(root.removeprefix("file://")) / path)
    resolved = Path(path).expanduser().resolve()
    return str(resolved.parent), resolved.name


def shard_uri(name: str, root: str) -> str:
    base, key = shard_location(name, root)
    return f"{base}/{key}"


# --- a shard's identity, without reading it ---------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A shard as preparation finds it: `version` changes whenever it is rewritten (the S3 ETag, a local
    file's modification time), so size and version name its content without reading it."""

    name: str
    uri: str
    size: int
    version: str


def describe_shards(names: list[str], root: str, settings: StoreSettings | None) -> list[Shard]:
    """Every shard's size and version (one HEAD per object in a bucket, a stat per local file); a
    DataError naming the first shard that does not exist."""
    locations = [shard_location(name, root) for name in names]
    stores = {base: open_store(base, settings) for base in dict.fromkeys(base for base, _ in locations)}

    def one(position: int) -> Shard:
        base, key = locations[position]
        found = stores[base].stat(key)
        if found is None:
            raise DataError(f"{base}/{key}: shard not found (data.shards)")
        return Shard(names[position], f"{base}/{key}", *found)

    remote = any(base.startswith("s3://") for base in stores)
    if not remote or len(names) < 2:
        return [one(position) for position in range(len(names))]
    with ThreadPoolExecutor(min(STAT_THREADS, len(names)), "shard-stat") as pool:
        return list(pool.map(one, range(len(names))))


def shards_fingerprint(shards: list[Shard]) -> str:
    """sha256 of where every shard is and its size and version: what names a store (a rewritten shard
    gets a new store; its content hashes then decide the data key a checkpoint pins)."""
    rows = [[shard.uri, shard.size, shard.version] for shard in shards]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --- one pass over a shard --------------------------------------------------------------------------


@dataclass
class ShardScan:
    """What one pass over a shard found: its samples as records (in tar order) and each one's place
    among the shard's samples, the samples without a usable text as (place, key, reason), images that do
    not decode (ref -> reason), and the sha256 and size of its bytes."""

    records: list[dict] = field(default_factory=list)
    places: list[int] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    num_bytes: int = 0


class _HashingReader:
    """A file read front to back, hashed on the way (tarfile's stream mode reads it through this)."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest, self.num_bytes = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
        return data


def read_shard(handle: BinaryIO, name: str, *, caption_prompt: str, decode: bool, where: str = "") -> ShardScan:
    """The samples of the uncompressed tar read from `handle`, once, front to back (members of a sample
    are consecutive, as webdataset writes them). Each image is named by `shard_ref(name, ...)`; with
    `decode`, every pixel of each image is decoded (bytes in hand, never read again). A DataError
    naming the shard (`where`) when it is not a readable tar."""
    reader = _HashingReader(handle)
    scan = ShardScan()
    key, members = None, {}
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=READ_BLOCK) as tar:
            for info in tar:
                split = _MEMBER.match(info.name) if info.isfile() else None
                if split is None:
                    continue
                if split.group(1) != key:
                    _add_sample(scan, key, members, name, caption_prompt, decode)
                    key, members = split.group(1), {}
                extension = split.group(2).lower()
                wanted = extension in IMAGE_EXTENSIONS or extension in ("txt", "json")
                if wanted and extension not in members:
                    data = tar.extractfile(info).read()
                    members[extension] = (info.name, info.offset_data, info.size, data)
        _add_sample(scan, key, members, name, caption_prompt, decode)
        while reader.read(READ_BLOCK):  # the end-of-archive blocks: the hash covers every byte
            pass
    except (tarfile.TarError, EOFError, ValueError) as err:
        raise DataError(
            f"{where or name}: not a readable uncompressed tar shard ({err}); fix or drop it from data.shards"
        ) from err
    scan.sha256, scan.num_bytes = reader.digest.hexdigest(), reader.num_bytes
    return scan


def _add_sample(scan: ShardScan, key: str | None, members: dict, shard: str, prompt: str, decode: bool) -> None:
    """The sample `key` (its members: extension -> (member name, offset, size, bytes)) as a record."""
    if key is None:
        return
    position = len(scan.records) + len(scan.bad)
    image = next((extension for extension in members if extension in IMAGE_EXTENSIONS), None)
    ref = None
    if image is not None:
        member, offset, size, data = members[image]
        ref = shard_ref(shard, member, offset, size)
        if decode and not decodes(data):
            scan.problems[ref] = "unreadable_image"
    record, reason = sample_record(key, ref, members.get("txt"), members.get("json"), prompt)
    if record is None:
        scan.bad.append((position, key, reason))
    else:
        scan.places.append(position)
        scan.records.append(record)


def sample_record(key: str, image: str | None, text: tuple | None, meta: tuple | None, prompt: str):
    """(LLaVA-shaped record, None) of a sample, or (None, reason). A .json with a `conversations` list
    is the record's conversation; otherwise the caption (.txt, else the .json's `caption`) answers
    `prompt`. Records are validated and tokenised as LLaVA JSON records are."""
    parsed = None
    if meta is not None:
        try:
            parsed = json.loads(meta[3])
        except ValueError:
            return None, "bad_json"
    if isinstance(parsed, dict) and isinstance(parsed.get("conversations"), list):
        record: dict = {"id": key, "conversations": parsed["conversations"]}
        if isinstance(parsed.get("task"), str):
            record["task"] = parsed["task"]
    else:
        try:
            caption = text[3].decode("utf-8").strip() if text is not None else ""
        except UnicodeDecodeError:
            return None, "bad_caption"
        if not caption and isinstance(parsed, dict) and isinstance(parsed.get("caption"), str):
            caption = parsed["caption"].strip()
        if not caption:
            return None, "no_caption"
        if image is None:
            return None, "missing_image"
        record = {"id": key, "task": "caption", "conversations": [_turn("human", prompt), _turn("gpt", caption)]}
    if image is not None:
        record["image"] = image
    return record, None


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


# --- reading one image ------------------------------------------------------------------------------


class ShardImages(ImageSource):
    """The images of a split kept in shards, each read by itself: bytes [offset, offset + size) of its
    shard, with a seek (local) or a ranged GET (S3); images from S3 go through the bounded cache, and
    the decode checks and messages are `ImageSource`'s. `remote`: some shard is in a bucket (images of a
    micro-batch are then fetched concurrently)."""

    def __init__(
        self,
        root: str | Path,
        settings: StoreSettings | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        *,
        remote: bool = False,
    ):
        super().__init__(root, settings, cache_dir, cache_bytes)
        self.remote = self.remote or remote
        self._stores: dict[str, ObjectStore] = {}
        self._stores_pid = -1

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_stores": {}, "_stores_pid": -1}

    def _location(self, image: str) -> tuple[ShardRef, str, str]:
        ref = parse_ref(image)
        return (ref, *shard_location(ref.shard, self.root))

    def where(self, image: str) -> str:
        ref, base, key = self._location(image)
        return f"{base}/{key}[{ref.member}]"

    def is_remote(self, image: str) -> bool:
        return self._location(image)[1].startswith("s3://")

    def _shard_store(self, base: str) -> ObjectStore:
        with self._lock:
            if self._stores_pid != os.getpid():  # a forked worker opens its own clients
                self._stores, self._stores_pid = {}, os.getpid()
            if base not in self._stores:
                self._stores[base] = open_store(base, self.settings)
            return self._stores[base]

    def _fetch(self, image: str) -> bytes:
        ref, base, key = self._location(image)
        data = self._shard_store(base).get_bytes(key, ref.offset, ref.offset + ref.size)
        if len(data) != ref.size:
            raise ObjectNotFound(
                f"{self.where(image)}: the shard ends {ref.size - len(data)} bytes early (rewritten since "
                "it was prepared?)"
            )
        return data

    def _read_local(self, image: str) -> bytes:
        try:
            return self._fetch(image)
        except ObjectNotFound:
            raise
        except OSError as err:
            raise StorageError(f"{self.where(image)}: cannot read: {err}") from err

    def exists(self, image: str) -> bool:
        ref, base, key = self._location(image)
        found = self._shard_store(base).stat(key)
        return found is not None and found[0] >= ref.offset + ref.size
