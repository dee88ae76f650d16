"""Host memory and time of `cosctl pretrain`'s model build, per rank, with 1 and 2 ranks.

Builds, once, the folders a user brings: a Llama of a few hundred million parameters saved by
transformers in safetensors shards (with its tokenizer), a `CLIPModel` with ViT-L/14 geometry (narrow),
and a small 224-px synthetic set. Then runs the product itself, `python -m cosctl pretrain
recipes/vicuna7b/pretrain.yaml` (frozen ViT and LLM, bridge trained; fp32 on CPU), for one step, and
while it runs polls every rank's peak resident memory (VmHWM) and its anonymous memory (RssAnon,
every 20 ms) until rank 0 prints its trainable parameters (the engine exists by then). It reports, per
rank count: seconds from launch to that line, the highest peak RSS and peak anonymous memory of any
rank, and each over one copy of the model in the run dtype. RSS also counts the pages of a
memory-mapped checkpoint a rank has read, which the page cache shares between ranks.

`--repo DIR` runs another checkout of the project (e.g. an older commit, for before/after): its spec
dialect is detected from its tiny recipe.

    python bench/build_memory.py [--precision fp32|bf16] [--ranks 1,2] [--repo DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
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
    llm_bytes = sum(p.stat().st_size for p in (root / "llm").glob("*.safetensors"))
    clip_bytes = sum(p.stat().st_size for p in (root / "clip").glob("*.safetensors"))
    return {"llm_gib": llm_bytes / 2**30, "clip_gib": clip_bytes / 2**30}


def command(repo: Path, root: Path, ranks: int, precision: str) -> list[str]:
    sets = [
        f"model.vision.path={root / 'clip'}",
        f"model.text.path={root / 'llm'}",
        f"model.tokenizer={root / 'llm'}",
        f"data.root={root / 'data'}",
        "data.train=train.json",
        "data.eval=eval.json",
        "data.num_workers=0",
        f"deepspeed.precision={precision}",
        "optim.num_steps=1",
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


def rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    """The training ranks: every descendant running `-m cosctl` except torchrun's own process."""
    found = []
    for proc in [launcher, *launcher.children(recursive=True)]:
        try:
            line = proc.cmdline()
        except psutil.Error:
            continue
        if "cosctl" in line and "torch.distributed.run" not in line:
            found.append(proc)
    return found


def memory_kib(proc: psutil.Process) -> tuple[int, int]:
    """(peak resident memory VmHWM, current anonymous memory RssAnon) of a process, in KiB. Resident
    memory also counts file pages a process maps (a memory-mapped checkpoint it has read), which the
    page cache shares between ranks; anonymous memory is what each rank holds on its own."""
    fields = common.proc_status_kib(proc.pid)
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


def measure(repo: Path, root: Path, ranks: int, precision: str) -> dict:
    """Launch, poll the ranks' peaks until rank 0 reports its trainable parameters, let it finish."""
    env = common.product_env(repo=repo) | {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(root / "ext"),
        "PYTHONWARNINGS": "ignore",
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        command(repo, root, ranks, precision),
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks: dict[int, int] = {}
    anon: dict[int, int] = {}
    built_s, built_line, lines = None, None, []
    os.set_blocking(proc.stdout.fileno(), False)
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        for rank_proc in rank_processes(launcher):
            hwm, rss_anon = memory_kib(rank_proc)
            peaks[rank_proc.pid] = max(peaks.get(rank_proc.pid, 0), hwm)
            anon[rank_proc.pid] = max(anon.get(rank_proc.pid, 0), rss_anon)
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
            if "model built in" in line:
                built_line = line.strip()
            if built_s is None and "trainable parameters" in line:
                built_s = time.monotonic() - started
        if built_s is not None:
            break
        time.sleep(0.02)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"cosctl pretrain failed ({ranks} ranks):\n" + "".join(lines)[-3000:] + rest[-3000:])
    return {
        "ranks": ranks,
        "seconds_to_engine": built_s,
        "peak_rss_gib": max(peaks.values()) / 2**20,
        "peak_anon_gib": max(anon.values()) / 2**20,
        "ranks_seen": len(peaks),
        "product_line": built_line,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/cosctl-build-memory"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ranks", default="1,2")
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
    rows = [measure(args.repo.resolve(), args.root, int(n), args.precision) for n in args.ranks.split(",")]
    copy = (sizes["llm_gib"] + sizes["clip_gib"]) / (2 if args.precision == "bf16" else 1)
    print(
        f"LLM folder {sizes['llm_gib']:.2f} GiB (fp32), CLIP {sizes['clip_gib']:.3f} GiB; one copy in "
        f"{args.precision}: {copy:.2f} GiB; repo {args.repo}"
    )
    lines = [
        [
            row["ranks"],
            f"{row['seconds_to_engine']:.1f}",
            f"{row['peak_rss_gib']:.2f}",
            f"{row['peak_rss_gib'] / copy:.2f}",
            f"{row['peak_anon_gib']:.2f}",
            f"{row['peak_anon_gib'] / copy:.2f}",
        ]
        for row in rows
    ]
    header = ["ranks", "s to engine", "peak RSS per rank (GiB)", "/ one model copy", "peak anonymous (GiB)", "/ copy"]
    print(common.markdown_table(header, lines, "r" * len(header)))
    for row in rows:
        if row["product_line"]:
            print(f"  {row['ranks']} ranks, cosctl: {row['product_line']}")
    common.write_report(args.json, {"sizes": sizes, "rows": rows, "repo": str(args.repo)})


if __name__ == "__main__":
    main()
