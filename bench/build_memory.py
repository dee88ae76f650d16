"""Host memory and time of `cosctl pretrain` per rank, with 1 and 2 ranks: building the model, the
engine, training and publishing `model/`.

Builds, once, the folders a user brings: a Llama of a few hundred million parameters saved by
transformers in safetensors shards (with its tokenizer), a `CLIPModel` with ViT-L/14 geometry (narrow),
and a small 224-px synthetic set. Then runs the product itself, `python -m cosctl pretrain
recipes/vicuna7b/pretrain.yaml` (frozen ViT and LLM, bridge trained; fp32 on CPU), for `--steps` (1), and
polls every rank's anonymous memory (RssAnon) every 20 ms until the run exits, keeping each rank's
peak per phase (`phase_now`: build, engine, train, publish), and its peak resident memory (VmHWM). It
reports, per rank count: seconds from launch to the engine and in all, the highest anonymous peak of any
rank per phase, rank 0's anonymous memory when publishing begins (what training left) and its peak
while publishing, the highest over one copy of the model in the run dtype, and the highest peak RSS.
RSS also counts the pages of a memory-mapped checkpoint a rank has read, which the page cache shares
between ranks; anonymous memory is what each rank holds on its own.

`--repo DIR` runs another checkout of the project (e.g. an older commit, for before/after): its spec
dialect is detected from its tiny recipe.

    python bench/build_memory.py [--precision fp32|bf16] [--ranks 1,2] [--steps N] [--repo DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import common
import psutil


def make_folders(root: Path, hidden: int, layers: int) -> dict:
    """The LLM, CLIP and data folders under `root` (reused when present); returns their sizes."""
    from cosctl.data.records import load_tokenizer
    from cosctl.data.synth import synthesize

    if not (root / "data" / "train.json").is_file():
        synthesize(root / "data", num_samples=24, seed=0, image_size=224)
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    if not (root / "llm" / "model.safetensors.index.json").is_file():
        common.save_llama(root / "llm", hidden=hidden, layers=layers, intermediate=int(hidden * 2.75) // 64 * 64)
        tokenizer.save_pretrained(root / "llm")
    if not (root / "clip" / "config.json").is_file():
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
        common.save_clip(root / "clip", width=64, intermediate=128, text=text, projection_dim=16)
    shards = [p.stat().st_size for p in (root / "llm").glob("*.safetensors")]
    clip_bytes = sum(p.stat().st_size for p in (root / "clip").glob("*.safetensors"))
    return {"llm_gib": sum(shards) / 2**30, "clip_gib": clip_bytes / 2**30, "largest_shard_gib": max(shards) / 2**30}


def command(repo: Path, root: Path, ranks: int, precision: str, steps: int) -> list[str]:
    sets = [
        f"model.vision.path={root / 'clip'}",
        f"model.text.path={root / 'llm'}",
        f"model.tokenizer={root / 'llm'}",
        f"data.root={root / 'data'}",
        "data.train=train.json",
        "data.eval=eval.json",
        "data.num_workers=0",
        f"deepspeed.precision={precision}",
        f"optim.num_steps={steps}",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
        "eval.every_steps=null",
    ]
    if "samples_per_step" in (repo / "recipes" / "tiny" / "pretrain.yaml").read_text():
        sets += ["batch.samples_per_step=4", "batch.tokens_per_micro_batch=4096"]
    else:  # before samples_per_step, a budget had to leave a micro-batch per rank in the small set
        sets.append("batch.tokens_per_micro_batch=512")
    return common.product_command(
        "recipes/vicuna7b/pretrain.yaml",
        nproc=ranks,
        run_dir=root / f"run{ranks}",
        output=root / f"out{ranks}",
        sets=sets,
    )


def rank_processes(launcher: psutil.Process, ranks: int) -> dict[int, psutil.Process]:
    """The training ranks by rank: with one rank the CLI's own process (it runs the rank in process),
    else the launcher's descendants that torchrun gave a RANK."""
    if ranks == 1:
        return {0: launcher}
    found = {}
    try:
        children = launcher.children(recursive=True)
    except psutil.Error:  # the launcher has exited
        return found
    for proc in children:
        try:
            environ = proc.environ()
        except psutil.Error:
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = proc
    return found


def memory_kib(proc: psutil.Process) -> tuple[int, int]:
    """(peak resident memory VmHWM, current anonymous memory RssAnon) of a process, in KiB. Resident
    memory also counts file pages a process maps (a memory-mapped checkpoint it has read), which the
    page cache shares between ranks; anonymous memory is what each rank holds on its own."""
    fields = common.proc_status_kib(proc.pid)
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


PHASES = ("build", "engine", "train", "publish")


