"""Pytest plugin with the S3 fixtures: an in-process moto server, a clean AWS environment per test,
a fault proxy, and the single-host Ceph radosgw started through `.ci/ceph-s3.sh`.

Ceph tests skip only when Ceph is not installed and `COSCTL_REQUIRE_CEPH` is unset; CI sets
`COSCTL_REQUIRE_CEPH=1` so that a broken Ceph setup fails instead of silently skipping.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faultproxy import FaultProxy

CEPH_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "ceph-s3.sh"
CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw")
TEST_KEY_ID = "cosctl-test-key-id"
TEST_SECRET = "cosctl-test-secret-0123456789"  # moto accepts any credentials


@dataclass(frozen=True)
class S3Server:
    """An S3 endpoint and the credentials that work against it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.endpoint.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def client(self):
        """A plain boto3 client of this server: another S3 client than the product's, as a user's tools
        are (credentials passed explicitly, not through the environment)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )


def use_credentials(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    """Point boto3's default chain at `server`'s credentials and nothing else."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)
    # No ~/.aws files and no instance-metadata lookups: the environment is the only source.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", server.region)


def create_bucket(server: S3Server, name: str | None = None) -> str:
    """A fresh bucket on `server`."""
    name = name or f"cosctl-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    """An in-process moto S3 server on a free loopback port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Server(f"http://{host}:{port}", TEST_KEY_ID, TEST_SECRET)
    server.stop()


@pytest.fixture
def s3_env(moto_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Test credentials in the environment; yields the moto endpoint, which is wiped afterwards."""
    use_credentials(monkeypatch, moto_server)
    yield moto_server.endpoint
    # moto keeps every object in memory; drop them so that multi-MiB tests do not pile up.
    reset = urllib.request.Request(f"{moto_server.endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset, timeout=30).close()


@pytest.fixture
def fault_proxy(moto_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of moto."""
    proxy = FaultProxy(*moto_server.host_port)
    proxy.start()
    yield proxy
    proxy.stop()


def _ceph_dir() -> Path:
    return Path(os.environ.get("CEPH_S3_DIR") or Path(tempfile.gettempdir()) / "cosctl-ceph-s3")


def _ceph(command: str, state: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    bash = shutil.which("bash") or "/bin/bash"
    return subprocess.run(
        [bash, str(CEPH_SCRIPT), command, str(state)], capture_output=True, text=True, timeout=timeout, check=False
    )


def _parse_env(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line.removeprefix("export ").split("=", 1)
            values[name] = shlex.split(value)[0] if value else ""
    return values


@pytest.fixture(scope="session")
def ceph_s3() -> Iterator[S3Server]:
    """The single-host Ceph radosgw of `.ci/ceph-s3.sh` under $CEPH_S3_DIR; started here (and stopped
    at the end) unless it already runs."""
    missing = [name for name in CEPH_BINARIES if shutil.which(name) is None]
    if missing:
        reason = f"Ceph is not installed ({', '.join(missing)} missing); see .ci/ceph-s3.sh"
        if os.environ.get("COSCTL_REQUIRE_CEPH"):
            pytest.fail(f"COSCTL_REQUIRE_CEPH is set but {reason}")
        pytest.skip(reason)
    state = _ceph_dir()
    started_here = False
    if _ceph("status", state).returncode != 0:
        result = _ceph("init", state)  # initialises a new DIR, or only starts an existing one
        if result.returncode != 0:
            pytest.fail(f".ci/ceph-s3.sh init {state} failed:\n{result.stderr[-4000:]}")
        started_here = True
    result = _ceph("env", state, timeout=30)
    if result.returncode != 0:
        pytest.fail(f".ci/ceph-s3.sh env {state} failed:\n{result.stderr[-2000:]}")
    values = _parse_env(result.stdout)
    yield S3Server(
        values["AWS_ENDPOINT_URL_S3"],
        values["AWS_ACCESS_KEY_ID"],
        values["AWS_SECRET_ACCESS_KEY"],
        values.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    if started_here:
        _ceph("stop", state, timeout=120)
