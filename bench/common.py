"""What the bench scripts share: this checkout on `sys.path`, running the product (`python -m cosctl
pretrain`) and reading its step records, markdown tables, the device and software a measurement ran on,
JSON reports, and the model folders a user brings (saved by transformers' own `save_pretrained`).

`run_product` runs `python -m cosctl pretrain SPEC --nproc N --run-dir RUN --output OUT --resume never
--overwrite` in a subprocess from the repository root, its output in `product.log`, and stops it once
its `metrics.jsonl` holds the last timed step: SIGTERM to the ranks, which the product answers at the
next step boundary by stopping without a checkpoint (no save is due when the spec sets no
`checkpoint.every_*`; exit 143). So nothing is written to storage, not even the final checkpoint and
published model of a finished run (~28 GB on a 7B model). `run_to_end` lets the run finish instead.
`timed_figures` reads the run's figures from its own step records.

Scripts import this module first (`import common`; a script's folder is on `sys.path` when it runs):
it puts the checkout before anything installed, so `cosctl` and `cos_model` are this tree's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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
# Steps a spec allows past the last timed one: the SIGTERM is seen at the boundary of the step that is
# running when it arrives, and a run that reaches optim.num_steps would save its final checkpoint.
STOP_MARGIN = 3


# ---------------------------------------------------------------------------------------------------
# Running the product


def product_env(peak_tflops: float | None = None, repo: Path = REPO) -> dict:
    """This process's environment for a fresh `cosctl` command: `repo` importable first, no launcher
    variables, unbuffered output, the peak for MFU when known."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if peak_tflops:
        env["COSCTL_PEAK_TFLOPS"] = repr(float(peak_tflops))
    return env


def product_command(spec: str | Path, *, nproc: int, run_dir: Path, output: Path, sets: list[str] = ()) -> list[str]:
    """`python -m cosctl pretrain SPEC` as a fresh run that owns its folders, with `--set` overrides."""
    command = [sys.executable, "-m", "cosctl", "pretrain", str(spec), "--nproc", str(nproc)]
    command += ["--run-dir", str(run_dir), "--output", str(output), "--resume", "never", "--overwrite"]
    return command + [arg for item in sets for arg in ("--set", item)]


@dataclass
class ProductRun:
    returncode: int
    records: list[dict]  # metrics.jsonl's step records
    log_path: Path
    run_dir: Path
    wall_s: float  # launch to exit
    first_step_s: float | None  # launch to the end of step 1 (start-up, build, data, engine, probe)
    stopped: bool  # stopped after the last timed step

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


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
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    for process in children:
        try:
            process.kill()
        except psutil.Error:  # already gone
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_product(
    spec_path: Path, row_dir: Path, *, nproc: int, last_step: int, env: dict, run_to_end: bool, timeout_s: float
) -> ProductRun:
    """`cosctl pretrain` on the spec in `row_dir/run` and `row_dir/output`, stopped after `last_step`
    (unless `run_to_end`), killed after `timeout_s`."""
    run_dir, log_path = row_dir / "run", row_dir / "product.log"
    command = product_command(spec_path, nproc=nproc, run_dir=run_dir, output=row_dir / "output")
    (row_dir / "command.txt").write_text(" ".join(command) + "\n")
    for folder in (run_dir, row_dir / "output"):  # a metrics.jsonl left from before would stop it at once
        shutil.rmtree(folder, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    launched, launched_wall, stopped = time.monotonic(), time.time(), False
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while process.poll() is None:
            if not stopped and not run_to_end and any(r["step"] >= last_step for r in read_records(metrics)):
                _stop_ranks(process.pid, nproc)
                stopped = True
            if time.monotonic() - launched > timeout_s:
                print(f"[bench] product run over {timeout_s:.0f} s: killed", flush=True)
                _kill_tree(process.pid)
            time.sleep(0.2)
    finally:
        if process.poll() is None:  # interrupted: leave no rank behind
            _kill_tree(process.pid)
            process.wait()
    records = read_records(metrics)
    first = next((r for r in records if r["step"] == 1), None)
    return ProductRun(
        returncode=process.returncode,
        records=records,
        log_path=log_path,
        run_dir=run_dir,
        wall_s=time.monotonic() - launched,
        first_step_s=first["time"] - launched_wall if first else None,
        stopped=stopped,
    )


def _median(records: list[dict], key: str) -> float | None:
    values = [r.get(key) for r in records]
    return None if any(v is None for v in values) else statistics.median(values)


def timed_figures(records: list[dict], warmup: int, steps: int) -> dict:
    """The product's per-step figures over the timed steps (warmup+1 .. warmup+steps): medians of its
    step_time_s, samples_per_s, tokens_per_s, tflops, mfu, hfu and data_time_s, the largest
    peak_mem_gib; the loop's whole time per step (between consecutive records: also the metrics, the
    logging and the stop/save agreement); samples, tokens and micro-batches per step; the model FLOPs
    per sample the product counted."""
    by_step = {r["step"]: r for r in records}
    wanted = range(warmup + 1, warmup + steps + 1)
    missing = [s for s in wanted if s not in by_step]
    if missing:
        raise ValueError(f"metrics.jsonl lacks steps {missing} (has {sorted(by_step)})")
    timed = [by_step[s] for s in wanted]
    loop = [by_step[s]["time"] - by_step[s - 1]["time"] for s in wanted if s - 1 in by_step]
    seconds = [r["step_time_s"] for r in timed]
    memory = [r.get("peak_mem_gib") for r in timed]
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
        "data_s_per_step": _median(timed, "data_time_s"),
        "peak_mem_gib": None if None in memory else max(memory),
        "samples_per_step": statistics.median(r["samples"] for r in timed),
        "tokens_per_step": statistics.fmean(r["tokens"] for r in timed),
        "micro_batches": statistics.median(r["micro_batches"] for r in timed),
        # StepMeter's tflops is samples x model FLOPs per sample / step time.
        "flops_per_sample": timed[0]["tflops"] * 1e12 * timed[0]["step_time_s"] / timed[0]["samples"],
        "first_loss": records[0]["loss"],
        "last_loss": timed[-1]["loss"],
    }