def phase_now(lines: list[str], output: Path) -> str:
    """Where the run is: building the model (until cosctl logs "model built in"), building the engine
    (until it logs the trainable parameters), training (until the final checkpoint is committed: the
    output's `checkpoints/latest` exists), then publishing `model/` (until the ranks exit)."""
    text = "".join(lines)
    if "trainable parameters" not in text:
        return "build" if "model built in" not in text else "engine"
    return "publish" if (output / "checkpoints" / "latest").is_file() else "train"


def measure(repo: Path, root: Path, ranks: int, precision: str, steps: int) -> dict:
    """Launch one run and poll every rank's memory every 20 ms until it exits, per phase."""
    env = common.product_env(repo=repo) | {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(root / "ext"),
        "PYTHONWARNINGS": "ignore",
    }
    output = root / f"out{ranks}"
    shutil.rmtree(output, ignore_errors=True)  # a previous run's checkpoints/latest would end `train` at once
    started = time.monotonic()
    proc = subprocess.Popen(
        command(repo, root, ranks, precision, steps),
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    hwm: dict[int, int] = {}
    anon = {phase: {} for phase in PHASES}  # phase -> rank -> peak RssAnon (KiB)
    seconds: dict[str, float] = {}
    publish_start = 0  # rank 0's anonymous memory when publishing begins (what training left it)
    lines: list[str] = []
    os.set_blocking(proc.stdout.fileno(), False)
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        lines.extend(iter(proc.stdout.readline, ""))
        phase = phase_now(lines, output)
        seconds.setdefault(phase, time.monotonic() - started)
        for rank, rank_proc in rank_processes(launcher, ranks).items():
            peak, rss_anon = memory_kib(rank_proc)
            hwm[rank] = max(hwm.get(rank, 0), peak)
            anon[phase][rank] = max(anon[phase].get(rank, 0), rss_anon)
            if phase == "publish" and rank == 0:
                publish_start = publish_start or rss_anon
        time.sleep(0.02)
    os.set_blocking(proc.stdout.fileno(), True)
    lines.append(proc.stdout.read())
    if proc.returncode != 0:
        raise SystemExit(f"cosctl pretrain failed ({ranks} ranks):\n" + "".join(lines)[-5000:])
    built = [line.strip() for line in "".join(lines).splitlines() if "model built in" in line]
    return {
        "ranks": ranks,
        "seconds_to_engine": seconds.get("train", float("nan")),
        "seconds_total": time.monotonic() - started,
        "peak_rss_gib": max(hwm.values()) / 2**20,
        "peak_anon_gib": {phase: max(by_rank.values(), default=0) / 2**20 for phase, by_rank in anon.items()},
        "rank0_publish_anon_gib": anon["publish"].get(0, 0) / 2**20,
        "rank0_publish_start_gib": publish_start / 2**20,
        "ranks_seen": len(hwm),
        "product_line": built[0] if built else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/cosctl-build-memory"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument(
        "--steps", type=int, default=1, help="Optimizer steps (from the second, ZeRO-3 keeps what it may gathered)."
    )
    parser.add_argument("--repo", type=Path, default=common.REPO)
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="The run dtype (bf16 is what GPU runs use; DeepSpeed runs it on CPU too).",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = make_folders(args.root, args.hidden, args.layers)
    rows = [measure(args.repo.resolve(), args.root, int(n), args.precision, args.steps) for n in args.ranks.split(",")]
    copy = (sizes["llm_gib"] + sizes["clip_gib"]) / (2 if args.precision == "bf16" else 1)
    print(
        f"LLM folder {sizes['llm_gib']:.2f} GiB (fp32, largest shard {sizes['largest_shard_gib']:.2f} GiB), "
        f"CLIP {sizes['clip_gib']:.3f} GiB; one copy in {args.precision}: {copy:.2f} GiB; repo {args.repo}"
    )
    lines = [
        [
            row["ranks"],
            f"{row['seconds_to_engine']:.1f}",
            f"{row['seconds_total']:.1f}",
            *(f"{row['peak_anon_gib'][phase]:.2f}" for phase in PHASES),
            f"{row['rank0_publish_start_gib']:.2f} -> {row['rank0_publish_anon_gib']:.2f}",
            f"{max(row['peak_anon_gib'].values()) / copy:.2f}",
            f"{row['peak_rss_gib']:.2f}",
        ]
        for row in rows
    ]
    header = [
        "ranks",
        "s to engine",
        "s in all",
        *(f"peak anon., {phase} (GiB)" for phase in PHASES),
        "rank 0 publishing: start -> peak",
        "highest / one copy",
        "peak RSS (GiB)",
    ]
    print(common.markdown_table(header, lines, "r" * len(header)))
    for row in rows:
        if row["product_line"]:
            print(f"  {row['ranks']} ranks, cosctl: {row['product_line']}")
    common.write_report(args.json, {"sizes": sizes, "rows": rows, "repo": str(args.repo)})


if __name__ == "__main__":
    main()
