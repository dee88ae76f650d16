"""Upload/download throughput of `S3Store` on loopback: moto in-process, and Ceph radosgw when reachable.

Times the full `put_file` (local sha256 + ETag pass, transfer, HEAD verification) and `get_file`
(HEAD, parallel ranged GETs into a temp file, rename), i.e. what a checkpoint save or restore pays.
Prints one table row per server × part size × concurrency, with the median of `--rounds` runs.

    python bench/s3_throughput.py                          # moto, plus Ceph if $CEPH_S3_DIR runs
    python bench/s3_throughput.py --size-mib 1024 --parts 8,16,64 --concurrency 4,8
    python bench/s3_throughput.py --ceph-dir /tmp/cosctl-ceph-s3   # state dir of .ci/ceph-s3.sh

Ceph credentials come from `.ci/ceph-s3.sh env DIR` (a throwaway test user), or with `--ceph-endpoint`
from the AWS_* variables already in the environment. Numbers on a 2-core VM are client-CPU bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import common
from botocore.config import Config

from cosctl.storage.s3 import MiB, S3Store

CEPH_SCRIPT = common.REPO / ".ci" / "ceph-s3.sh"


@dataclass
class Server:
    name: str
    endpoint: str
    env: dict[str, str]  # credentials and region, applied to os.environ while this server is measured


def moto_server() -> tuple[Server, object]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    return Server("moto 5.2.5 (in-process)", f"http://{host}:{port}", env), server


def ceph_server(args: argparse.Namespace) -> Server | None:
    """The Ceph radosgw to measure, or None when none is configured and reachable."""
    if args.ceph_endpoint:
        env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in os.environ}
        server = Server("ceph radosgw", args.ceph_endpoint, env | {"AWS_DEFAULT_REGION": "us-east-1"})
    else:
        state = args.ceph_dir or os.environ.get("CEPH_S3_DIR") or f"{tempfile.gettempdir()}/cosctl-ceph-s3"
        result = subprocess.run(["bash", str(CEPH_SCRIPT), "env", state], capture_output=True, text=True)
        if result.returncode != 0:
            return None
        values = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
        values = {k: shlex.split(v)[0] for k, v in values.items()}
        endpoint = values.pop("AWS_ENDPOINT_URL_S3")
        server = Server("ceph radosgw 16.2.15", endpoint, values)
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        print(f"# {server.endpoint} is not reachable; skipping Ceph", file=sys.stderr)
        return None
    return server


def make_bucket(server: Server) -> tuple[object, str]:
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=server.env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def drop_bucket(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


def measure(server: Server, source: Path, part_mib: int, concurrency: int, rounds: int) -> tuple[float, float]:
    """Median upload and download MB/s over `rounds` round trips."""
    os.environ.update(server.env)
    client, bucket = make_bucket(server)
    store = S3Store(
        bucket,
        "bench",
        endpoint_url=server.endpoint,
        path_style=True,
        max_concurrency=concurrency,
        chunk_bytes=part_mib * MiB,
    )
    size = source.stat().st_size
    ups, downs = [], []
    try:
        store.put_bytes(b"warm-up", "warm")  # client construction is not part of a transfer
        for i in range(rounds):
            start = time.perf_counter()
            store.put_file(source, f"obj{i}")
            ups.append(size / 1e6 / (time.perf_counter() - start))
            target = source.with_name(f"download{i}")
            start = time.perf_counter()
            store.get_file(f"obj{i}", target)
            downs.append(size / 1e6 / (time.perf_counter() - start))
            target.unlink()
            store.delete(f"obj{i}")  # moto keeps everything in memory
    finally:
        drop_bucket(client, bucket)
    return statistics.median(ups), statistics.median(downs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--parts", default="8,16", help="part sizes in MiB, comma-separated")
    parser.add_argument("--concurrency", default="4,8", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceph-dir", help="state dir of .ci/ceph-s3.sh (default $CEPH_S3_DIR)")
    parser.add_argument("--ceph-endpoint", help="a running Ceph/MinIO endpoint; credentials from AWS_*")
    parser.add_argument("--no-moto", action="store_true")
    args = parser.parse_args()
    parts = [int(p) for p in args.parts.split(",")]
    threads = [int(c) for c in args.concurrency.split(",")]

    servers: list[Server] = []
    moto = None
    if not args.no_moto:
        server, moto = moto_server()
        servers.append(server)
    if (ceph := ceph_server(args)) is not None:
        servers.append(ceph)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source.bin"
        with open(source, "wb") as handle:
            for _ in range(args.size_mib):
                handle.write(os.urandom(MiB))
        print(
            "\n".join(common.table_head(["server", "size", "upload MB/s", "download MB/s", "part size", "concurrency"]))
        )
        for server in servers:
            for part_mib in parts:
                for concurrency in threads:
                    up, down = measure(server, source, part_mib, concurrency, args.rounds)
                    row = [
                        server.name,
                        f"{args.size_mib} MiB",
                        f"{up:.0f}",
                        f"{down:.0f}",
                        f"{part_mib} MiB",
                        concurrency,
                    ]
                    print(common.table_row(row), flush=True)
    if moto is not None:
        moto.stop()


if __name__ == "__main__":
    main()