def log_value(log: str, prefix: str) -> str | None:
    """The rest of the last product log line that contains `prefix` (after it)."""
    found = None
    for line in log.splitlines():
        _, sep, rest = line.partition(prefix)
        if sep:
            found = rest.strip()
    return found


# ---------------------------------------------------------------------------------------------------
# Tables and reports


def cell(value, spec: str) -> str:
    """`value` formatted, or "-" when there is none."""
    return "-" if value is None else format(value, spec)


def table_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(header: list[str], align: str | None = None) -> list[str]:
    """A markdown header and its rule; `align` has one letter per column, l or r (default: the first
    column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    return [table_row(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]


def markdown_table(header: list[str], rows: list, align: str | None = None) -> str:
    return "\n".join([*table_head(header, align), *(table_row(row) for row in rows)])


def add_set_argument(parser, what: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`, applied as `cosctl --set` applies them."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a key of {what}, as `cosctl --set` does (repeatable)",
    )


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import deepspeed
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }


def write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def measure_matmul_tflops(device, trials: int = 5) -> float:
    """Dense matmul throughput in the training dtype (bf16 8192^3 on GPU, fp32 2048^3 on CPU): the best
    of a few short trials, since a peak is what the hardware can do when nothing else competes."""
    import torch

    cuda = device.type == "cuda"
    n, repeats = (8192, 10) if cuda else (2048, 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if cuda:
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of /proc/PID/status in KiB (VmRSS, VmHWM, RssAnon, RssFile, ...); empty once
    the process is gone."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields


# ---------------------------------------------------------------------------------------------------
# Engines in this process, model folders


def quiet_logs() -> None:
    """DeepSpeed's and transformers' per-step chatter off (deprecated collectives warn every step)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def forget_module(module) -> None:
    """Drop DeepSpeed's last reference to a destroyed engine's model.

    NOTE: ZeRO-3 pushes each engine's root module onto the module-level
    `parameter_offload.FWD_MODULE_STACK` and `engine.destroy()` (DeepSpeed 0.19.8) never pops it, so
    without this every engine's model, optimizer state included, stays alive until the process ends.
    """
    from deepspeed.runtime.zero import parameter_offload

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]


def save_llama(folder: Path, *, hidden: int, layers: int, intermediate: int, vocab_size: int = 32000) -> None:
    """A random Llama (64-wide heads, untied head) saved by transformers in 200 MB safetensors shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("cpu"):
        LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")


def save_clip(folder: Path, *, width: int, intermediate: int, text: dict, projection_dim: int) -> None:
    """A random `CLIPModel` saved by transformers: a vision tower of ViT-L/14 geometry (24 blocks, patch
    14 at 224 px) at `width` (4 heads), the text tower of `text`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    vision = dict(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=24,
        num_attention_heads=4,
        patch_size=14,
        image_size=224,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=projection_dim)).save_pretrained(folder)
