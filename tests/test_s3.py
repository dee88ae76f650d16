"""S3Store against moto, directly and through the fault proxy (fixtures in tests/conftest_s3.py)."""

from __future__ import annotations

import hashlib
import logging
import random
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cosctl.spec.sections import StorageSpec
from cosctl.storage import LocalStore, StorageError, TransientStorageError, open_store, sha256_file
from cosctl.storage.s3 import MiB, S3Store, file_etag
from tests.conftest_s3 import TEST_SECRET, S3Server, create_bucket
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3

CHUNK = 5 * MiB


def make_store(endpoint: str, bucket: str, prefix: str = "run") -> S3Store:
    return S3Store(bucket, prefix, endpoint_url=endpoint, path_style=True, max_concurrency=4, chunk_bytes=CHUNK)


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture
def bucket(s3_env: str, moto_server: S3Server) -> str:
    return create_bucket(moto_server)


@pytest.fixture
def store(s3_env: str, bucket: str) -> S3Store:
    return make_store(s3_env, bucket)


@pytest.fixture
def proxied(fault_proxy: FaultProxy, bucket: str) -> S3Store:
    """A store whose every request goes through the fault proxy."""
    return make_store(fault_proxy.endpoint, bucket)


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, CHUNK - 1, 13 * MiB + 7])
def test_put_get_file_round_trip(store: S3Store, moto_server: S3Server, tmp_path: Path, size: int):
    """Files below and above the multipart threshold come back byte-identical, with our sha256 stored."""
    source = write_random(tmp_path / "source.bin", size, seed=size)
    store.put_file(source, "ckpt/shard.bin")
    store.get_file("ckpt/shard.bin", tmp_path / "out" / "copy.bin")
    assert sha256_file(tmp_path / "out" / "copy.bin") == sha256_file(source)
    head = moto_server.client().head_object(Bucket=store.bucket, Key="run/ckpt/shard.bin")
    assert head["Metadata"]["sha256"] == sha256_file(source)
    assert head["ContentLength"] == size
    etag = head["ETag"].strip('"')
    assert etag == file_etag(source, store.part_size(size))
    assert etag.endswith("-3") == (size > CHUNK)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["copy.bin"]  # no temp file left behind


def test_local_etag_matches_multipart_rule(tmp_path: Path):
    """The locally computed ETag is the MD5 of the part MD5s plus the part count."""
    source = write_random(tmp_path / "f.bin", 2 * CHUNK + 3)
    data = source.read_bytes()
    parts = [hashlib.md5(data[i : i + CHUNK]).digest() for i in range(0, len(data), CHUNK)]
    expected = hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    assert file_etag(source, CHUNK) == expected
    assert file_etag(source, None) == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("start,end", [(None, None), (0, 5), (3, None), (2, 9), (7, 100), (11, None), (50, 60), (4, 4)])
def test_get_bytes_ranges_match_local_store(store: S3Store, tmp_path: Path, start, end):
    """Ranged get_bytes (end exclusive, clamped at the object's end) reads what LocalStore reads."""
    local = LocalStore(tmp_path)
    for target in (store, local):
        target.put_bytes(b"hello world", "meta/manifest.json")
    assert store.get_bytes("meta/manifest.json", start, end) == local.get_bytes("meta/manifest.json", start, end)


def test_get_bytes_of_multipart_object_range(store: S3Store, tmp_path: Path):
    """A range spanning a part boundary of a multipart object is returned exactly."""
    source = write_random(tmp_path / "f.bin", 12 * MiB, seed=3)
    store.put_file(source, "big.bin")
    data = source.read_bytes()
    assert store.get_bytes("big.bin", CHUNK - 10, CHUNK + 10) == data[CHUNK - 10 : CHUNK + 10]
    assert store.get_bytes("big.bin") == data


# --- listing, deleting, sizes, errors ------------------------------------------------------------------


