"""The `s3://` backend of `ObjectStore`: boto3 against AWS S3, Ceph radosgw, MinIO or moto.

What this module owns beyond plain boto3 calls:
* **Verified uploads.** After every upload, HEAD must show the local size and the ETag computed locally
  (MD5 for a single PUT; MD5 of the part MD5s plus `-N` for a multipart upload with the same part
  size). Ceph and moto ignore or do not validate flexible-checksum headers, but both derive ETags from
  the bytes they stored, so this checks content everywhere. Our sha256 rides along as
  `x-amz-meta-sha256`. A mismatch is uploaded once more, then raised.
* **Resumable downloads.** botocore retries failed requests but not a body cut off mid-stream; each
  stream here continues from the byte it reached (`Range: bytes=<offset>-`, or up to the end of its
  chunk) pinned by `If-Match: <etag>`, with bounded attempts and backoff. Large objects are fetched
  as parallel chunk-sized ranged GETs into a temp file, which is renamed into place when complete.
* **Errors.** botocore/s3transfer failures become the project's storage errors (`s3_errors`), always
  naming the object URI.

Credentials come only from boto3's default chain (environment, AWS profile, instance role), never from
a spec, and never appear in a message or log line written here.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import ChunksizeAdjuster

from .base import (
    BucketNotFound,
    ObjectNotFound,
    StorageError,
    StoreSettings,
    TransientStorageError,
    check_key,
    sha256_file,
)
from .s3_errors import MISSING_CODES, STREAM_ERRORS, storage_error

log = logging.getLogger(__name__)

MiB = 1 << 20
READ_BLOCK = 1 * MiB  # body read size: small enough that a cut-off loses little, large enough to be cheap
DELETE_BATCH = 1000  # S3's per-request limit; Ceph enforces it, moto does not
Sink = Callable[[int, bytes], None]


class S3Store:
    """Objects under `s3://BUCKET/PREFIX`; keys are relative to the prefix.

    `timeout_s` bounds a request that gets no answer: each of its `max_attempts` attempts waits at most
    `connect_timeout` to connect and `read_timeout` for the server, so a silent endpoint fails within
    it (as `StoreUnavailable`). The timeouts and attempt counts are attributes so that tests can
    shorten them; they take effect when the client is first built, i.e. on the first request.
    """

    max_resumes: int = 10  # cut-off bodies tolerated per download stream before giving up
    resume_backoff_s: float = 0.2  # first wait before resuming a cut-off body; doubles, at most 5 s

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        max_concurrency: int = 8,
        chunk_bytes: int = 16 * MiB,
        timeout_s: float = 120.0,
    ):
        if not bucket or "/" in bucket:
            raise StorageError(f"s3://{bucket}: invalid bucket name")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url  # None: boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
        self.region = region
        self.path_style = path_style
        self.max_concurrency = max_concurrency
        self.chunk_bytes = chunk_bytes
        # Attempts x (connect + read) + botocore's worst-case backoff between them stays under timeout_s.
        self.max_attempts = max(2, min(5, int(timeout_s // 20)))  # botocore's, the first one included
        worst_backoff = sum(min(20.0, 2.0**n) for n in range(1, self.max_attempts))
        self.connect_timeout = min(5.0, timeout_s / 8)
        self.read_timeout = max(0.5, (timeout_s - worst_backoff) / self.max_attempts - self.connect_timeout)
        self._lock = threading.Lock()
        self._s3: Any = None
        self._bucket_exists = False

    @classmethod
    def from_uri(cls, uri: str, settings: StoreSettings | None = None) -> S3Store:
        """`s3://bucket/prefix` with the endpoint, region, addressing and part size of `settings`."""
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri}: not an s3:// URI")
        settings = settings or StoreSettings()
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(
            bucket,
            prefix,
            endpoint_url=settings.endpoint_url,
            region=settings.region,
            path_style=settings.path_style,
            max_concurrency=settings.max_concurrency,
            chunk_bytes=settings.multipart_chunk_mb * MiB,
            timeout_s=settings.timeout_s,
        )

    # --- client and errors -------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                self._s3 = self._make_client()
            return self._s3

    def _make_client(self) -> Any:
        session = boto3.session.Session()
        if session.get_credentials() is None:
            raise StorageError(
                f"{self.uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
            )
        config = Config(
            region_name=self.region or session.region_name or "us-east-1",
            signature_version="s3v4",
            # Over plain http botocore would SHA-256 every body byte for the signature (~20% of upload
            # throughput on 2 cores); the bytes are checked after upload through the ETag instead.
            s3={"addressing_style": "path" if self.path_style else "auto", "payload_signing_enabled": False},
            # standard, not adaptive: adaptive's client-side rate limiter slows every later request
            # after a throttling burst, which only hurts a single checkpoint writer.
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=max(10, 2 * self.max_concurrency),
            # Content is verified through ETags; CRC32 headers cost CPU and Ceph ignores them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # An explicit endpoint_url beats AWS_ENDPOINT_URL(_S3); None lets boto3 read those itself.
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _where(self, key: str | None) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def _error(self, err: Exception, key: str | None, action: str) -> StorageError:
        return storage_error(err, self._where(key), self.bucket, action, self.max_attempts)

    def _call(self, op: str, key: str | None, **kwargs: Any) -> dict:
        try:
            return getattr(self._client(), op)(Bucket=self.bucket, **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, key, op) from err

    def _check_bucket(self) -> None:
        """Raise BucketNotFound when the bucket does not exist (checked once per store)."""
        if self._bucket_exists:
            return
        try:
            self._client().head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in MISSING_CODES | {"NoSuchBucket"}:
                raise BucketNotFound(f"{self.uri}: bucket {self.bucket!r} does not exist at this endpoint") from err
            raise self._error(err, None, "head_bucket") from err
        except BotoCoreError as err:
            raise self._error(err, None, "head_bucket") from err
        self._bucket_exists = True

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _head(self, key: str) -> dict | None:
        try:
            return self._client().head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in MISSING_CODES:
                self._check_bucket()  # a HEAD's 404 has no body: it cannot say which of the two is missing
                return None
            raise self._error(err, key, "head_object") from err
        except BotoCoreError as err:
            raise self._error(err, key, "head_object") from err

    # --- uploads -----------------------------------------------------------------------------------

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer will use for an object of `size` bytes; None for a single PUT."""
        if size < self.chunk_bytes:
            return None
        return ChunksizeAdjuster().adjust_chunksize(self.chunk_bytes, size)

    def put_file(self, local_path: Path, key: str) -> None:
        path, full = Path(local_path), self._full(key)
        try:
            size = path.stat().st_size
            sha = sha256_file(path)  # travels as metadata, so it is needed before the upload starts
        except OSError as err:
            raise StorageError(f"{self._where(key)}: cannot read {path}: {err}") from err
        # The expected ETag is needed only afterwards: hash the parts while they upload (hashlib
        # releases the GIL), which hides most of a second pass over the file.
        with cf.ThreadPoolExecutor(1, "s3-etag") as pool:
            etag = pool.submit(file_etag, path, self.part_size(size))
            try:
                self._put_verified(key, size, etag.result, sha, lambda: self._upload_file(path, key, full, sha))
            except OSError as err:  # only the local file's reads are left unmapped here
                raise StorageError(f"{self._where(key)}: cannot read {path}: {err}") from err

    def put_bytes(self, data: bytes, key: str) -> None:
        full = self._full(key)
        md5 = hashlib.md5(data, usedforsecurity=False)
        sha = hashlib.sha256(data).hexdigest()
        # Content-MD5 lets servers that check it (AWS, Ceph) refuse damaged bytes instead of storing them.
        content_md5 = base64.b64encode(md5.digest()).decode()
        self._put_verified(
            key,
            len(data),
            md5.hexdigest,
            sha,
            lambda: self._call(
                "put_object", key, Key=full, Body=data, ContentMD5=content_md5, Metadata={"sha256": sha}
            ),
        )

    def _upload_file(self, local_path: Path, key: str, full: str, sha: str) -> None:
        config = TransferConfig(
            multipart_threshold=self.chunk_bytes,
            multipart_chunksize=self.chunk_bytes,
            max_concurrency=self.max_concurrency,
            # the classic manager's part size is the one part_size() predicts
            preferred_transfer_client="classic",
        )
        try:
            with create_transfer_manager(self._client(), config) as manager:
                manager.upload(str(local_path), self.bucket, full, extra_args={"Metadata": {"sha256": sha}}).result()
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, key, "upload") from err
        except OSError as err:
            raise StorageError(f"{self._where(key)}: cannot read {local_path}: {err}") from err

    def _put_verified(self, key: str, size: int, etag: Callable[[], str], sha: str, upload: Callable[[], Any]) -> None:
        """Upload, then check what the server stored against the local size, ETag and sha256; one more
        upload on a mismatch, then raise."""
        problem = ""
        for attempt in (1, 2):
            upload()
            problem = self._mismatch(key, size, etag(), sha)
            if not problem:
                log.debug("%s: stored and verified (%d bytes, ETag %s)", self._where(key), size, etag())
                return
            log.warning(
                "%s: stored object differs from the local data (%s)%s",
                self._where(key),
                problem,
                "; uploading again" if attempt == 1 else "",
            )
        raise StorageError(f"{self._where(key)}: upload not verified after 2 attempts: {problem}")

    def _mismatch(self, key: str, size: int, etag: str, sha: str) -> str:
        """What differs between the stored object and the local data; empty when nothing does."""
        head = self._head(key)
        if head is None:
            return "object missing after upload"
        if head["ContentLength"] != size:
            return f"size {head['ContentLength']} != local {size}"
        if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
            # NOTE: under SSE-KMS / SSE-C the ETag is not an MD5 of the content; only size is checkable.
            return ""
        stored = head.get("ETag", "").strip('"')
        if stored != etag:
            return f"ETag {stored} != local {etag}"
        if head.get("Metadata", {}).get("sha256") != sha:
            return "sha256 metadata missing or different"
        return ""

    # --- downloads ---------------------------------------------------------------------------------

    def get_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        start = start or 0
        if end is not None and end <= start:
            return b""
        buffer = bytearray()
        try:
            self._stream(key, start, end, lambda _offset, data: buffer.extend(data))
        except _RangeNotSatisfiable:  # start is at or past the end, as LocalStore reads b"" there
            return b""
        return bytes(buffer)

    def get_file(self, key: str, local_path: Path) -> None:
        local_path = Path(local_path)
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        size, etag = head["ContentLength"], head["ETag"]
        try:
            local_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
        except OSError as err:
            raise StorageError(f"{self._where(key)}: cannot write {local_path}: {err}") from err
        try:
            self._fetch_ranges(key, size, etag, lambda offset, data: _pwrite_all(fd, data, offset))
            os.close(fd)
            fd = -1
            os.replace(tmp, local_path)
        except OSError as err:
            raise StorageError(f"{self._where(key)}: cannot write {local_path}: {err}") from err
        finally:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _fetch_ranges(self, key: str, size: int, etag: str, sink: Sink) -> None:
        """Fetch [0, size) as chunk-sized ranges, up to max_concurrency at a time."""
        ranges = [(lo, min(lo + self.chunk_bytes, size)) for lo in range(0, size, self.chunk_bytes)]
        if len(ranges) <= 1:
            for lo, hi in ranges:
                self._stream(key, lo, hi, sink, etag)
            return
        with cf.ThreadPoolExecutor(min(self.max_concurrency, len(ranges)), "s3-get") as pool:
            futures = [pool.submit(self._stream, key, lo, hi, sink, etag) for lo, hi in ranges]
            try:
                for future in cf.as_completed(futures):
                    future.result()
            except BaseException:
                for future in futures:  # a failed download should not keep fetching the rest
                    future.cancel()
                raise

    def _stream(self, key: str, start: int, end: int | None, sink: Sink, etag: str | None = None) -> None:
        """Feed bytes [start, end) of an object (end None: to its end) to `sink(offset, data)`; a body
        that is cut off continues from where it stopped, pinned by If-Match to the same object."""
        offset, failures, stop = start, 0, end
        while stop is None or offset < stop:
            # The Range asks for the caller's `end` (open-ended when None); `stop` is where bytes end.
            response = self._get_object(key, offset, end, etag)
            etag = etag or response["ETag"]
            stop = _stream_end(response, offset, end)
            before = offset
            try:
                for data in response["Body"].iter_chunks(READ_BLOCK):
                    sink(offset, data)
                    offset += len(data)
                if offset >= stop:
                    break
                problem = f"body ended early at byte {offset}"
            except STREAM_ERRORS as err:
                problem = f"{type(err).__name__} at byte {offset}"
            finally:
                response["Body"].close()
            failures += 1
            if failures > self.max_resumes:
                raise TransientStorageError(
                    f"{self._where(key)}: download cut off {failures} times; giving up ({problem})"
                )
            log.info("%s: download cut off (%s, %d new bytes); resuming", self._where(key), problem, offset - before)
            self._wait_before_resume(failures)

    def _wait_before_resume(self, failures: int) -> None:
        time.sleep(min(5.0, self.resume_backoff_s * 2 ** (failures - 1)))

    def _get_object(self, key: str, offset: int, end: int | None, etag: str | None) -> dict:
        args: dict[str, Any] = {"Key": self._full(key)}
        if offset or end is not None:
            args["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        if etag:
            args["IfMatch"] = etag
        try:
            return self._client().get_object(Bucket=self.bucket, **args)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code"))
            if code == "InvalidRange":
                raise _RangeNotSatisfiable() from err
            if code == "PreconditionFailed":
                raise StorageError(
                    f"{self._where(key)}: object changed while it was being downloaded (ETag is no longer {etag})"
                ) from err
            raise self._error(err, key, "get_object") from err
        except BotoCoreError as err:
            raise self._error(err, key, "get_object") from err

    # --- listing and deleting ----------------------------------------------------------------------

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def stat(self, key: str) -> tuple[int, str] | None:
        """(size, ETag) of the object from one HEAD (the ETag changes when it is rewritten); None when
        it is missing."""
        head = self._head(key)
        return None if head is None else (int(head["ContentLength"]), str(head["ETag"]).strip('"'))

    def sha256(self, key: str) -> str | None:
        """The sha256 this store's uploads record with the object (`x-amz-meta-sha256`), read with a
        HEAD; None when the object has none (another client rewrote it) or is missing."""
        head = self._head(key)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (a plain string prefix, relative to the store root), sorted."""
        if prefix.strip("/"):
            check_key(prefix.strip("/"))
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                keys.extend(item["Key"][len(root) :] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, prefix or None, "list") from err
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error (as in LocalStore)."""
        self._call("delete_object", key, Key=self._full(key))

    def move(self, key: str, new_key: str) -> None:
        """Server-side copy to `new_key` (multipart for large objects), then delete `key`."""
        source = {"Bucket": self.bucket, "Key": self._full(key)}
        config = TransferConfig(
            multipart_threshold=self.chunk_bytes,
            multipart_chunksize=self.chunk_bytes,
            max_concurrency=self.max_concurrency,
        )
        try:
            self._client().copy(source, self.bucket, self._full(new_key), Config=config)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, key, f"copy to {new_key}") from err
        self.delete(key)

    def delete_many(self, keys: Iterable[str]) -> None:
        """Delete objects in batches of at most 1000 keys per request."""
        full = [self._full(key) for key in keys]
        for lo in range(0, len(full), DELETE_BATCH):
            batch = [{"Key": key} for key in full[lo : lo + DELETE_BATCH]]
            response = self._call("delete_objects", None, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{self.uri}: {len(errors)} objects not deleted, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message') or ''}"
                )


