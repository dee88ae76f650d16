"""The training loop of the pretrain and finetune stages.

run = setup_run(spec)                 # process group, output store, stage, data, engine, checkpointer
restored = checkpointer.restore()     # --resume auto: newest committed checkpoint / URI / never;
                                      # its data pin must match (or --new-data: a new data order)
budget = checkpoint's | spec's | probed (auto)      # tokens per micro-batch, and where they came from
while step < num_steps:
    step += 1
    micro-batches = loader.next_step()  # this rank's share of the step's samples_per_step samples
    share bad samples: images that failed on any rank join the run's skip list (data.max_bad_fraction)
    train_step(): for each micro-batch: forward -> engine.backward (loss summed over tokens, divided
                  by the step's label tokens over all ranks); engine.step() after the last one
    log the step: loss, lr, grad norm, samples/s, tokens/s, TFLOP/s, MFU, HFU  # FLOPs of its own batches
    if eval due: mean eval loss over a fixed set of held-out micro-batches, also with swapped images
    stop = agreed by all ranks: the store failed past its outage limit or staging ran out of disk
           (exit 75), SIGUSR1 (save, exit 75: the scheduler requeues), SIGTERM / Ctrl-C (exit 143 / 130;
           an upload under way may commit within storage.stop_grace_s)
    if a save is due (every N steps / M minutes), or a stop asks for one: checkpoint
    if stop: raise Stopped (the CLI prints the last committed checkpoint and how to continue)
final checkpoint -> stage artefact (model folder or peft adapter) -> summary.json -> the trackers'
runs end (rank 0 logs every record to them beside metrics.jsonl: `cosctl.train.tracking`)
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.checkpointer import SaveClock
from ..checkpoint.layout import checkpoint_name, checkpoint_uri
from ..common.dist import agreed, all_reduce, any_rank, gather
from ..common.errors import StorageError, UserError
from ..common.log import log
from ..data.conversation import num_label_tokens
from ..spec.specs import TrainingSpec
from ..storage import join_uri
from .heldout import Evaluator, GenerationEval
from .meter import StepMeter, StepStats
from .metrics import MetricsSink
from .run import Run, choose_budget, setup_run
from .tracking import open_tracker


def run_training(
    spec: TrainingSpec,
    *,
    run_dir: Path,
    output: str,
    resume: str = "auto",
    overwrite: bool = False,
    save_on_stop: bool = False,
    new_data: bool = False,
) -> dict:
    """Train one stage to `spec.optim.num_steps`; return (and, on rank 0, write) its summary. With
    `new_data`, a checkpoint trained on other data continues on this run's from a new data order."""
    signals = StopRequest()
    run = setup_run(spec, run_dir=Path(run_dir), output=output)
    restored = run.checkpointer.restore(run.engine, resume, overwrite, run.train_examples.data_pin(), new_data)
    budget = choose_budget(run, restored)
    loader = run.train_loader(budget, position=restored.loader_state if restored else None)
    log.info(
        f"{spec.batch.samples_per_step} samples per step, {loader.steps_per_epoch} steps per epoch; "
        f"{budget.tokens} tokens per micro-batch (from the {budget.origin})"
    )
    step = restored.step if restored else 0
    evaluate, generate = Evaluator(run, budget), GenerationEval(run)
    if run.dist.is_main:
        trim_metrics(run.run_dir / "metrics.jsonl", step)
    sink = None
    if run.dist.is_main:  # the tracked runs a checkpoint names continue; each save keeps their ids
        tracker = open_tracker(spec, run.run_dir, restored.tracking if restored else None)
        run.checkpointer.tracking_ids = tracker.ids
        sink = MetricsSink(run.run_dir, spec.optim.num_steps, step, spec.stage, tracker)
    meter = StepMeter(run)
    clock = SaveClock(spec.checkpoint.every_steps, spec.checkpoint.every_minutes)
    first_eval = evaluate() if step == 0 else {}
    if sink and first_eval:
        sink.log({"step": 0, **first_eval})
    run.engine.train()
    while step < spec.optim.num_steps:
        step += 1
        lr, started = run.scheduler.get_last_lr()[0], time.monotonic()
        micro_batches, problem = _next_step(loader)
        share_bad_samples(loader, run.dist.device)
        data_time = time.monotonic() - started
        stats = train_step(run.engine, micro_batches, run.dist.device, problem)
        record = meter.record(step, stats, lr, time.monotonic() - started, data_time, micro_batches)
        record["skipped_samples"] = len(loader.bad_samples)
        if evaluate.due(step):
            record.update(evaluate())
        if generate.due(step):
            record.update(generate())
        if sink:
            sink.log(record)
        if step == spec.optim.num_steps:
            break  # the final save below
        save_due, stop = at_boundary(run, clock.due(step), signals, save_on_stop)
        if stop is not None:
            raise stop_run(run, sink, loader, step, stop)
        if save_due and run.checkpointer.save(run.engine, loader.state_dict(), step):
            clock.saved()
    final_eval = evaluate()
    if not run.checkpointer.save(run.engine, loader.state_dict(), step, wait=True):
        raise stop_run(run, sink, loader, step, Stop(run.checkpointer.stop_reason(), REQUEUE, save=False))
    try:
        artefact = join_uri(output, run.stage.write_final(run.engine, run.store, run.run_dir / "staging"))
    except StorageError as err:  # the store stayed down past its limit: requeue and publish then
        raise stop_run(run, sink, loader, step, Stop(str(err), REQUEUE, save=False)) from None
    summary = {
        "stage": spec.stage,
        "visual_tokens": run.stage.cos_config.num_visual_tokens,
        "image_size": run.stage.cos_config.image_size,
        "steps": step,
        **meter.loss_ends(),
        "first_eval_loss": first_eval.get("eval_loss"),
        "final_eval_loss": final_eval.get("eval_loss"),
        "first_eval_loss_swapped_images": first_eval.get("eval_loss_swapped_images"),
        "final_eval_loss_swapped_images": final_eval.get("eval_loss_swapped_images"),
        "samples_per_s": meter.mean_rate(),
        "train_time_s": meter.train_time_s(),
        "trainable_params": run.trainable,
        "world_size": run.dist.world_size,
        "tokens_per_micro_batch": budget.tokens,
        "budget_origin": budget.origin,
        "skipped_samples": len(loader.bad_samples),
        "checkpoint": checkpoint_uri(output, checkpoint_name(step)),
        "artefact": artefact,
    }
    if run.dist.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    _close(run, sink, summary=summary)
    run.engine.destroy()
    return summary