def test_list_pages_past_1000_keys_and_delete_many_batches(store: S3Store, moto_server: S3Server):
    """list() returns all 1100 keys (several pages); delete_many sends batches of at most 1000."""
    client = moto_server.client()
    keys = [f"ckpt/step_{i:05d}/part" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=store.bucket, Key=f"run/{key}", Body=b"x"), keys))
    client.put_object(Bucket=store.bucket, Key="other-run/ckpt/x", Body=b"x")  # outside the prefix
    assert store.list() == keys
    assert store.list("ckpt/step_0100") == [f"ckpt/step_0100{i}/part" for i in range(10)]
    batches: list[int] = []
    store._client().meta.events.register(
        "before-parameter-build.s3.DeleteObjects", lambda params, **_: batches.append(len(params["Delete"]["Objects"]))
    )
    store.delete_many(keys)
    assert batches == [1000, 100]
    assert store.list() == []


def test_delete_and_size(store: S3Store):
    """size() is the byte count, None once deleted; deleting a missing key is not an error."""
    store.put_bytes(b"12345", "a/b")
    assert store.size("a/b") == 5
    store.delete("a/b")
    assert store.size("a/b") is None
    store.delete("a/b")
    assert store.list() == []


def test_missing_object_error_names_key(store: S3Store, tmp_path: Path):
    """Reading a missing object raises StorageError '<uri>/<key>: no such object'."""
    expected = f"s3://{store.bucket}/run/ckpt/missing.bin: no such object"
    with pytest.raises(StorageError) as excinfo:
        store.get_file("ckpt/missing.bin", tmp_path / "x")
    assert str(excinfo.value) == expected
    with pytest.raises(StorageError) as excinfo:
        store.get_bytes("ckpt/missing.bin")
    assert str(excinfo.value) == expected
    assert not (tmp_path / "x").exists()


def test_unsafe_keys_rejected(store: S3Store):
    """Keys that could escape the prefix are refused before any request."""
    for key in ("../other/x", "/abs", "a//b", ""):
        with pytest.raises(StorageError, match="unsafe object key"):
            store.put_bytes(b"x", key)


def test_missing_bucket_is_a_storage_error(s3_env: str):
    """A bucket that does not exist is named in a (non-transient) StorageError."""
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as excinfo:
        make_store(s3_env, "no-such-bucket").put_bytes(b"x", "k")
    assert not isinstance(excinfo.value, TransientStorageError)


# --- configuration -------------------------------------------------------------------------------------


def test_from_uri_prefix_and_open_store(s3_env: str, bucket: str, moto_server: S3Server):
    """open_store maps s3://bucket/prefix/ to an S3Store whose keys land under the prefix."""
    spec = StorageSpec(endpoint_url=s3_env, path_style=True, max_concurrency=3, multipart_chunk_mb=5)
    store = open_store(f"s3://{bucket}/runs/exp1/", spec.to_settings())
    assert isinstance(store, S3Store)
    assert (store.uri, store.chunk_bytes, store.max_concurrency) == (f"s3://{bucket}/runs/exp1", CHUNK, 3)
    store.put_bytes(b"{}", "latest")
    listed = moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["runs/exp1/latest"]


def test_endpoint_from_environment(bucket: str, fault_proxy: FaultProxy, s3_env: str, monkeypatch: pytest.MonkeyPatch):
    """Without a spec endpoint AWS_ENDPOINT_URL_S3 is used; an explicit spec endpoint wins over it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    from_env = S3Store.from_uri(f"s3://{bucket}/env", StorageSpec(path_style=True).to_settings())
    from_env.put_bytes(b"via env", "k")
    assert from_env.get_bytes("k") == b"via env"
    seen = fault_proxy.requests
    assert seen >= 2
    explicit = S3Store.from_uri(f"s3://{bucket}/env", StorageSpec(endpoint_url=s3_env, path_style=True).to_settings())
    assert explicit.get_bytes("k") == b"via env"
    assert fault_proxy.requests == seen


def test_path_style_addressing(proxied: S3Store, fault_proxy: FaultProxy):
    """path_style puts the bucket in the request path, not the host name."""
    proxied.put_bytes(b"x", "k")
    proxied.get_bytes("k")
    assert fault_proxy.log and all(s.target.startswith(f"/{proxied.bucket}/") for s in fault_proxy.log)
    assert all(s.headers["host"].startswith("127.0.0.1:") for s in fault_proxy.log)


def test_missing_credentials_message(bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch):
    """Without credentials the error says how to provide them."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no S3 credentials found; set AWS_ACCESS_KEY_ID"):
        make_store(s3_env, bucket).size("k")


