"""The training loop of the pretrain and finetune stages.

    run = setup_run(spec)                 # process group, output store, stage, data, engine, checkpointer
    restored = checkpointer.restore()     # --resume auto: newest committed checkpoint / URI / never
    budget = checkpoint's | spec's | probed (auto)      # tokens per micro-batch, and where they came from
    while step < num_steps:
        step += 1
        micro-batches = loader.next_step()  # this rank's share of the step's samples_per_step samples
        train_step(): for each micro-batch: forward -> engine.backward (loss summed over tokens, divided
                      by the step's label tokens over all ranks); engine.step() after the last one
        log the step: loss, lr, grad norm, samples/s, tokens/s, TFLOP/s, MFU   # rank 0
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

from cos_model import IGNORE_INDEX

from .checkpoint import checkpoint_name, checkpoint_uri
from .checkpointer import SaveClock
from .dist import all_reduce, any_rank
from .log import log
from .metrics import MetricsSink, flops_per_sample, peak_tflops
from .run import Run, choose_budget, setup_run
from .spec import TrainingSpec
from .storage import join_uri


def run_training(spec: TrainingSpec, *, run_dir: Path, output: str, resume: str = "auto",
                 overwrite: bool = False) -> dict:
    """Train one stage to `spec.optim.num_steps`; return (and, on rank 0, write) its summary."""
    run = setup_run(spec, run_dir=Path(run_dir), output=output)
    restored = run.checkpointer.restore(run.engine, resume, overwrite)
    budget = choose_budget(run, restored)
    loader = run.train_loader(budget, position=restored.loader_state if restored else None)
    log.info(f"{spec.batch.samples_per_step} samples per step, {loader.steps_per_epoch} steps per epoch; "
             f"{budget.tokens} tokens per micro-batch (from the {budget.origin})")
    step = restored.step if restored else 0
    evaluate = Evaluator(run, budget)
    sink = MetricsSink(run.run_dir, spec.optim.num_steps, step, spec.stage) if run.dist.is_main else None
    meter = StepMeter(run, flops_per_sample(run.stage.cos_config, run.lengths.mean_text_tokens))
    clock, stop = SaveClock(spec.checkpoint.every_steps, spec.checkpoint.every_minutes), StopRequest()
    first_eval = evaluate() if step == 0 else None
    if sink and first_eval is not None:
        sink.log({"step": 0, "eval_loss": first_eval})
    run.engine.train()
    while step < spec.optim.num_steps:
        step += 1
        lr, started = run.scheduler.get_last_lr()[0], time.monotonic()
        stats = train_step(run.engine, loader.next_step(), run.dist.device)
        record = meter.record(step, stats, lr, time.monotonic() - started)
        if evaluate.due(step):
            record["eval_loss"] = evaluate()
        if sink:
            sink.log(record)
        save_due, stop_requested = any_rank([clock.due(step), stop.requested], run.dist.device)
        if step < spec.optim.num_steps and (save_due or stop_requested):
            run.checkpointer.save(run.engine, loader.state_dict(), step, wait=stop_requested)
            clock.saved()
        if stop_requested and step < spec.optim.num_steps:
            _close(run, sink)
            raise Preempted(step)
    final_eval = evaluate()
    run.checkpointer.save(run.engine, loader.state_dict(), step, wait=True)
    artefact = join_uri(output, run.stage.write_final(run.engine))
    _close(run, sink)
    summary = {
        "stage": spec.stage, "visual_tokens": run.stage.cos_config.num_visual_tokens,
        "image_size": run.stage.cos_config.image_size, "steps": step, **meter.loss_ends(),
        "first_eval_loss": first_eval, "final_eval_loss": final_eval, "samples_per_s": meter.mean_rate(),
        "train_time_s": meter.train_time_s(), "trainable_params": run.trainable,
        "world_size": run.dist.world_size, "tokens_per_micro_batch": budget.tokens, "budget_origin": budget.origin,
        "checkpoint": checkpoint_uri(output, checkpoint_name(step)), "artefact": artefact,
    }
    if run.dist.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    run.engine.destroy()
    return summary


@dataclass
class StepStats:
    loss: float  # mean over the step's label tokens, all ranks
    num_samples: int  # over all ranks
    num_tokens: int  # non-padding tokens over all ranks
    num_label_tokens: int
    num_micro_batches: int  # this rank's, the same on every rank


def num_label_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss: labels other than IGNORE_INDEX after the causal shift (the first
    position predicts nothing), exactly as transformers' causal-LM loss counts them."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def train_step(engine, micro_batches: list[dict], device) -> StepStats:
    """One optimizer step over this rank's micro-batches of the step (`accumulate`, then the update)."""
    stats = accumulate(engine, micro_batches, device)
    engine.step()
    return stats


