"""Checkpoints in a bucket, on moto and on the real Ceph radosgw: exact resume from the bucket, kill -9
during an upload, a corrupted byte, a rollback, a training run through 20+ injected faults, an endpoint
outage survived (Ceph's radosgw stopped mid-run and started again), and credentials that never leak."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from cosctl.checkpoint.layout import (
    ContentMismatch,
    commit,
    find_latest,
    list_abandoned,
    list_committed,
    read_manifest,
    upload_tree,
    verify,
)
from cosctl.spec.sections import StorageSpec
from cosctl.storage.s3 import S3Store
from tests.conftest_s3 import CEPH_SCRIPT, _ceph_dir, create_bucket
from tests.faultproxy import FaultProxy
from tests.harness import REPO, env, kill_when, run, steps, train_command

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.multiproc]


def s3_env(server, endpoint: str) -> dict[str, str]:
    """Environment for a training subprocess: credentials and endpoint from the environment only."""
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def bucket_store(bucket: str, endpoint: str) -> S3Store:
    return S3Store.from_uri(f"s3://{bucket}/run", StorageSpec(endpoint_url=endpoint, path_style=True).to_settings())


@pytest.fixture(params=["moto", "ceph"])
def server(request, monkeypatch):
    """The S3 server the test runs against: moto in this process, or the real Ceph radosgw."""
    from tests.conftest_s3 import use_credentials

    found = request.getfixturevalue("moto_server" if request.param == "moto" else "ceph_s3")
    use_credentials(monkeypatch, found)
    return found


@pytest.fixture
def bucket(server):
    return create_bucket(server)


@pytest.fixture
def proxy(server):
    """A fault proxy in front of the test's server."""
    found = FaultProxy(*server.host_port)
    found.start()
    yield found
    found.stop()


def test_exact_resume_from_the_bucket(tiny_data, tmp_path, server, bucket):
    """2 ranks: 8 steps straight == 4 steps into the bucket + kill -9 + resume from the bucket + 4 steps."""
    full = tmp_path / "full"
    run(train_command(tiny_data, full / "work", full / "out", 8, 4), tmp_path)
    store = bucket_store(bucket, server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 8, 4, "storage.path_style=true")

    def committed_step_4() -> bool:
        latest = find_latest(store)
        return latest is not None and latest.step == 4

    kill_when(cmd, tmp_path, committed_step_4, **s3_env(server, server.endpoint))
    resumed = run(cmd, tmp_path, **s3_env(server, server.endpoint))
    assert f"resuming from s3://{bucket}/run/checkpoints/step_00000004 at step 4" in resumed.stdout
    expected, got = steps(full / "work"), steps(tmp_path / "work")
    assert [got[s]["loss"] for s in range(5, 9)] == [expected[s]["loss"] for s in range(5, 9)]
    assert [got[s]["lr"] for s in range(5, 9)] == [expected[s]["lr"] for s in range(5, 9)]


def test_kill_during_an_upload_never_commits_a_partial_checkpoint(tiny_data, tmp_path, server, bucket, proxy):
    """kill -9 while step 2's shards are stuck uploading: step 1 stays the newest committed checkpoint,
    verifies, and the run resumes from it to the end."""
    env_vars = s3_env(server, proxy.endpoint)
    # Rank 0's shards: its uploader reaches step 2 only after committing step 1 (rank 1's may get there
    # first, and a kill then would find nothing committed yet).
    proxy.stall(30.0, method="PUT", contains="step_00000002/zero/zero_pp_rank_0_", times=4)
    store = bucket_store(bucket, server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 6, 1, "storage.path_style=true")
    kill_when(cmd, tmp_path, lambda: proxy.injected >= 1, **env_vars)
    latest = find_latest(store)
    assert latest is not None and latest.step == 1
    assert verify(store, latest, tmp_path / "scratch") == []
    assert not store.list("checkpoints/step_00000002/manifest.json")
    proxy.clear()
    result = run(cmd, tmp_path, **env_vars)
    assert "at step 1" in result.stdout
    final = find_latest(store)
    assert final.step == 6 and verify(store, final, tmp_path / "scratch") == []


def test_a_corrupted_byte_in_the_bucket_stops_the_resume_naming_the_file(tiny_data, tmp_path, server, bucket):
    """One flipped byte in a committed shard, rewritten by another S3 client: resuming stops with one
    line naming the file, on both ranks, without a hang."""

    env_vars = s3_env(server, server.endpoint)
    run(
        train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 2, 1, "storage.path_style=true"),
        tmp_path,
        **env_vars,
    )
    client = server.client()
    key = next(
        k["Key"]
        for k in client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/step_00000002/zero/")["Contents"]
        if "rank_1" in k["Key"] and "optim_states" in k["Key"]
    )
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    longer = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 4, 1, "storage.path_style=true")
    result = subprocess.run(
        longer, cwd=REPO, env=env(tmp_path, **env_vars), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1
    assert f"{key.rsplit('/', 1)[1]}: content does not match its manifest" in result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_commit_compares_sha256s_without_downloading_and_refuses_a_rewritten_object(tmp_path, server, bucket, proxy):
    """The commit reads each object's sha256 from what its upload recorded (HEADs only, no GET of the
    shard), and an object rewritten by another S3 client (same size, other bytes) is not committed."""
    store = bucket_store(bucket, proxy.endpoint)
    local = tmp_path / "stage"
    (local / "zero").mkdir(parents=True)
    shard = local / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(range(256)) * 64)
    files = upload_tree(store, local, "checkpoints/step_00000001", 0)
    proxy.log.clear()
    commit(store, "step_00000001", files, {"step": 1, "world_size": 1})
    reads = [seen for seen in proxy.log if seen.method == "GET" and "zero_pp_rank" in seen.target]
    assert reads == [] and read_manifest(store, "step_00000001") is not None
    upload_tree(store, local, "checkpoints/step_00000002", 0)
    server.client().put_object(
        Bucket=bucket, Key="run/checkpoints/step_00000002/zero/" + shard.name, Body=bytes(reversed(range(256))) * 64
    )
    with pytest.raises(ContentMismatch, match=f"{shard.name}: its sha256 is not the one uploaded"):
        commit(store, "step_00000002", files, {"step": 2, "world_size": 1})
    assert read_manifest(store, "step_00000002") is None
    assert store.get_bytes("checkpoints/latest") == b"step_00000001"