class _RangeNotSatisfiable(Exception):
    """A ranged GET starting at or past the end of the object (HTTP 416)."""


def file_etag(path: Path, part_size: int | None) -> str:
    """The ETag S3 reports for `path` uploaded in one PUT (`part_size` None: MD5 of the content) or in
    parts of `part_size` bytes (MD5 of the concatenated part MD5s, then `-<number of parts>`).

    Parts are hashed in 8 MiB blocks, so a 5 GiB part size costs no memory."""
    parts: list[Any] = []
    limit = part_size or float("inf")
    with open(path, "rb") as handle:
        while True:
            part, filled = hashlib.md5(usedforsecurity=False), 0
            while filled < limit and (block := handle.read(int(min(8 * MiB, limit - filled)))):
                part.update(block)
                filled += len(block)
            if filled or not parts:  # an empty file is one empty part
                parts.append(part)
            if filled < limit:  # end of file
                break
    if part_size is None:
        return parts[0].hexdigest()
    joined = hashlib.md5(b"".join(part.digest() for part in parts), usedforsecurity=False)
    return f"{joined.hexdigest()}-{len(parts)}"


def _stream_end(response: dict, offset: int, end: int | None) -> int:
    """Where a stream stops: `end`, clamped to the object's size, which a ranged response carries in
    Content-Range (`bytes 0-99/1000`). Without the clamp a range past the end would be resumed forever."""
    total = offset + int(response["ContentLength"])
    content_range = response.get("ContentRange") or ""
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        total = int(content_range.rsplit("/", 1)[1])
    return total if end is None else min(end, total)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
