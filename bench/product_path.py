"""The product path of bench/stage_speed.py: a row is one real `cosctl pretrain` run, timed by the
product's own step records.

For each row `stage_speed.py` gives a pretrain spec (a dict, the row's model shape, scales, image size
and batch settings); this module

1. makes the row's data with `cosctl.data.synth.synthesize` at the row's resolution, cached per resolution
   under the work folder (`data/<px>px/`, made again only when it holds fewer training records than
   the row reads in one epoch). The synthetic tokenizer is small (a BPE of ~470-770 entries, depending
   on the number of records). When the LLM is random the product sizes its vocabulary from
   `len(tokenizer)` (`PretrainModelSpec.to_config` sets `vocab_size` to it, and the lean build takes
   `max(config, tokenizer)`), so a tokenizer smaller than the shape's LLM vocabulary (32000 for the 1b
   and 7b shapes) is copied to `data/<px>px/tokenizer-<vocab>/` and padded with added tokens
   `<bench_unused_N>` up to that size. These tokens never occur in the text (every record encodes to
   the same ids as with the unpadded tokenizer), but the embedding and the LM head get the shape's
   rows, so FLOPs and speed mean what they say;
2. writes the spec as YAML and runs the product in a subprocess, from the repository root:
   `python -m cosctl pretrain SPEC --nproc N --run-dir RUN --output OUT --resume never --overwrite`,
   its output in `product.log`;
3. stops the run once its `metrics.jsonl` holds the last timed step: SIGTERM to the ranks, which the
   product answers at the next step boundary by stopping without a checkpoint (no save is due: the
   spec sets no `checkpoint.every_*`; exit 143). So nothing is written to storage at all, not even the
   final checkpoint and published model of a finished run, which on the 7b shape would be ~28 GB.
   `run_to_end` lets the run finish instead (final checkpoint, artefact, summary.json);
4. leaves the figures to `timed_figures`, which reads the product's step records.

What it measures from outside, because the product does not log it: the peak resident memory of the
largest process of the run (`os.wait4`'s `ru_maxrss`: the rank on one rank, the largest rank or the
launcher with several), and on a GPU the device memory in use (`nvidia-smi`, sampled about once a
second, above what was in use before the run: CUDA context and the allocator's reserve, not its
max allocated).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNUSED_TOKEN = "<bench_unused_{}>"
# Environment a process started by a launcher carries; a product run must start as a fresh command.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)
STOP_EXIT = 143  # the product's exit code after a SIGTERM stop at a step boundary
# Steps the spec allows past the last timed one: the SIGTERM is seen at the boundary of the step that is
# running when it arrives, and a run that reaches optim.num_steps would save its final checkpoint.
STOP_MARGIN = 3


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class DataSet:
    """A synthetic set at one resolution and the tokenizer a row's spec names."""

    root: Path
    tokenizer: Path
    image_size: int
    num_train: int
    vocab_size: int  # len(tokenizer) as the product loads it: the LLM's vocabulary
    tokenizer_vocab_size: int  # the synthetic tokenizer's own, before padding


def _synth_metadata(root: Path) -> dict | None:
    try:
        return json.loads((root / "synth.json").read_text())
    except (OSError, ValueError):
        return None


def prepare_data(work: Path, image_size: int, min_train: int, vocab_size: int, seed: int = 0) -> DataSet:
    """The cached synthetic set at `image_size` px with at least `min_train` training records, and a
    tokenizer of at least `vocab_size` entries (padded when the synthetic one is smaller)."""
    from cosctl.data.records import load_tokenizer
    from cosctl.data.synth import synthesize

    root = Path(work) / "data" / f"{image_size}px"
    meta = _synth_metadata(root)
    if meta is None or meta.get("image_size") != image_size or meta.get("num_train", 0) < min_train:
        shutil.rmtree(root, ignore_errors=True)
        num = math.ceil(min_train / 0.9) + 1  # synthesize keeps about a tenth of the records for eval
        for _ in range(3):
            started = time.monotonic()
            meta = synthesize(root, num, seed, image_size)
            print(
                f"[stage_speed] synthesized {meta['num_train']} training records at {image_size} px in "
                f"{time.monotonic() - started:.1f} s: {root}",
                flush=True,
            )
            if meta["num_train"] >= min_train:
                break
            shutil.rmtree(root, ignore_errors=True)
            num += min_train - meta["num_train"] + 1
        else:
            raise RuntimeError(f"could not synthesize {min_train} training records at {image_size} px")
    base = root / "tokenizer"
    base_size = len(load_tokenizer(base))
    tokenizer = base
    if vocab_size > base_size:
        tokenizer = root / f"tokenizer-{vocab_size}"
        if not (tokenizer / "tokenizer.json").is_file() or len(load_tokenizer(tokenizer)) != vocab_size:
            pad_tokenizer(base, tokenizer, vocab_size - base_size)
        if len(load_tokenizer(tokenizer)) != vocab_size:
            raise RuntimeError(f"{tokenizer}: padding did not give {vocab_size} entries")
    return DataSet(root, tokenizer, image_size, meta["num_train"], max(vocab_size, base_size), base_size)


