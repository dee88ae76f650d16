"""Start-up time and host memory per rank for the data, at 10K, 100K and 1M LLaVA-shaped records:
the path before prepared token stores (every rank parses the JSON and holds an `Example` per record)
against the prepared, memory-mapped store (`cosctl.data.prepare`, `cosctl.data.tokenstore`).

    python bench/data_scale.py --records 10000,100000,1000000 --ranks 2 --json data_scale.json

For each size it writes a data set (records cycled from a small synthetic set, ids unique: a quarter
text-only, a quarter multi-turn, a quarter long; 64 distinct JPEG images; with `--unique-text` every
record's first question is distinct too, since preparing tokenises each distinct text of a chunk of
records once and repeated text would make it look cheaper than it is) and starts `--ranks`
processes at once, as a job's ranks start on one machine. Each rank imports, loads the tokenizer,
reads its resident memory (the baseline), then times: reading the split, building its `StepLoader` and
loading its first step's micro-batches. It reports the wall time and the resident memory above the
baseline: in all (RSS), in anonymous pages (RssAnon: Python objects and arrays) and in mapped files
(RssFile: pages of mapped files that were touched, shared between ranks through the page cache), plus
the peak (VmHWM above the baseline) and, in the JSON, the peak of the forked processes that prepared
the store (`children_peak_mb`, absolute: it includes the ~350 MB the fork shares with its rank).

    before     the code at `--before-ref` (default: the commit before token stores), extracted with
               `git archive` and put first on the ranks' PYTHONPATH: `load_examples` + `StepLoader`
    prepare    this tree, no store yet: `load_split` prepares it (split over the ranks), then maps it
    prepared   this tree again: the store is found by its key and mapped (what a requeued job does)

A row that exceeds `--timeout` seconds is reported as such. Results for this machine are in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

REPO = common.REPO
BEFORE_REF = "1192d97"  # main before prepared token stores
NUM_VISUAL_TOKENS = 32
MAX_TEXT_TOKENS = 256
TOKENS_PER_MICRO_BATCH = 4096
SAMPLES_PER_STEP = 256
IMAGE_SIZE = 64
NUM_IMAGES = 64

RANK_SCRIPT = r"""
import json, os, sys, time
path, root, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
import torch
from cosctl.data.records import load_tokenizer
from cosctl.train.loader import StepLoader

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
tokenizer = load_tokenizer(os.path.join(root, "tokenizer"))
if path != "before":
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
base = status()
started = time.monotonic()
if path == "before":
    from cosctl.data.records import load_examples
    records, _ = load_examples(os.path.join(root, "train.json"), root, tokenizer, settings["visual"],
                               settings["text"], 1.0)
    options = {"image_root": root}
else:
    from cosctl.data.prepare import load_split
    from cosctl.data.split import SplitSource
    source = SplitSource(root=root, name="train.json", max_text_tokens=settings["text"], image_check="decode")
    records = load_split(source, tokenizer, num_visual_tokens=settings["visual"], max_bad_fraction=1.0)
    options = {}
loaded = time.monotonic() - started
loader = StepLoader(records, image_size=settings["size"], pad_token_id=tokenizer.pad_token_id,
                    tokens_per_micro_batch=settings["budget"], samples_per_step=settings["step"], seed=0, rank=rank,
                    world_size=world, **options)
batches = loader.next_step()
elapsed = time.monotonic() - started
now = status()
import resource
children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # forked preparation, if any
json.dump({"rank": rank, "records": len(records), "load_s": loaded, "startup_s": elapsed,
           "children_peak_mb": children_peak,
           "micro_batches": len(batches), "base_rss_mb": base["VmRSS"],
           "rss_mb": now["VmRSS"] - base["VmRSS"], "anon_mb": now["RssAnon"] - base["RssAnon"],
           "file_mb": now["RssFile"] - base["RssFile"], "peak_mb": now["VmHWM"] - base["VmRSS"]},
          open(out, "w"))
if path != "before":
    dist.destroy_process_group()
