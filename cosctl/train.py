"""The training loop of the pretrain and finetune stages.

    setup: process group -> stage (tokenizer, model, trainable set) -> data -> DeepSpeed engine
    resume: newest committed checkpoint (auto) / a given one (URI) / none (never; refuses to clobber)
    while step < num_steps:
        step += 1
        train_step(): accumulation x (micro-batch -> forward -> engine.backward -> engine.step)
        sink.log(step, loss, lr, grad norm, samples/s, tokens/s, TFLOP/s, MFU)      # rank 0
        if eval due: mean eval loss over a fixed set of held-out micro-batches
        if save due (every N steps / M minutes) or SIGUSR1 seen, agreed by all ranks: commit a checkpoint
        if SIGUSR1 seen: stop with exit code 75 so the scheduler requeues the job
    final checkpoint -> stage artefact (model folder or peft adapter) -> summary.json
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import SaveClock, checkpoint_name
from .autobatch import probe_micro_batch
from .data import Example, MicroBatchLoader, build_examples, samples_per_micro_batch
from .engine import build_engine, expected_trainable_groups, init_distributed, trainable_summary
from .metrics import MetricsSink, flops_per_sample, peak_tflops
from .resume import Resumer
from .spec import FinetuneSpec, PretrainSpec
from .stages import prepare_stage


@dataclass
class StepStats:
    loss: float = 0.0
    num_samples: int = 0
    num_tokens: int = 0


def _all_reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train_step(engine, loader: MicroBatchLoader, accumulation: int, device) -> StepStats:
    """One optimizer step over `accumulation` token-budgeted micro-batches; stats summed over ranks."""
    stats = StepStats()
    for _ in range(accumulation):
        batch = loader.next_micro_batch()
        num_samples = batch.pop("num_samples")
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        stats.loss += loss.item() / accumulation
        stats.num_samples += num_samples
        stats.num_tokens += int(batch["attention_mask"].sum())
    loss_sum, num_samples, num_tokens = _all_reduce([stats.loss, stats.num_samples, stats.num_tokens], device)
    stats.loss = loss_sum / dist.get_world_size()
    stats.num_samples, stats.num_tokens = int(num_samples), int(num_tokens)
    return stats


@torch.no_grad()
def eval_loss(engine, loader: MicroBatchLoader, num_batches: int, device) -> float:
    """Mean loss over the first `num_batches` held-out micro-batches (same batches, every rank)."""
    engine.eval()
    loader.load_state_dict({"epoch": 0, "index": 0})
    total = 0.0
    for _ in range(num_batches):
        batch = loader.next_micro_batch()
        batch.pop("num_samples")
        total += engine(**{k: v.to(device) for k, v in batch.items()}).loss.item()
    engine.train()
    return total / num_batches


class Preempted(RuntimeError):
    """The run stopped early on request (SLURM's warning signal) after committing a checkpoint."""

    exit_code = 75  # EX_TEMPFAIL: the batch script requeues the job

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on request; checkpoint committed, resume with --resume auto")
        self.step = step


class StopRequest:
    """Set by SIGUSR1 (sent ahead of a time limit or preemption); ranks act on it together."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def _agree(clock: SaveClock, stop: StopRequest, step: int, device) -> tuple[bool, bool]:
    """(save due, stop requested) as agreed by all ranks: a time-based save or a signal seen by one
    rank only would otherwise leave the others waiting in the save's collectives."""
    save_due, stop_requested = _all_reduce([float(clock.due(step)), float(stop.requested)], device)
    return save_due > 0, stop_requested > 0


@dataclass
class Data:
    loader: MicroBatchLoader
    eval_loader: MicroBatchLoader | None
    mean_text_tokens: int


@dataclass
class Examples:
    train: list[Example]
    eval: list[Example] | None
    num_visual_tokens: int  # per example (one image each), included in every example's num_tokens

    @property
    def mean_text_tokens(self) -> int:
        return int(sum(e.num_tokens for e in self.train) / len(self.train)) - self.num_visual_tokens

    @property
    def min_text_tokens(self) -> int:
        return min(e.num_tokens for e in self.train) - self.num_visual_tokens

    @property
    def max_tokens(self) -> int:
        return max(e.num_tokens for e in self.train)


def load_examples(spec: PretrainSpec | FinetuneSpec, stage, say) -> Examples:
    """The validated train (and, if evaluated, held-out) examples, with the data report printed."""
    root, cos_config = Path(spec.data.root), stage.cos_config

    def examples(name: str, max_bad_fraction: float):
        found, report = build_examples(root / name, root, stage.tokenizer, cos_config.num_visual_tokens,
                                       spec.data.max_text_tokens, max_bad_fraction)
        say(f"[{spec.stage}] data: {report.summary()}")
        return found

    evaluated = spec.data.eval is not None and spec.eval.every_steps
    return Examples(examples(spec.data.train, spec.data.max_bad_fraction),
                    examples(spec.data.eval, 1.0) if evaluated else None, cos_config.num_visual_tokens)


def build_data(spec: PretrainSpec | FinetuneSpec, stage, examples: Examples, dist_info, budget: int) -> Data:
    """This rank's token-budgeted stream of the train examples (+ the held-out stream, if any)."""

    def stream(found, rank: int, world_size: int, num_workers: int) -> MicroBatchLoader:
        return MicroBatchLoader(
            found, image_root=Path(spec.data.root), image_size=stage.cos_config.image_size,
            pad_token_id=stage.tokenizer.pad_token_id, tokens_per_micro_batch=budget, seed=spec.run.seed,
            rank=rank, world_size=world_size, num_workers=num_workers,
        )

    loader = stream(examples.train, dist_info.rank, dist_info.world_size, spec.data.num_workers)
    # Every rank evaluates the same batches: a held-out set may be smaller than one micro-batch per
    # rank, and ZeRO-3 forwards are collective, so all ranks must run the same count.
    eval_loader = stream(examples.eval, 0, 1, 0) if examples.eval is not None else None
    return Data(loader, eval_loader, examples.mean_text_tokens)


def resolve_budget(spec: PretrainSpec | FinetuneSpec, engine, stage, examples: Examples, device, say) -> int:
    """The spec's token budget, or with `auto` the probed one (never below the longest example)."""
    if spec.batch.tokens_per_micro_batch != "auto":
        return spec.batch.tokens_per_micro_batch
    probe = probe_micro_batch(engine, stage.cos_config, examples.min_text_tokens,
                              memory_fraction=spec.batch.memory_fraction,
                              max_tokens=spec.batch.max_tokens_per_micro_batch, device=device)
    say(f"[{spec.stage}] {probe.summary()}")
    return max(probe.tokens_per_micro_batch, examples.max_tokens)


def build(spec: PretrainSpec | FinetuneSpec, output: str, run_dir: Path, dist_info, say):
    """Stage (model, tokenizer, artefacts), data and the DeepSpeed engine; checks the trainable set."""
    stage = prepare_stage(spec, output, run_dir / "staging", dist_info)
    examples = load_examples(spec, stage, say)
    budget = spec.batch.tokens_per_micro_batch
    # DeepSpeed uses the micro-batch size only for its batch bookkeeping; auto is probed on the engine.
    micro_estimate = 1 if budget == "auto" else samples_per_micro_batch(
        stage.cos_config.num_visual_tokens, examples.mean_text_tokens, budget)
    engine, scheduler, _ = build_engine(stage.model, spec, dist_info, max(1, micro_estimate))
    trainable = trainable_summary(engine.module)
    say(f"[{spec.stage}] trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in sorted(trainable.items())))
    if set(trainable) != expected_trainable_groups(spec):
        raise RuntimeError(f"trainable modules {sorted(trainable)} differ from the spec's "
                           f"{sorted(expected_trainable_groups(spec))}")
    budget = resolve_budget(spec, engine, stage, examples, dist_info.device, say)
    data = build_data(spec, stage, examples, dist_info, budget)
    return stage, data, engine, scheduler, trainable


def run_training(
    spec: PretrainSpec | FinetuneSpec, *, run_dir: Path, output: str, resume: str = "auto", overwrite: bool = False
) -> dict:
    dist_info = init_distributed()
    run_dir, device = Path(run_dir), dist_info.device
    say = print if dist_info.is_main else (lambda *a, **k: None)
    stage, data, engine, scheduler, trainable = build(spec, output, run_dir, dist_info, say)
    resumer = Resumer(spec, output, run_dir / "staging", dist_info, stage.write_trainable)
    step = resumer.restore(engine, data.loader, resume, overwrite, say)
    sink = MetricsSink(run_dir, spec.optim.num_steps, step, spec.stage) if dist_info.is_main else None
    sample_flops, peak = flops_per_sample(stage.cos_config, data.mean_text_tokens), peak_tflops(device)
    clock, stopper = SaveClock(spec.checkpoint.every_steps, spec.checkpoint.every_minutes), StopRequest()
    evaluate = (lambda: eval_loss(engine, data.eval_loader, spec.eval.num_batches, device)) if data.eval_loader else None
    first_eval = evaluate() if evaluate and step == 0 else None
    if sink and first_eval is not None:
        sink.log({"step": 0, "eval_loss": first_eval})
    losses, timings = [], []  # per step: loss; (samples, seconds)
    engine.train()
    while step < spec.optim.num_steps:
        step += 1
        lr, started = scheduler.get_last_lr()[0], time.monotonic()
        stats = train_step(engine, data.loader, spec.batch.gradient_accumulation, device)
        elapsed = time.monotonic() - started
        losses.append(stats.loss)
        timings.append((stats.num_samples, elapsed))
        record = _step_record(step, stats, lr, elapsed, engine, sample_flops, peak, dist_info.world_size)
        if evaluate and step % spec.eval.every_steps == 0:
            record["eval_loss"] = evaluate()
        if sink:
            sink.log(record)
        save_due, stop_requested = _agree(clock, stopper, step, device)
        if step < spec.optim.num_steps and (save_due or stop_requested):
            resumer.save(engine, data.loader, step, wait=stop_requested)
            clock.saved()
        if stop_requested and step < spec.optim.num_steps:
            _close(resumer, sink)
            raise Preempted(step)
    final_eval = evaluate() if evaluate else None
    resumer.save(engine, data.loader, step, wait=True)
    artefact = stage.write_final(engine)
    _close(resumer, sink)
    summary = {
        "stage": spec.stage, "visual_tokens": stage.cos_config.num_visual_tokens,
        "image_size": stage.cos_config.image_size, "steps": step, **_loss_ends(losses),
        "first_eval_loss": first_eval, "final_eval_loss": final_eval, "samples_per_s": _mean_rate(timings),
        "train_time_s": sum(t for _, t in timings), "trainable_params": trainable,
        "world_size": dist_info.world_size, "tokens_per_micro_batch": data.loader.tokens_per_micro_batch,
        "checkpoint": f"{output.rstrip('/')}/checkpoints/{checkpoint_name(step)}",
        "artefact": artefact,
    }
    if dist_info.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    engine.destroy()
    return summary


def _step_record(step, stats: StepStats, lr, elapsed, engine, sample_flops, peak, world_size) -> dict:
    tflops = stats.num_samples * sample_flops / elapsed / 1e12
    return {
        "step": step, "loss": stats.loss, "lr": lr, "grad_norm": _grad_norm(engine),
        "samples": stats.num_samples, "tokens": stats.num_tokens, "step_time_s": elapsed,
        "samples_per_s": stats.num_samples / elapsed, "tokens_per_s": stats.num_tokens / elapsed,
        "tflops": tflops, "mfu": tflops / (peak * world_size) if peak else None,
    }


def _close(resumer: Resumer, sink: MetricsSink | None) -> None:
    resumer.close()
    if sink:
        sink.close()


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def _loss_ends(losses: list[float]) -> dict:
    """Mean training loss of the first and last few steps (single steps are noisy with small
    token-budgeted batches)."""
    if not losses:
        return {"first_loss": None, "final_loss": None, "loss_window": 0}
    window = max(1, min(5, len(losses) // 4))
    return {"first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window,
            "loss_window": window}


def _mean_rate(timings: list[tuple[int, float]]) -> float | None:
    """Samples/s over this run's steps, skipping the first (warm-up) step when there are others."""
    timed = timings[1:] or timings
    seconds = sum(t for _, t in timed)
    return sum(n for n, _ in timed) / seconds if seconds else None
