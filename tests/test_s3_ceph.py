"""S3Store against a real single-host Ceph radosgw (started by the `ceph_s3` fixture through
.ci/ceph-s3.sh): real SigV4 checks, real multipart ETags and the 1000-key DeleteObjects limit."""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from cosctl.spec.sections import StorageSpec
from cosctl.storage import StorageError, TransientStorageError, sha256_file
from cosctl.storage.s3 import MiB, S3Store, file_etag
from tests.conftest_s3 import S3Server, create_bucket, use_credentials
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.s3, pytest.mark.slow]


@pytest.fixture
def ceph_bucket(ceph_s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket with the Ceph credentials in the environment; emptied and removed afterwards so
    that repeated runs do not fill the OSD."""
    use_credentials(monkeypatch, ceph_s3)
    name = create_bucket(ceph_s3)
    yield name
    client = ceph_s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=name)


def ceph_store(ceph_s3: S3Server, bucket: str, endpoint: str | None = None) -> S3Store:
    spec = StorageSpec(
        endpoint_url=endpoint or ceph_s3.endpoint, path_style=True, max_concurrency=4, multipart_chunk_mb=16
    )
    return S3Store.from_uri(f"s3://{bucket}/run", spec.to_settings())


def write_random(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def test_multipart_round_trip_64mib(ceph_s3: S3Server, ceph_bucket: str, tmp_path: Path):
    """A 64 MiB file goes up in four 16 MiB parts, verifies against Ceph's ETag and comes back intact."""
    source = write_random(tmp_path / "shard.bin", 64 * MiB, seed=1)
    store = ceph_store(ceph_s3, ceph_bucket)
    store.put_file(source, "ckpt/shard.bin")
    head = ceph_s3.client().head_object(Bucket=ceph_bucket, Key="run/ckpt/shard.bin")
    assert head["ETag"].strip('"') == file_etag(source, 16 * MiB)
    assert head["ETag"].strip('"').endswith("-4")
    assert head["Metadata"]["sha256"] == sha256_file(source)
    store.get_file("ckpt/shard.bin", tmp_path / "copy.bin")
    assert sha256_file(tmp_path / "copy.bin") == sha256_file(source)
    assert (
        store.get_bytes("ckpt/shard.bin", 16 * MiB - 3, 16 * MiB + 3)
        == source.read_bytes()[16 * MiB - 3 : 16 * MiB + 3]
    )


def test_wrong_secret_is_rejected_without_leaking(
    ceph_s3: S3Server, ceph_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Ceph checks SigV4: a wrong secret gives a non-transient StorageError that names neither secret."""
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-ceph-secret-4711"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = ceph_store(ceph_s3, ceph_bucket)
    with pytest.raises(StorageError) as excinfo:
        store.put_bytes(b"x", "k")
    text = "".join(traceback.format_exception(excinfo.value))
    assert "SignatureDoesNotMatch" in str(excinfo.value)
    assert str(excinfo.value).startswith(f"s3://{ceph_bucket}/run/k: put_object failed")
    assert not isinstance(excinfo.value, TransientStorageError)
    for secret in (wrong, ceph_s3.secret_key):
        assert secret not in text and secret not in caplog.text


def test_list_and_delete_many_past_the_1000_key_limit(ceph_s3: S3Server, ceph_bucket: str):
    """Ceph refuses >1000 keys per DeleteObjects; delete_many batches 1100 keys and list pages them."""
    client = ceph_s3.client()
    keys = [f"ckpt/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=ceph_bucket, Key=f"run/{key}", Body=b"x"), keys))
    with pytest.raises(ClientError):  # the limit is real here, so batching is what makes delete_many work
        client.delete_objects(Bucket=ceph_bucket, Delete={"Objects": [{"Key": f"run/{k}"} for k in keys]})
    store = ceph_store(ceph_s3, ceph_bucket)
    assert store.list() == keys
    assert store.list("ckpt/0109") == [f"ckpt/0109{i}" for i in range(10)]
    store.delete_many(keys)
    assert store.list() == []
    store.put_bytes(b"12", "one")
    store.delete("one")
    assert store.size("one") is None


def test_truncated_download_resumes_against_ceph(ceph_s3: S3Server, ceph_bucket: str, tmp_path: Path):
    """Downloads cut off by the fault proxy resume with Range + If-Match on Ceph and hash correctly."""
    source = write_random(tmp_path / "shard.bin", 40 * MiB, seed=2)
    proxy = FaultProxy(*ceph_s3.host_port)
    proxy.start()
    try:
        store = ceph_store(ceph_s3, ceph_bucket, endpoint=proxy.endpoint)
        store.put_file(source, "shard.bin")
        proxy.truncate_response(3 * MiB, method="GET", times=2)
        proxy.truncate_response(MiB, reset=True, method="GET", times=2)
        store.get_file("shard.bin", tmp_path / "copy.bin")
        proxy.truncate_response(1000, method="GET", times=1)
        tail = store.get_bytes("shard.bin", 40 * MiB - 5000)
    finally:
        proxy.stop()
    assert sha256_file(tmp_path / "copy.bin") == sha256_file(source)
    assert tail == source.read_bytes()[-5000:]
    assert proxy.injected == 5
    resumed = [s for s in proxy.log if s.method == "GET" and s.action == "pass" and "if-match" in s.headers]
    assert f"bytes={40 * MiB - 4000}-" in [s.headers.get("range") for s in resumed]