def train_step(engine, micro_batches: list[dict], device, problem: Exception | None = None) -> StepStats:
    """One optimizer step over this rank's micro-batches of the step (`accumulate`, then the update);
    `problem`: this rank's loader failed (every rank then raises it, before any forward)."""
    stats = accumulate(engine, micro_batches, device, problem)
    engine.step()
    return stats


def _next_step(loader) -> tuple[list[dict], Exception | None]:
    """The loader's next step, or the user error it raised (agreed over ranks in `accumulate`)."""
    try:
        return loader.next_step(), None
    except UserError as err:
        return [], err


def share_bad_samples(loader, device) -> None:
    """Every rank adds the samples whose image failed on any rank in this step to the run's skip list
    (collective: one flag per step, a gather only when some rank found one); past the allowance every
    rank raises the same DataError here, before the step's forwards."""
    found = loader.take_new_bad_samples()
    if not any_rank([bool(found)], device)[0]:
        return
    merged: dict[int, str] = {}
    for part in gather(found):
        merged.update(part)
    loader.add_bad_samples(merged)


def accumulate(engine, micro_batches: list[dict], device, problem: Exception | None = None) -> StepStats:
    """Forward and backward over this rank's micro-batches of a step, leaving the step's gradient.

    Every token of the step weighs the same, whichever micro-batch or rank it is in: each micro-batch's
    loss is its sum over tokens divided by the label tokens of the whole step (all ranks), times the
    world size, because DeepSpeed averages gradients over ranks. That is transformers'
    `num_items_in_batch`. The last micro-batch is marked as the accumulation boundary.
    """
    world_size = torch.distributed.get_world_size()
    local = [
        sum(num_label_tokens(b["labels"]) for b in micro_batches),
        sum(b["num_samples"] for b in micro_batches),
        # A packed row (batch.packing) has no attention mask and no padding.
        sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro_batches),
        float(problem is not None),
    ]
    step_labels, num_samples, num_tokens, failed = all_reduce(local, device)
    if failed:  # a rank's data failed: all stop here, before the forwards (collective under ZeRO-3)
        agreed(lambda: _raise(problem))
    per_rank_items = torch.tensor(max(step_labels, 1.0) / world_size, device=device)
    loss_sum = 0.0
    for index, batch in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        # Batches come pinned from the loader's workers on GPU: the copy overlaps the previous kernels.
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "num_samples"}
        # No KV cache in training: with one, transformers ignores a packed row's position ids and lets
        # its samples attend to each other (batch.packing).
        loss = engine(**inputs, num_items_in_batch=per_rank_items, use_cache=False).loss
        engine.backward(loss)
        loss_sum += loss.item()
    total = all_reduce([loss_sum], device)[0] / world_size
    return StepStats(total, int(num_samples), int(num_tokens), int(step_labels), len(micro_batches))