def pad_tokenizer(source: Path, dest: Path, count: int) -> None:
    """A copy of the tokenizer at `source` with `count` more (added, unused) tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.add_tokens([UNUSED_TOKEN.format(i) for i in range(count)])
    shutil.rmtree(dest, ignore_errors=True)
    tokenizer.save_pretrained(dest)


# ---------------------------------------------------------------------------------------------------
# Running the product


@dataclass
class ProductRun:
    returncode: int
    records: list[dict]  # metrics.jsonl's step records
    log_path: Path
    run_dir: Path
    wall_s: float  # launch to exit
    first_step_s: float | None  # launch to the end of step 1 (start-up, build, data, engine, probe)
    peak_host_gib: float  # peak RSS of the run's largest process (wait4)
    peak_device_gib: float | None  # GPU memory in use above the baseline, sampled (nvidia-smi)
    stopped: bool  # the bench stopped it after the last timed step

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def child_env(peak_tflops: float | None) -> dict:
    """This process's environment for a fresh `cosctl` command: the repository importable, no launcher
    variables (an in-process direct row sets them), the peak for MFU when known."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if peak_tflops:
        env["COSCTL_PEAK_TFLOPS"] = repr(float(peak_tflops))
    return env


def read_records(path: Path) -> list[dict]:
    """The step records of a metrics.jsonl (a line still being written is skipped)."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "step_time_s" in record:
            records.append(record)
    return records


def _device_memory_mib() -> list[int] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return [int(line) for line in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop_ranks(pid: int, nproc: int) -> None:
    """SIGTERM to the ranks: the process itself on one rank, else the launcher's rank processes (never
    DataLoader workers, which would die)."""
    if nproc == 1:
        os.kill(pid, signal.SIGTERM)
        return
    import psutil

    try:
        ranks = [c for c in psutil.Process(pid).children() if "cosctl" in " ".join(c.cmdline())]
    except psutil.Error:
        ranks = []
    for rank in ranks or [psutil.Process(pid)]:
        try:
            rank.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass


def _kill_tree(pid: int) -> None:
    for process in _descendants(pid):
        try:
            process.kill()
        except Exception:  # already gone
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_product(
    spec_path: Path,
    row_dir: Path,
    *,
    nproc: int,
    last_step: int,
    env: dict,
    run_to_end: bool,
    timeout_s: float,
    cuda: bool,
) -> ProductRun:
    """`cosctl pretrain` on the spec, stopped after `last_step` (unless `run_to_end`)."""
    run_dir, output, log_path = row_dir / "run", row_dir / "output", row_dir / "product.log"
    for folder in (run_dir, output):
        shutil.rmtree(folder, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "cosctl",
        "pretrain",
        str(spec_path),
        "--nproc",
        str(nproc),
        "--run-dir",
        str(run_dir),
        "--output",
        str(output),
        "--resume",
        "never",
        "--overwrite",
    ]
    (row_dir / "command.txt").write_text(" ".join(command) + "\n")
    baseline = _device_memory_mib() if cuda else None
    peak_device: list[int] | None = list(baseline) if baseline else None
    metrics = run_dir / "metrics.jsonl"
    launched, launched_wall = time.monotonic(), time.time()
    stopped, status, usage, last_sample = False, None, None, 0.0
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if not stopped and not run_to_end and any(r["step"] >= last_step for r in read_records(metrics)):
                _stop_ranks(process.pid, nproc)
                stopped = True
            now = time.monotonic()
            if peak_device is not None and now - last_sample >= 1.0:
                last_sample = now
                sample = _device_memory_mib() or []
                peak_device = [max(a, b) for a, b in zip(peak_device, sample, strict=False)] if sample else peak_device
            if now - launched > timeout_s:
                print(f"[stage_speed] product run over {timeout_s:.0f} s: killed", flush=True)
                _kill_tree(process.pid)
            time.sleep(0.2)
    finally:
        if status is None:  # interrupted: leave no rank behind
            _kill_tree(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    records = read_records(metrics)
    first = next((r for r in records if r["step"] == 1), None)
    device_gib = None
    if baseline and peak_device:
        device_gib = max(p - b for p, b in zip(peak_device, baseline, strict=False)) / 1024
    return ProductRun(
        returncode=process.returncode,
        records=records,
        log_path=log_path,
        run_dir=run_dir,
        wall_s=time.monotonic() - launched,
        first_step_s=first["time"] - launched_wall if first else None,
        peak_host_gib=usage.ru_maxrss / 2**20,
        peak_device_gib=device_gib,
        stopped=stopped,
    )


# ---------------------------------------------------------------------------------------------------
# Figures


def _median(records: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in records]
    return None if any(v is None for v in values) else statistics.median(values)


def timed_figures(records: list[dict], warmup: int, steps: int) -> dict:
    """The product's per-step figures over the timed steps (warmup+1 .. warmup+steps): medians of its
    step_time_s, samples_per_s, tokens_per_s, tflops, mfu and hfu; the loop's whole time per step
    (between consecutive records: also the metrics, the logging and the stop/save agreement); samples,
    tokens and micro-batches per step."""
    by_step = {r["step"]: r for r in records}
    wanted = range(warmup + 1, warmup + steps + 1)
    missing = [s for s in wanted if s not in by_step]
    if missing:
        raise ValueError(f"metrics.jsonl lacks steps {missing} (has {sorted(by_step)})")
    timed = [by_step[s] for s in wanted]
    loop = [by_step[s]["time"] - by_step[s - 1]["time"] for s in wanted if s - 1 in by_step]
    seconds = [r["step_time_s"] for r in timed]
    return {
        "s_per_step": statistics.median(seconds),
        "s_per_step_mean": statistics.fmean(seconds),
        "step_times_s": seconds,
        "loop_s_per_step": statistics.median(loop) if loop else None,
        "samples_per_s": _median(timed, "samples_per_s"),
        "tokens_per_s": _median(timed, "tokens_per_s"),
        "tflops": _median(timed, "tflops"),
        "mfu": _median(timed, "mfu"),
        "hfu": _median(timed, "hfu"),
        "samples_per_step": statistics.median(r["samples"] for r in timed),
        "tokens_per_step": statistics.fmean(r["tokens"] for r in timed),
        "micro_batches": statistics.median(r["micro_batches"] for r in timed),
        "first_loss": records[0]["loss"],
        "last_loss": timed[-1]["loss"],
    }


def log_line(log: str, text: str) -> str | None:
    """The last product log line that contains `text`, without the stage prefix."""
    found = None
    for line in log.splitlines():
        if text in line:
            found = line[line.index(text) :]
    return found


def log_value(log: str, prefix: str) -> str | None:
    """The rest of the last product log line that contains `prefix` (after it)."""
    found = None
    for line in log.splitlines():
        _, sep, rest = line.partition(prefix)
        if sep:
            found = rest.strip()
    return found


def time_loader(
    examples: list,
    root: Path,
    image_size: int,
    pad_token_id: int,
    budget: int,
    samples_per_step: int,
    seed: int,
    world_size: int,
    warmup: int,
    steps: int,
) -> list[dict]:
    """Rank 0's `StepLoader.next_step()` (image loading, resizing, collating; no workers) for each timed
    step of a row, alone in this process: the data loading a product step with `data.num_workers: 0`
    does inside its step time. Per step: seconds, samples, padded tokens (what the model computes on)
    and non-padding tokens (what the product's tokens/s counts)."""
    from cosctl.train.batching import StepLoader

    loader = StepLoader(
        examples,
        image_root=root,
        image_size=image_size,
        pad_token_id=pad_token_id,
        tokens_per_micro_batch=budget,
        samples_per_step=samples_per_step,
        seed=seed,
        rank=0,
        world_size=world_size,
        num_workers=0,
    )
    found = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        batches = loader.next_step()
        found.append(
            {
                "seconds": time.perf_counter() - started,
                "samples": sum(b["num_samples"] for b in batches),
                "padded_tokens": sum(b["input_ids"].numel() for b in batches),
                "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            }
        )
    return found[warmup:]