def test_rollback_in_the_bucket_keeps_the_abandoned_branch(tiny_data, tmp_path, server, bucket):
    """Resuming a bucket run from step 2 after it reached step 4 moves steps 3-4 aside in the bucket;
    the new line commits step 3 with `latest` on it."""
    env_vars = s3_env(server, server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 4, 1, "storage.path_style=true")
    run(cmd, tmp_path, **env_vars)
    back = train_command(tiny_data, tmp_path / "work2", f"s3://{bucket}/run", 3, 1, "storage.path_style=true")
    result = run(back + ["--resume", f"s3://{bucket}/run/checkpoints/step_00000002"], tmp_path, **env_vars)
    assert "rolled back to step 2: moved step_00000003, step_00000004 aside" in result.stdout
    store = bucket_store(bucket, server.endpoint)
    assert [c.step for c in list_committed(store)] == [1, 2, 3]
    assert [c.step for _, c in list_abandoned(store)] == [3, 4]
    assert store.get_bytes("checkpoints/latest") == b"step_00000003"


def test_training_finishes_through_twenty_faults(tiny_data, tmp_path, server, bucket, proxy, capsys):
    """503s, 500s, connection resets mid-upload, truncated downloads and stalls (>= 20 in one run):
    training finishes, every committed checkpoint verifies, none is lost."""
    env_vars = s3_env(server, proxy.endpoint)
    proxy.status(503, method="PUT", times=6)
    proxy.status(500, method="PUT", skip=3, times=5)
    proxy.reset_mid_request(after_bytes=4096, method="PUT", contains="optim_states", times=4)
    proxy.truncate_response(after_bytes=64, method="GET", contains="parts", times=4)
    proxy.status(503, method="GET", times=3)
    proxy.stall(1.0, method="PUT", times=2)
    cmd = train_command(
        tiny_data, tmp_path / "work", f"s3://{bucket}/run", 6, 1, "storage.path_style=true", "checkpoint.keep_last=10"
    )
    result = run(cmd, tmp_path, **env_vars)
    store = bucket_store(bucket, server.endpoint)
    committed = list_committed(store)
    assert [c.step for c in committed] == [1, 2, 3, 4, 5, 6]
    assert all(verify(store, c, tmp_path / "scratch") == [] for c in committed)
    assert "NOT committed" not in result.stdout + result.stderr
    assert proxy.injected >= 20
    with capsys.disabled():
        print(
            f"\nfault run ({type(server).__name__} {server.endpoint}): {proxy.injected} faults injected over "
            f"{proxy.requests} requests, {result.stderr.count('retrying in')} checkpoint-level retries, "
            f"{len(committed)} checkpoints committed, 0 lost"
        )


def ceph(command: str) -> None:
    result = subprocess.run(
        ["bash", str(CEPH_SCRIPT), command, str(_ceph_dir())], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_training_survives_the_endpoint_going_down_and_back(tiny_data, tmp_path, ceph_s3, capsys, monkeypatch):
    """radosgw stopped mid-run for about 20 s, then started again: steps keep training meanwhile,
    uploads retry in the background, every checkpoint commits afterwards and verifies; none is lost."""
    from tests.conftest_s3 import use_credentials

    use_credentials(monkeypatch, ceph_s3)
    bucket = create_bucket(ceph_s3)
    env_vars = s3_env(ceph_s3, ceph_s3.endpoint)
    store = bucket_store(bucket, ceph_s3.endpoint)
    cmd = train_command(
        tiny_data,
        tmp_path / "work",
        f"s3://{bucket}/run",
        60,
        5,
        "storage.path_style=true",
        "checkpoint.keep_last=20",
        "storage.timeout_s=10",
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(tmp_path, **env_vars), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while find_latest(store) is None:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        ceph("stop-rgw")
        down_at = time.time()
        time.sleep(20)
        ceph("start-rgw")
        up_at = time.time()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        ceph("start-rgw")
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    trained_while_down = [r["step"] for r in records if "loss" in r and down_at <= r["time"] <= up_at]
    assert trained_while_down, "no step trained during the outage"
    committed = list_committed(store)
    assert [c.step for c in committed] == list(range(5, 61, 5))
    assert all(verify(store, c, tmp_path / "scratch") == [] for c in committed)
    with capsys.disabled():
        print(
            f"\noutage: radosgw down {up_at - down_at:.0f} s, {len(trained_while_down)} steps trained meanwhile, "
            f"{stderr.count('retrying in')} upload retries, {len(committed)} checkpoints committed, 0 lost"
        )


def test_credentials_never_appear_in_logs_specs_or_the_bucket(tiny_data, tmp_path, server, bucket):
    """After a run into the bucket, the secret key is in no output, local file or stored object."""
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 2, 1, "storage.path_style=true")
    result = run(cmd, tmp_path, **s3_env(server, server.endpoint))
    secret = server.secret_key
    assert secret not in result.stdout + result.stderr
    for path in Path(tmp_path / "work").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    store = bucket_store(bucket, server.endpoint)
    for key in store.list():
        assert secret.encode() not in store.get_bytes(key), key