"""
SETTINGS = {
    "visual": NUM_VISUAL_TOKENS,
    "text": MAX_TEXT_TOKENS,
    "size": IMAGE_SIZE,
    "budget": TOKENS_PER_MICRO_BATCH,
    "step": SAMPLES_PER_STEP,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", default="10000,100000,1000000", help="Comma-separated record counts.")
    parser.add_argument("--ranks", type=int, default=2, help="Ranks started together per measurement.")
    parser.add_argument("--paths", default="before,prepare,prepared", help="Which paths to measure, in order.")
    parser.add_argument("--before-ref", default=BEFORE_REF, help="Git ref of the code measured as 'before'.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for data sets (default: a temp folder).")
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds per measurement.")
    parser.add_argument("--json", type=Path, default=None, help="Write the rows here (rewritten after each).")
    parser.add_argument(
        "--unique-text",
        action="store_true",
        help="Make every record's text distinct (its id in the first question), so that preparing "
        "cannot reuse the tokens of a repeated text; for realistic preparation times.",
    )
    return parser.parse_args(argv)


def write_dataset(folder: Path, num_records: int, unique_text: bool = False) -> None:
    """`num_records` LLaVA-shaped records under `folder` (see the module doc), with the tokenizer."""
    from PIL import Image

    from cosctl.data.synth import synthesize
    from tests.llava import llava_records

    synth = folder.parent / "synth"
    if not (synth / "train.json").exists():
        synthesize(synth, num_samples=400, seed=0, image_size=IMAGE_SIZE)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokenizer").exists():
        shutil.copytree(synth / "tokenizer", folder / "tokenizer")
    base = llava_records(json.loads((synth / "train.json").read_text()))
    images = sorted({record["image"] for record in base if "image" in record})[:NUM_IMAGES]
    for name in images:
        target = folder / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            source = synth / "images" / Path(name).with_suffix(".png").name
            with Image.open(source) as image:
                image.convert("RGB").save(target, "JPEG", quality=90)
    with open(folder / "train.json", "w") as handle:
        handle.write("[")
        for index in range(num_records):
            record = dict(base[index % len(base)])
            record["id"] = f"{index:08d}"
            if unique_text:
                first, *rest = record["conversations"]
                record["conversations"] = [{**first, "value": f"{first['value']} (question {index})"}, *rest]
            if "image" in record:
                record["image"] = images[index % len(images)]
            handle.write(("," if index else "") + json.dumps(record))
        handle.write("]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(path: str, data: Path, ranks: int, pythonpath: str, scratch: Path, timeout: int) -> dict:
    """Start `ranks` rank processes together; their reports, or the reason there are none."""
    script = scratch / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(free_port())
    procs = []
    started = time.monotonic()
    for rank in range(ranks):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONPATH": pythonpath,
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "COSCTL_CACHE": str(scratch / "cache"),
        }
        out = scratch / f"{path}-{rank}.json"
        out.unlink(missing_ok=True)
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(script), path, str(data), str(out), json.dumps(SETTINGS)],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                out,
            )
        )
    reports, error = [], None
    for proc, out in procs:
        try:
            _, stderr = proc.communicate(timeout=max(1, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                other.kill()
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0:
            error = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
        else:
            reports.append(json.loads(out.read_text()))
    if error:
        return {"error": error}
    return {
        "ranks": reports,
        "startup_s": max(r["startup_s"] for r in reports),
        "rss_mb": max(r["rss_mb"] for r in reports),
        "anon_mb": max(r["anon_mb"] for r in reports),
        "file_mb": max(r["file_mb"] for r in reports),
        "peak_mb": max(r["peak_mb"] for r in reports),
        "base_rss_mb": max(r["base_rss_mb"] for r in reports),
        "children_peak_mb": max(r["children_peak_mb"] for r in reports),
    }


def before_source(ref: str, scratch: Path) -> Path:
    """The packages at `ref`, extracted (not checked out: the working tree is left alone)."""
    target = scratch / f"src-{ref}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "cosctl", "cos_model"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([f"{row['records']:,}", row["path"], row["error"], "", "", "", ""])
        else:
            lines.append(
                [f"{row['records']:,}", row["path"], f"{row['startup_s']:.1f}"]
                + [f"{row[key]:.0f}" for key in ("rss_mb", "anon_mb", "file_mb", "peak_mb")]
            )
    header = ["records", "path", "start-up s", "RSS MB", "anon MB", "mapped MB", "peak MB"]
    return common.markdown_table(header, lines, "rlrrrrr")


def main(argv=None) -> None:
    args = parse_args(argv)
    scratch = args.work or Path(tempfile.mkdtemp(prefix="data_scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for count in [int(n) for n in args.records.split(",")]:
        data = scratch / f"n{count}{'-unique' if args.unique_text else ''}" / "data"
        started = time.monotonic()
        if not (data / "train.json").exists():
            write_dataset(data, count, args.unique_text)
        print(
            f"{count:,} records: data set in {time.monotonic() - started:.0f} s "
            f"({(data / 'train.json').stat().st_size / 2**20:.0f} MiB of JSON)",
            flush=True,
        )
        shutil.rmtree(data / "prepared", ignore_errors=True)
        for path in args.paths.split(","):
            source = before_source(args.before_ref, scratch) if path == "before" else REPO
            result = measure(
                path if path == "before" else "after", data, args.ranks, str(source), scratch, args.timeout
            )
            rows.append({"records": count, "path": path, **result})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            common.write_report(args.json, {"rows": rows, "ranks": args.ranks, "complete": False})
    print(table(rows))
    common.write_report(args.json, {"rows": rows, "ranks": args.ranks, "complete": True})


if __name__ == "__main__":
    main()
