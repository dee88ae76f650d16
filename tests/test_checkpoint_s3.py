"""Checkpoints in a bucket (moto behind the fault proxy): exact resume from the bucket, kill -9 during
an upload, a training run through 20+ injected faults, and credentials that never leak."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosctl.checkpoint import find_latest, list_committed, verify
from cosctl.storage.s3 import S3Store

from tests.conftest_s3 import create_bucket
from tests.harness import kill_when, run, steps, train_command

pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.multiproc]


def s3_env(server, endpoint: str) -> dict[str, str]:
    """Environment for a training subprocess: credentials and endpoint from the environment only."""
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region, "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true"}


def bucket_store(bucket: str, endpoint: str) -> S3Store:
    from cosctl.spec_sections import StorageSpec

    return S3Store.from_uri(f"s3://{bucket}/run", StorageSpec(endpoint_url=endpoint, path_style=True))


@pytest.fixture
def bucket(moto_server, s3_env):
    return create_bucket(moto_server)


def test_exact_resume_from_the_bucket(tiny_data, tmp_path, moto_server, bucket):
    """2 ranks: 8 steps straight == 4 steps into the bucket + kill -9 + resume from the bucket + 4 steps."""
    env = s3_env(moto_server, moto_server.endpoint)
    full = tmp_path / "full"
    run(train_command(tiny_data, full / "work", full / "out", 8, 4), tmp_path)
    store = bucket_store(bucket, moto_server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 8, 4, "storage.path_style=true")

    def committed_step_4() -> bool:
        latest = find_latest(store)
        return latest is not None and latest.step == 4

    kill_when(cmd, tmp_path, committed_step_4, **env)
    resumed = run(cmd, tmp_path, **env)
    assert f"resuming from s3://{bucket}/run/checkpoints/step_00000004 at step 4" in resumed.stdout
    expected, got = steps(full / "work"), steps(tmp_path / "work")
    assert [got[s]["loss"] for s in range(5, 9)] == [expected[s]["loss"] for s in range(5, 9)]
    assert [got[s]["lr"] for s in range(5, 9)] == [expected[s]["lr"] for s in range(5, 9)]


def test_kill_during_an_upload_never_commits_a_partial_checkpoint(tiny_data, tmp_path, moto_server, bucket,
                                                                 fault_proxy):
    """kill -9 while step 2's shards are stuck uploading: step 1 stays the newest committed checkpoint,
    verifies, and the run resumes from it to the end."""
    env = s3_env(moto_server, fault_proxy.endpoint)
    fault_proxy.stall(30.0, method="PUT", contains="step_00000002/zero", times=4)
    store = bucket_store(bucket, moto_server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 6, 1, "storage.path_style=true")
    kill_when(cmd, tmp_path, lambda: fault_proxy.injected >= 1, **env)
    latest = find_latest(store)
    assert latest is not None and latest.step == 1
    assert verify(store, latest, tmp_path / "scratch") == []
    assert not store.list("checkpoints/step_00000002/manifest.json")
    fault_proxy.clear()
    result = run(cmd, tmp_path, **env)
    assert "at step 1" in result.stdout
    final = find_latest(store)
    assert final.step == 6 and verify(store, final, tmp_path / "scratch") == []


def test_training_finishes_through_twenty_faults(tiny_data, tmp_path, moto_server, bucket, fault_proxy, capsys):
    """503s, 500s, connection resets mid-upload, truncated downloads and stalls (≥ 20 in one run):
    training finishes, every committed checkpoint verifies, none is lost."""
    env = s3_env(moto_server, fault_proxy.endpoint)
    fault_proxy.status(503, method="PUT", times=6)
    fault_proxy.status(500, method="PUT", skip=3, times=5)
    fault_proxy.reset_mid_request(after_bytes=4096, method="PUT", contains="optim_states", times=4)
    fault_proxy.truncate_response(after_bytes=64, method="GET", contains="parts", times=4)
    fault_proxy.status(503, method="GET", times=3)
    fault_proxy.stall(1.0, method="PUT", times=2)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 6, 1, "storage.path_style=true",
                        "checkpoint.keep_last=10")
    result = run(cmd, tmp_path, **env)
    store = bucket_store(bucket, moto_server.endpoint)
    committed = list_committed(store)
    assert [c.step for c in committed] == [1, 2, 3, 4, 5, 6]
    assert all(verify(store, c, tmp_path / "scratch") == [] for c in committed)
    assert "NOT committed" not in result.stdout
    assert fault_proxy.injected >= 20
    with capsys.disabled():
        print(f"\nfault run: {fault_proxy.injected} faults injected over {fault_proxy.requests} requests, "
              f"{result.stdout.count('retrying')} checkpoint-level retries, {len(committed)} checkpoints "
              f"committed, 0 lost")


def test_credentials_never_appear_in_logs_specs_or_the_bucket(tiny_data, tmp_path, moto_server, bucket):
    """After a run into the bucket, the secret key is in no output, local file or stored object."""
    env = s3_env(moto_server, moto_server.endpoint)
    cmd = train_command(tiny_data, tmp_path / "work", f"s3://{bucket}/run", 2, 1, "storage.path_style=true")
    result = run(cmd, tmp_path, **env)
    secret = moto_server.secret_key
    assert secret not in result.stdout + result.stderr
    for path in Path(tmp_path / "work").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    store = bucket_store(bucket, moto_server.endpoint)
    for key in store.list():
        assert secret.encode() not in store.get_bytes(key), key