REQUEUE = 75  # EX_TEMPFAIL: the batch script (or the user) requeues the job
STOP_SAVE_TIMEOUT_S = 300.0  # a save on SIGTERM / Ctrl-C commits within this, or the run exits without it


@dataclass(frozen=True)
class Stop:
    """Why the run stops early, with which exit code, and whether it commits a checkpoint first (within
    `timeout_s`: a scheduler's warning leaves only so much time before the job is killed)."""

    reason: str
    exit_code: int
    save: bool
    timeout_s: float | None = None


class Stopped(Exception):
    """The run stopped at a step boundary before its last step (see `Stop`)."""

    def __init__(self, step: int, stop: Stop, last_committed: str):
        super().__init__(f"stopped at step {step}: {stop.reason}; last committed checkpoint: {last_committed}")
        self.step, self.exit_code = step, stop.exit_code


class StopRequest:
    """Records the signals that ask a run to stop: SIGUSR1 (SLURM's warning ahead of a time limit or
    preemption), SIGTERM and SIGINT (Ctrl-C). Ranks act on them together, at a step boundary."""

    SIGNALS = {signal.SIGUSR1: "SIGUSR1", signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self):
        self.seen: set[str] = set()
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        self.seen.add(self.SIGNALS[signum])


def at_boundary(run: Run, save_due: bool, signals: StopRequest, save_on_stop: bool) -> tuple[bool, Stop | None]:
    """(save due, stop) as all ranks agree at a step boundary (collective): a time-based save or a
    signal seen by one rank only would otherwise leave the others waiting in the save's collectives.
    A store or staging failure anywhere stops first, then a signal; None goes on."""
    failure = run.checkpointer.stop_reason()
    seen = [name in signals.seen for name in ("SIGUSR1", "SIGTERM", "SIGINT")]
    due, failed, usr1, term, interrupt = any_rank([save_due, failure is not None, *seen], run.dist.device)
    if failed:
        return due, Stop(next(r for r in gather(failure) if r), REQUEUE, save=False)
    if usr1:
        # SLURM kills the job signal_lead_s after its warning: commit within that, with a margin.
        lead = max(60.0, run.spec.slurm.signal_lead_s - 60.0)
        return due, Stop("SIGUSR1 (the scheduler's warning); the job requeues", REQUEUE, save=True, timeout_s=lead)
    if term or interrupt:
        return due, Stop(
            "SIGTERM" if term else "SIGINT (Ctrl-C)",
            143 if term else 130,
            save=save_on_stop or due,
            timeout_s=STOP_SAVE_TIMEOUT_S,
        )
    return due, None


def stop_run(run: Run, sink: MetricsSink | None, loader, step: int, stop: Stop) -> Stopped:
    """End the run at this boundary: commit first when the stop asks for it (within its time), or else,
    for SIGTERM / Ctrl-C, let an upload under way commit (within `storage.stop_grace_s`); then stop
    uploading. The exception says why, with the last committed checkpoint."""
    if stop.save and not run.checkpointer.save(
        run.engine, loader.state_dict(), step, wait=True, timeout_s=stop.timeout_s
    ):
        stop = Stop(
            f"{stop.reason}; its checkpoint was not committed ({run.checkpointer.stop_reason()})",
            stop.exit_code,
            save=False,
        )
    elif not stop.save and stop.exit_code in (130, 143) and run.spec.storage.stop_grace_s > 0:
        # No save due: an upload already under way may still commit (within storage.stop_grace_s)
        # instead of being deleted with the staging folder.
        waited = run.checkpointer.finish_uploads(run.spec.storage.stop_grace_s)
        stop = Stop(f"{stop.reason}; {waited}", stop.exit_code, save=False) if waited else stop
    last = run.checkpointer.last_committed() if run.dist.is_main else ""
    _close(run, sink, abandon=True)
    return Stopped(step, stop, last)


def _raise(problem: Exception | None) -> None:
    if problem is not None:
        raise problem


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records past `step` from a resumed run's metrics.jsonl, so each step appears once
    (the steps after the checkpoint are trained again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def _close(run: Run, sink: MetricsSink | None, abandon: bool = False, summary: dict | None = None) -> None:
    run.checkpointer.close(abandon=abandon)
    if sink:
        sink.close(summary)  # the trackers' runs end completed with a summary, else stopped early