def test_credentials_never_in_errors_or_logs(
    store: S3Store,
    proxied: S3Store,
    fault_proxy: FaultProxy,
    s3_env: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """The secret key appears in no exception text (chained ones included) and no DEBUG log line."""
    caplog.set_level(logging.DEBUG)
    proxied.max_attempts = 2
    fault_proxy.status(503, method="GET", times=10)
    failures = []
    for action in (
        lambda: store.get_file("missing", tmp_path / "x"),
        lambda: make_store(s3_env, "no-such-bucket").put_bytes(b"x", "k"),
        lambda: proxied.get_bytes("k"),
    ):
        with pytest.raises(StorageError) as excinfo:
            action()
        failures.append("".join(traceback.format_exception(excinfo.value)))
    assert "SlowDown" in failures[2] and "Sending http request" in caplog.text
    assert all(TEST_SECRET not in text for text in failures)
    assert TEST_SECRET not in caplog.text


# --- upload verification ---------------------------------------------------------------------------------


def corrupt_after_upload(store: S3Store, server: S3Server, monkeypatch: pytest.MonkeyPatch, times: int) -> list:
    """Make the next `times` uploads store different bytes of the same size (a silent server-side
    corruption); returns the list of upload calls."""
    original, calls = store._upload_file, []

    def upload(local_path: Path, key: str, full: str, sha: str) -> None:
        original(local_path, key, full, sha)
        calls.append(key)
        if len(calls) <= times:
            damaged = bytearray(local_path.read_bytes())
            damaged[len(damaged) // 2] ^= 0xFF
            server.client().put_object(Bucket=store.bucket, Key=full, Body=bytes(damaged), Metadata={"sha256": sha})

    monkeypatch.setattr(store, "_upload_file", upload)
    return calls


@pytest.mark.parametrize("size", [4096, 11 * MiB])
def test_corrupt_stored_object_is_uploaded_again(
    store: S3Store, moto_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
):
    """An ETag that differs from the local one triggers exactly one more upload, which fixes it."""
    source = write_random(tmp_path / "f.bin", size, seed=5)
    calls = corrupt_after_upload(store, moto_server, monkeypatch, times=1)
    store.put_file(source, "shard.bin")
    assert calls == ["shard.bin", "shard.bin"]
    assert hashlib.sha256(store.get_bytes("shard.bin")).hexdigest() == sha256_file(source)


def test_persistent_corruption_raises_naming_key(
    store: S3Store, moto_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """When the stored object still differs after the second upload, put_file raises and names the key."""
    source = write_random(tmp_path / "f.bin", 11 * MiB, seed=6)
    calls = corrupt_after_upload(store, moto_server, monkeypatch, times=2)
    with pytest.raises(StorageError, match=rf"s3://{store.bucket}/run/shard.bin: upload not verified .*ETag"):
        store.put_file(source, "shard.bin")
    assert len(calls) == 2


# --- faults through the proxy ----------------------------------------------------------------------------


def round_trip(store: S3Store, source: Path, key: str, tmp_path: Path) -> str:
    store.put_file(source, key)
    target = tmp_path / "download" / key
    store.get_file(key, target)
    return sha256_file(target)


def test_503_and_500_bursts_are_retried(proxied: S3Store, fault_proxy: FaultProxy, tmp_path: Path):
    """Bursts of 503 SlowDown on parts and 500 on complete/HEAD/GET still end in a verified round trip."""
    source = write_random(tmp_path / "f.bin", 13 * MiB, seed=7)
    fault_proxy.status(503, method="PUT", contains="partNumber=2", times=3)
    fault_proxy.status(500, method="POST", contains="uploadId=", times=2)
    fault_proxy.status(503, method="HEAD", times=2)
    fault_proxy.status(500, method="GET", times=2)
    assert round_trip(proxied, source, "shard.bin", tmp_path) == sha256_file(source)
    assert fault_proxy.injected == 9 and fault_proxy.pending() == 0


def test_503_forever_becomes_transient_error(proxied: S3Store, fault_proxy: FaultProxy):
    """A server that keeps answering 503 ends, after the configured attempts, in TransientStorageError."""
    proxied.max_attempts = 3
    fault_proxy.status(503, method="PUT", times=100)
    with pytest.raises(TransientStorageError, match=rf"s3://{proxied.bucket}/run/k: put_object failed: SlowDown"):
        proxied.put_bytes(b"x", "k")
    assert fault_proxy.injected == 3


def test_connection_reset_mid_part(proxied: S3Store, fault_proxy: FaultProxy, tmp_path: Path):
    """TCP resets in the middle of upload parts are retried and the stored object verifies."""
    source = write_random(tmp_path / "f.bin", 16 * MiB, seed=8)
    fault_proxy.reset_mid_request(after_bytes=2 * MiB, method="PUT", contains="partNumber=", times=3)
    assert round_trip(proxied, source, "shard.bin", tmp_path) == sha256_file(source)
    assert fault_proxy.injected == 3


def test_truncated_downloads_resume_with_range_and_if_match(proxied: S3Store, fault_proxy: FaultProxy, tmp_path: Path):
    """Bodies cut off mid-stream resume from the byte reached, pinned to the ETag, and hash correctly."""
    source = write_random(tmp_path / "f.bin", 12 * MiB + 5, seed=9)
    proxied.put_file(source, "shard.bin")
    fault_proxy.truncate_response(MiB + 17, method="GET", times=3)
    proxied.get_file("shard.bin", tmp_path / "copy.bin")
    assert sha256_file(tmp_path / "copy.bin") == sha256_file(source)
    etag = file_etag(source, CHUNK)
    gets = [s for s in fault_proxy.log if s.method == "GET"]
    assert {s.headers["if-match"].strip('"') for s in gets} == {etag}
    chunk_ends = [(0, CHUNK - 1), (CHUNK, 2 * CHUNK - 1), (2 * CHUNK, 12 * MiB + 4)]
    assert sorted(s.headers["range"] for s in gets if s.action == "pass") == sorted(
        f"bytes={lo + MiB + 17}-{hi}" for lo, hi in chunk_ends
    )

    fault_proxy.log.clear()
    fault_proxy.truncate_response(1000, method="GET", times=1)
    assert proxied.get_bytes("shard.bin", 3) == source.read_bytes()[3:]
    cut, resumed = fault_proxy.log
    assert "range" in cut.headers and "if-match" not in cut.headers
    assert resumed.headers["range"] == "bytes=1003-"  # open-ended, from the byte reached
    assert resumed.headers["if-match"].strip('"') == file_etag(source, CHUNK)


def test_download_gives_up_after_too_many_cuts(proxied: S3Store, fault_proxy: FaultProxy):
    """A body cut off more often than max_resumes raises TransientStorageError naming the object."""
    proxied.put_bytes(b"x" * 100_000, "k")
    proxied.max_resumes, proxied.resume_backoff_s = 2, 0.01
    fault_proxy.truncate_response(10, method="GET", times=100)
    with pytest.raises(TransientStorageError, match=rf"s3://{proxied.bucket}/run/k: download cut off 3 times"):
        proxied.get_bytes("k")
    assert fault_proxy.injected == 3


def test_object_replaced_during_download_is_detected(
    proxied: S3Store, fault_proxy: FaultProxy, moto_server: S3Server, monkeypatch: pytest.MonkeyPatch
):
    """If the object changes between a cut-off and the resume, If-Match fails and nothing is mixed."""
    proxied.put_bytes(b"a" * 100_000, "k")
    fault_proxy.truncate_response(10, method="GET", times=1)
    replace = lambda _failures: moto_server.client().put_object(Bucket=proxied.bucket, Key="run/k", Body=b"b" * 100_000)
    monkeypatch.setattr(proxied, "_wait_before_resume", replace)
    with pytest.raises(StorageError, match="object changed while it was being downloaded"):
        proxied.get_bytes("k")


def test_stall_shorter_than_read_timeout(proxied: S3Store, fault_proxy: FaultProxy):
    """A response delayed less than the read timeout is simply waited for (one GET, no retry)."""
    proxied.read_timeout = 5
    proxied.put_bytes(b"slow", "k")
    fault_proxy.stall(1.0, method="GET")
    assert proxied.get_bytes("k") == b"slow"
    assert [s.action for s in fault_proxy.log if s.method == "GET"] == ["stall"]


def test_stall_longer_than_read_timeout_is_retried(proxied: S3Store, fault_proxy: FaultProxy):
    """A response delayed past the read timeout is abandoned and the request sent again."""
    proxied.read_timeout = 1
    proxied.put_bytes(b"slow", "k")
    fault_proxy.stall(2.5, method="GET")
    assert proxied.get_bytes("k") == b"slow"
    assert [s.action for s in fault_proxy.log if s.method == "GET"] == ["stall", "pass"]


def test_twenty_faults_across_a_checkpoint_sequence(proxied: S3Store, fault_proxy: FaultProxy, tmp_path: Path):
    """22 mixed faults over uploads and downloads of several files: all complete with correct hashes."""
    proxied.resume_backoff_s = 0.05
    # Part faults are pinned to part numbers (at most 3 per part, fewer than botocore's 5 attempts):
    # parts upload concurrently, so unpinned faults could all land on one part and exhaust its retries.
    for part in (1, 2):
        fault_proxy.status(503, method="PUT", contains=f"partNumber={part}", times=2)
    for part in (1, 2, 3):
        fault_proxy.reset_mid_request(after_bytes=MiB, method="PUT", contains=f"partNumber={part}", times=1)
    fault_proxy.status(503, method="POST", contains="?uploads", times=1)
    fault_proxy.status(500, method="POST", contains="uploadId=", times=2)
    fault_proxy.status(503, method="HEAD", times=2, skip=1)
    fault_proxy.reset_mid_request(after_bytes=5, method="PUT", contains="manifest", times=1)
    fault_proxy.truncate_response(512 * 1024, method="GET", times=3)
    fault_proxy.truncate_response(100_000, reset=True, method="GET", times=2)
    fault_proxy.status(500, method="GET", times=2)
    fault_proxy.stall(0.3, method="GET", times=2)
    sources = {
        f"step_{i}/shard.bin": write_random(tmp_path / f"s{i}.bin", size, seed=i)
        for i, size in enumerate([12 * MiB, 7 * MiB, 300_000, 11 * MiB])
    }
    for key, source in sources.items():
        proxied.put_file(source, key)
    proxied.put_bytes(b'{"step": 3}', "step_3/manifest.json")
    for key, source in sources.items():
        proxied.get_file(key, tmp_path / "restore" / key)
        assert sha256_file(tmp_path / "restore" / key) == sha256_file(source)
    assert proxied.get_bytes("step_3/manifest.json") == b'{"step": 3}'
    assert fault_proxy.injected >= 20 and fault_proxy.pending() == 0


def test_a_missing_bucket_is_not_a_missing_object(moto_server, s3_env):
    """A HEAD on a key of a bucket that does not exist says the bucket is missing, not the object."""
    from cosctl.common.errors import BucketNotFound

    store = S3Store("no-such-bucket-here", "run", endpoint_url=moto_server.endpoint, path_style=True)
    with pytest.raises(BucketNotFound, match="bucket 'no-such-bucket-here' does not exist"):
        store.size("checkpoints/latest")
