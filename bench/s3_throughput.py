"""Upload/download throughput of `S3Store` on loopback: moto in-process, and Ceph radosgw when reachable.

Times the full `put_file` (local sha256 + ETag pass, transfer, HEAD verification) and `get_file`
(HEAD, parallel ranged GETs into a temp file, rename), i.e. what a checkpoint save or restore pays.
Prints one table row per server × part size × concurrency, with the median of `--rounds` runs.

    python bench/s3_throughput.py                          # moto, plus Ceph if $CEPH_S3_DIR runs
    python bench/s3_throughput.py --size-mib 1024 --parts 8,16,64 --concurrency 4,8
    python bench/s3_throughput.py --ceph-dir /tmp/cosctl-ceph-s3   # state dir of .ci/ceph-s3.sh

With `--images N`, training images instead: N JPEGs (256 px, ~23 KB, as img2dataset stores them) with
captions, in one bucket both as loose objects named by a LLaVA JSON and as webdataset tar shards of
`--per-shard` samples. For each layout it times what one rank does: preparing the split (`load_split`:
each image decode-checked, from one GET per image, or one GET per shard) and reading every image as
the loader does (`ImageSource.load_many` per micro-batch of `--batch`, concurrent GETs, the cache off):
bytes only, then bytes + decode to `--image-size` px. moto runs in its own process here (in this one
it would share the client's GIL).

    python bench/s3_throughput.py --images 2000 --per-shard 500 --ceph-dir /work/wt/ci-state/ceph

Ceph credentials come from `.ci/ceph-s3.sh env DIR` (a throwaway test user), or with `--ceph-endpoint`
from the AWS_* variables already in the environment. Numbers on a 2-core VM are client-CPU bound.
"""

from __future__ import annotations

import argparse
import json
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


# --- training images: loose objects against shards -----------------------------------------------------


def moto_process() -> tuple[Server, subprocess.Popen]:
    """moto's server in a process of its own, as a real endpoint is."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("moto did not start") from None
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    return Server("moto 5.2.5 (own process)", f"http://127.0.0.1:{port}", env), process


def write_image_set(folder: Path, num_images: int, per_shard: int) -> None:
    """`num_images` JPEGs with captions: loose (`loose/KEY.jpg` + `loose.json`) and as webdataset shards
    (`shards/%05d.tar`), the same bytes; plus a tokenizer trained on the captions."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from cosctl.data.synth import train_tokenizer

    rng = np.random.default_rng(0)
    (folder / "loose").mkdir(parents=True)
    (folder / "shards").mkdir()
    records, captions = [], []
    with wds.ShardWriter(str(folder / "shards" / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(num_images):
            colours = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(colours).resize((256, 256), Image.Resampling.BICUBIC))
            pixels = (smooth + rng.normal(0, 10, smooth.shape)).clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
            key, caption = f"{index:09d}", f"a picture of colour field number {index} with some noise"
            (folder / "loose" / f"{key}.jpg").write_bytes(buffer.getvalue())
            sink.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": {"key": key}})
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."}]
            records.append(
                {"id": key, "image": f"loose/{key}.jpg", "conversations": [*turns, {"from": "gpt", "value": caption}]}
            )
            captions.append(caption)
    (folder / "loose.json").write_text(json.dumps(records))
    train_tokenizer(captions, folder / "tokenizer")


def upload_image_set(client, bucket: str, folder: Path) -> list[str]:
    """The set's files in `bucket` under `data/` (loose JPEGs with a few threads); the shard names."""
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and "tokenizer" not in p.parts]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: client.upload_file(str(p), bucket, f"data/{p.relative_to(folder).as_posix()}"), files))
    return [f"shards/{p.name}" for p in sorted((folder / "shards").glob("*.tar"))]


