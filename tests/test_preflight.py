"""Mistakes found before any rank starts: missing paths, a store without credentials or that does not
answer. Each is one line naming the culprit, in seconds (never after the model build)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from cosctl.common.errors import SpecError, StorageError
from cosctl.launch.preflight import preflight
from tests.harness import REPO, env, tiny_spec, train_command


def test_a_missing_path_is_named_by_its_key(tiny_data, tmp_path):
    """A missing data file stops the preflight with one line naming the YAML key and the path."""
    spec = tiny_spec(tiny_data, tmp_path / "out", 2, "data.train=nope.json")
    with pytest.raises(SpecError, match=f"data.train: {tiny_data / 'nope.json'} does not exist"):
        preflight(spec, str(tmp_path / "out"))


def test_an_unwritable_output_folder_is_refused(tiny_data, tmp_path):
    """An output folder that cannot be written (a file where a folder should be) fails the preflight."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not writable|write failed"):
        preflight(tiny_spec(tiny_data, tmp_path / "file" / "out", 2), str(tmp_path / "file" / "out"))


class SilentEndpoint:
    """A TCP server that accepts connections and never answers (a hung load balancer)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return


def no_aws(tmp_path, **extra) -> dict:
    keep = {k: v for k, v in env(tmp_path).items() if not k.startswith("AWS_")}
    return {
        **keep,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    }


@pytest.mark.slow
def test_a_silent_endpoint_fails_within_the_timeout_saying_so(tmp_path):
    """`cosctl ckpt ls` against an endpoint that accepts and never answers fails within --timeout-s,
    with one line saying the endpoint does not answer (not 'no checkpoint', not a 10-minute hang)."""
    silent = SilentEndpoint()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "cosctl", "ckpt", "ls", "s3://bucket/run", "--timeout-s", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=no_aws(tmp_path, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_ENDPOINT_URL_S3=silent.endpoint),
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "the endpoint does not answer" in result.stderr and "no committed" not in result.stdout + result.stderr
    assert elapsed < 8 + 15  # the timeout plus the interpreter's start
    print(f"silent endpoint: first error line after {elapsed:.1f} s (timeout 8 s)")


@pytest.mark.slow
def test_missing_credentials_stop_a_two_rank_run_before_it_starts(tiny_data, tmp_path):
    """With no S3 credentials anywhere, `cosctl pretrain --nproc 2` into a bucket fails before any rank
    starts: one line, exit 1, in seconds."""
    cmd = train_command(tiny_data, tmp_path / "work", "s3://some-bucket/run", 4, 2)
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=no_aws(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: s3://some-bucket/run: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE) in the environment"
    ]
    assert "model built" not in result.stdout
    print(f"missing credentials, --nproc 2: error after {elapsed:.1f} s")