def accumulate(engine, micro_batches: list[dict], device) -> StepStats:
    """Forward and backward over this rank's micro-batches of a step, leaving the step's gradient.

    Every token of the step weighs the same, whichever micro-batch or rank it is in: each micro-batch's
    loss is its sum over tokens divided by the label tokens of the whole step (all ranks), times the
    world size, because DeepSpeed averages gradients over ranks. That is transformers'
    `num_items_in_batch`. The last micro-batch is marked as the accumulation boundary.
    """
    world_size = torch.distributed.get_world_size()
    local = [sum(num_label_tokens(b["labels"]) for b in micro_batches), sum(b["num_samples"] for b in micro_batches),
             # A packed row (batch.packing) has no attention mask and no padding.
             sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in micro_batches)]
    step_labels, num_samples, num_tokens = all_reduce(local, device)
    per_rank_items = torch.tensor(max(step_labels, 1.0) / world_size, device=device)
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "num_samples"}
        # No KV cache in training: with one, transformers ignores a packed row's position ids and lets
        # its samples attend to each other (batch.packing).
        loss = engine(**inputs, num_items_in_batch=per_rank_items, use_cache=False).loss
        engine.backward(loss)
        loss_sum += loss.item()
    total = all_reduce([loss_sum], device)[0] / world_size
    return StepStats(total, int(num_samples), int(num_tokens), int(step_labels), len(micro_batches))


class Evaluator:
    """Mean loss per label token over the first `eval.num_batches` held-out micro-batches (the same
    batches on every rank, every time); calling it without held-out data returns None."""

    def __init__(self, run: Run, budget):
        self.engine, self.device = run.engine, run.dist.device
        self.every = run.spec.eval.every_steps
        self.batches = run.eval_batches(budget)

    def due(self, step: int) -> bool:
        return bool(self.batches) and step % self.every == 0

    @torch.no_grad()
    def __call__(self) -> float | None:
        if not self.batches:
            return None
        self.engine.eval()
        total, count = 0.0, 0
        for batch in self.batches:
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "num_samples"}
            total += self.engine(**inputs, num_items_in_batch=torch.tensor(1.0)).loss.item()
            count += num_label_tokens(batch["labels"])
        self.engine.train()
        return total / max(count, 1)


class StepMeter:
    """Per-step records (throughput, FLOP rate, MFU) and the run's loss and speed summary."""

    def __init__(self, run: Run, sample_flops: float):
        self.engine, self.world_size = run.engine, run.dist.world_size
        self.sample_flops, self.peak = sample_flops, peak_tflops(run.dist.device)
        self.losses: list[float] = []
        self.timings: list[tuple[int, float]] = []  # (samples, seconds) per step

    def record(self, step: int, stats: StepStats, lr: float, elapsed: float) -> dict:
        self.losses.append(stats.loss)
        self.timings.append((stats.num_samples, elapsed))
        tflops = stats.num_samples * self.sample_flops / elapsed / 1e12
        norm = self.engine.get_global_grad_norm()
        return {
            "step": step, "loss": stats.loss, "lr": lr, "grad_norm": float(norm) if norm is not None else None,
            "samples": stats.num_samples, "tokens": stats.num_tokens, "label_tokens": stats.num_label_tokens,
            "micro_batches": stats.num_micro_batches, "step_time_s": elapsed,
            "samples_per_s": stats.num_samples / elapsed, "tokens_per_s": stats.num_tokens / elapsed,
            "tflops": tflops, "mfu": tflops / (self.peak * self.world_size) if self.peak else None,
        }

    def loss_ends(self) -> dict:
        """Mean training loss of the first and last few steps (single steps are noisy with small
        token-budgeted batches)."""
        if not self.losses:
            return {"first_loss": None, "final_loss": None, "loss_window": 0}
        window = max(1, min(5, len(self.losses) // 4))
        return {"first_loss": sum(self.losses[:window]) / window, "final_loss": sum(self.losses[-window:]) / window,
                "loss_window": window}

    def mean_rate(self) -> float | None:
        """Samples/s over this run's steps, skipping the first (warm-up) step when there are others."""
        timed = self.timings[1:] or self.timings
        seconds = sum(t for _, t in timed)
        return sum(n for n, _ in timed) / seconds if seconds else None

    def train_time_s(self) -> float:
        return sum(t for _, t in self.timings)


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


def _close(run: Run, sink: MetricsSink | None) -> None:
    run.checkpointer.close()
    if sink:
        sink.close()