def measure_images(server: Server, folder: Path, args: argparse.Namespace) -> list[list]:
    """One row per layout: what one rank's preparation (once) and reading (median of `--rounds`,
    the layouts taking turns) achieve, in images/s."""
    from cosctl.data.prepare import load_split
    from cosctl.data.records import load_tokenizer
    from cosctl.data.split import SplitSource
    from cosctl.storage import StoreSettings

    os.environ.update(server.env)
    client, bucket = make_bucket(server)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as cache:
            shards = upload_image_set(client, bucket, folder)
            tokenizer = load_tokenizer(folder / "tokenizer")
            settings = StoreSettings(endpoint_url=server.endpoint, region="us-east-1", path_style=True)
            options = {"max_text_tokens": 64, "image_check": "decode", "settings": settings, "image_cache_bytes": 0}
            layouts = {
                "loose objects": SplitSource(f"s3://{bucket}/data", "loose.json", cache_dir=Path(cache), **options),
                f"shards of {args.per_shard}": SplitSource(
                    f"s3://{bucket}/data", "train.json", cache_dir=Path(cache), shards=tuple(shards), **options
                ),
            }
            prepared, reads, sizes = {}, {layout: ([], []) for layout in layouts}, {}
            for layout, source in layouts.items():
                start = time.perf_counter()
                records = load_split(source, tokenizer, num_visual_tokens=32, max_bad_fraction=0.0)
                prepared[layout] = (records, time.perf_counter() - start)
            for _ in range(args.rounds):
                for layout, (records, _) in prepared.items():
                    fetch_s, sizes[layout], load_s = read_every_image(records, args.batch, args.image_size)
                    reads[layout][0].append(fetch_s)
                    reads[layout][1].append(load_s)
            for layout, (records, prepare_s) in prepared.items():
                count = len(records)
                fetch_s, load_s = (statistics.median(times) for times in reads[layout])
                objects = len(shards) if layouts[layout].shards else count
                row = [server.name, layout, f"{count} / {objects}", f"{count / prepare_s:.0f}"]
                row += [f"{count / fetch_s:.0f}", f"{sizes[layout] / 1e6 / fetch_s:.1f}", f"{count / load_s:.0f}"]
                rows.append(row)
                print(common.table_row(row), flush=True)
    finally:
        drop_bucket(client, bucket)
    return rows


def read_every_image(records, batch: int, image_size: int) -> tuple[float, int, float]:
    """(s to read every image's bytes, the bytes, s to read and decode them) as the loader does: one
    micro-batch of `batch` images at a time, its GETs concurrent."""
    from concurrent.futures import ThreadPoolExecutor

    from cosctl.data.images import FETCH_THREADS

    names = [records.image(index) for index in range(len(records))]
    batches = [names[i : i + batch] for i in range(0, len(names), batch)]
    images, num_bytes = records.images, 0
    start = time.perf_counter()
    for chunk in batches:
        with ThreadPoolExecutor(min(FETCH_THREADS, len(chunk))) as pool:
            num_bytes += sum(len(data) for data in pool.map(images.read_bytes, chunk))
    fetch_s = time.perf_counter() - start
    start = time.perf_counter()
    for chunk in batches:
        images.load_many(chunk, image_size)
    return fetch_s, num_bytes, time.perf_counter() - start


def images_main(args: argparse.Namespace) -> None:
    servers: list[Server] = []
    moto = None
    if not args.no_moto:
        server, moto = moto_process()
        servers.append(server)
    if (ceph := ceph_server(args)) is not None:
        servers.append(ceph)
    header = ["server", "layout", "images / objects", "prepare img/s", "read img/s", "read MB/s", "read+decode img/s"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "set"
            write_image_set(folder, args.images, args.per_shard)
            shards = sorted((folder / "shards").glob("*.tar"))
            mib = sum(p.stat().st_size for p in shards) / len(shards) / MiB
            size = f"{len(shards)} shards of {mib:.1f} MiB"
            print(f"# {args.images} images, {size}, batch {args.batch}, {args.image_size} px")
            print("\n".join(common.table_head(header)))
            for server in servers:
                measure_images(server, folder, args)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--parts", default="8,16", help="part sizes in MiB, comma-separated")
    parser.add_argument("--concurrency", default="4,8", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ceph-dir", help="state dir of .ci/ceph-s3.sh (default $CEPH_S3_DIR)")
    parser.add_argument("--ceph-endpoint", help="a running Ceph/MinIO endpoint; credentials from AWS_*")
    parser.add_argument("--no-moto", action="store_true")
    parser.add_argument("--images", type=int, help="measure training images: this many, loose and in shards")
    parser.add_argument("--per-shard", type=int, default=500, help="--images: samples per shard")
    parser.add_argument("--batch", type=int, default=32, help="--images: images per micro-batch read")
    parser.add_argument("--image-size", type=int, default=224, help="--images: decoded size in px")
    args = parser.parse_args()
    if args.images:
        images_main(args)
        return
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
