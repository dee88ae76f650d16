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
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parents[1]


def make_folders(root: Path, hidden: int, layers: int) -> dict:
    """The LLM, CLIP and data folders under `root` (reused when present); returns their sizes."""
    import torch
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from cosctl.data.records import load_tokenizer
    from cosctl.data.synth import synthesize

    if not (root / "data" / "train.json").is_file():
        synthesize(root / "data", num_samples=24, seed=0, image_size=224)
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    if not (root / "llm" / "model.safetensors.index.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=int(hidden * 2.75) // 64 * 64,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 64,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        with torch.device("cpu"):
            LlamaForCausalLM(config).save_pretrained(root / "llm", max_shard_size="200MB")
        tokenizer.save_pretrained(root / "llm")
    if not (root / "clip" / "config.json").is_file():
        vision = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=24,
            num_attention_heads=4,
            patch_size=14,
            image_size=224,
        )
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
        CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(root / "clip")
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
    return [
        sys.executable,
        "-m",
        "cosctl",
        "pretrain",
        "recipes/vicuna7b/pretrain.yaml",
        "--nproc",
        str(ranks),
        "--run-dir",
        str(root / f"run{ranks}"),
        "--output",
        str(root / f"out{ranks}"),
        "--resume",
        "never",
        "--overwrite",
        *[a for s in sets for a in ("--set", s)],
    ]


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
    fields = {}
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields.get("VmHWM", 0), fields.get("RssAnon", 0)


def measure(repo: Path, root: Path, ranks: int, precision: str) -> dict:
    """Launch, poll the ranks' peaks until rank 0 reports its trainable parameters, let it finish."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": str(root / "ext"),
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("RANK", None)
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
    parser.add_argument("--repo", type=Path, default=HERE)
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
    print("| ranks | s to engine | peak RSS per rank (GiB) | / one model copy | peak anonymous (GiB) | / copy |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['ranks']} | {row['seconds_to_engine']:.1f} | {row['peak_rss_gib']:.2f} | "
            f"{row['peak_rss_gib'] / copy:.2f} | {row['peak_anon_gib']:.2f} | {row['peak_anon_gib'] / copy:.2f} |"
        )
        if row["product_line"]:
            print(f"  cosctl: {row['product_line']}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "rows": rows, "repo": str(args.repo)}, indent=1))


if __name__ == "__main__":
    main()
