"""Optimizer steps of a fixed number of samples, cut into token-budget micro-batches (docs/design.md §5).

What an optimizer step sees is set by `batch.samples_per_step` alone (the global batch, over all
ranks), so a 32-token stage takes as many steps per epoch as a 336-token one; the token budget only
decides how those samples are split into micro-batches, and therefore how many accumulation passes a
rank makes in a step (which may vary from step to step):

    epoch e:  shuffle the examples with (seed, e) -> consecutive steps of `samples_per_step` samples
              (a last partial step is dropped)
    step:     its samples dealt to the ranks, longest first, each to the rank with the fewest tokens
              -> on each rank: sorted by length and cut into micro-batches of at most
              `tokens_per_micro_batch` padded tokens (longest x count)
              -> every rank runs as many micro-batches as the busiest rank (it splits its fullest
              ones, or runs a label-free filler): ZeRO-3 forwards are collective

Everything is a pure function of (lengths, seed, epoch, step, world size, budget), so every rank knows
the whole step without talking to the others, and a run resumed on another world size sees the same
samples in the same steps. The position `{epoch, step}` (steps read in the epoch) is what a checkpoint
stores, with the budget and the samples per step it was read under.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cos_model import IGNORE_INDEX

from .data import Example, collate, load_image, resolve_image_path
from .errors import DataError


@dataclass(frozen=True)
class MicroBatch:
    """Example indices run in one forward/backward pass; a `filler` pass trains nothing (all labels
    ignored) and exists so that this rank takes part in as many collectives as the others."""

    indices: tuple[int, ...]
    filler: bool = False


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The examples' order in `epoch`: a seeded shuffle, the same on every rank."""
    order = list(range(num_examples))
    random.Random(f"cosctl-order:{seed}:{epoch}").shuffle(order)
    return order


def fill_micro_batches(indices: Sequence[int], lengths: Sequence[int], tokens_per_micro_batch: int) -> list[list[int]]:
    """Cut `indices`, in order, into micro-batches whose padded size `max_len * num_samples` fits."""
    micro_batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in indices:
        if lengths[index] > tokens_per_micro_batch:
            raise DataError(f"example {index} has {lengths[index]} tokens, more than tokens_per_micro_batch="
                            f"{tokens_per_micro_batch}: raise batch.tokens_per_micro_batch or lower "
                            "data.max_text_tokens")
        if batch and max(longest, lengths[index]) * (len(batch) + 1) > tokens_per_micro_batch:
            micro_batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, lengths[index])
    return micro_batches + [batch] if batch else micro_batches


def deal_to_ranks(indices: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest first, each sample to the rank holding the fewest tokens so far (ties: lowest rank)."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(indices, key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(index)
        loads[rank] += lengths[index]
    return shares


def split_step(indices: Sequence[int], lengths: Sequence[int], world_size: int,
              tokens_per_micro_batch: int) -> list[list[MicroBatch]]:
    """Every rank's micro-batches for one optimizer step over `indices` (pure; see the module doc)."""
    per_rank = []
    for share in deal_to_ranks(indices, lengths, world_size):
        ordered = sorted(share, key=lambda i: (lengths[i], i))
        per_rank.append([list(batch) for batch in fill_micro_batches(ordered, lengths, tokens_per_micro_batch)])
    target = max(len(batches) for batches in per_rank)
    plans = []
    for batches in per_rank:
        while len(batches) < target and any(len(batch) > 1 for batch in batches):
            fullest = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
            batch = batches.pop(fullest)
            batches[fullest:fullest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        plan = [MicroBatch(tuple(batch)) for batch in batches]
        if len(plan) < target:
            # Nothing left to split: repeat this rank's shortest sample (or the step's), trained on nothing.
            shortest = min(indices, key=lambda i: (lengths[i], i)) if not batches else batches[0][0]
            plan += [MicroBatch((shortest,), filler=True)] * (target - len(plan))
        plans.append(plan)
    return plans


def samples_per_micro_batch(num_visual_tokens: int, num_text_tokens: int, tokens_per_micro_batch: int) -> int:
    """How many samples of this length fit a micro-batch of `tokens_per_micro_batch` padded tokens."""
    sample_length = num_visual_tokens + num_text_tokens
    if sample_length <= 0 or tokens_per_micro_batch <= 0:
        raise ValueError(f"lengths and budget must be positive, got {sample_length} and {tokens_per_micro_batch}")
    return tokens_per_micro_batch // sample_length


def steps_per_epoch(num_examples: int, samples_per_step: int) -> int:
    return num_examples // samples_per_step


class MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by a `MicroBatch`, so DataLoader workers load and collate whole
    micro-batches while the main process keeps the order."""

    def __init__(self, examples: Sequence[Example], root: str | Path | None, image_size: int, pad_token_id: int):
        self.examples = examples
        self.image_root = root or ""
        self.image_size = image_size
        self.pad_token_id = pad_token_id

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        chosen = [self.examples[index] for index in micro_batch.indices]
        images = [load_image(resolve_image_path(self.image_root, example.image_path), self.image_size)
                  for example in chosen]
        batch = collate(chosen, images, self.pad_token_id)
        if micro_batch.filler:
            batch["labels"].fill_(IGNORE_INDEX)
        batch["num_samples"] = 0 if micro_batch.filler else len(chosen)
        return batch


class StepLoader:
    """Endless, rank-aware, resumable stream of optimizer steps: `next_step()` gives this rank's
    micro-batches of the next step (collated: input_ids, labels, attention_mask, pixel_values and
    `num_samples`). Epochs follow one another; the position is `{epoch, step}`."""

    def __init__(self, examples: Sequence[Example], *, image_root: str | Path | None, image_size: int,
                 pad_token_id: int, tokens_per_micro_batch: int, samples_per_step: int, seed: int, rank: int,
                 world_size: int, num_workers: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if samples_per_step < world_size:
            raise DataError(f"batch.samples_per_step={samples_per_step} is smaller than the {world_size} ranks; "
                            "each rank needs at least one sample per step")
        if steps_per_epoch(len(examples), samples_per_step) < 1:
            raise DataError(f"{len(examples)} examples are fewer than batch.samples_per_step={samples_per_step}: "
                            "not one optimizer step per epoch")
        self.dataset = MicroBatchDataset(examples, image_root, image_size, pad_token_id)
        self.lengths = [example.num_tokens for example in examples]
        self.tokens_per_micro_batch, self.samples_per_step = tokens_per_micro_batch, samples_per_step
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.epoch, self.step = 0, 0
        self._iterator: Iterator[dict] | None = None
        self._order: tuple[int, list[int]] | None = None
        self._plans: dict[tuple[int, int], list[list[MicroBatch]]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.lengths), self.samples_per_step)

    def step_micro_batches(self, epoch: int, step: int) -> list[list[MicroBatch]]:
        """Every rank's micro-batches of step `step` of `epoch` (the last few are cached: the stream
        plans ahead of the step being trained when workers prefetch)."""
        if (epoch, step) not in self._plans:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, epoch_order(len(self.lengths), self.seed, epoch))
            chosen = self._order[1][step * self.samples_per_step : (step + 1) * self.samples_per_step]
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[epoch, step] = split_step(chosen, self.lengths, self.world_size, self.tokens_per_micro_batch)
        return self._plans[epoch, step]

    def _epoch_stream(self) -> Iterator[dict]:
        """This rank's collated micro-batches from the current position to the end of the epoch."""
        epoch, first = self.epoch, self.step
        items = (micro for step in range(first, self.steps_per_epoch) for micro in self.step_micro_batches(epoch, step)[self.rank])
        if self.num_workers == 0:
            return (self.dataset[micro] for micro in items)
        # batch_size=None: each sampler item is already a whole micro-batch, collated in the worker.
        return iter(DataLoader(self.dataset, sampler=items, batch_size=None, num_workers=self.num_workers))

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._iterator = self._epoch_stream()
        count = len(self.step_micro_batches(self.epoch, self.step)[self.rank])
        micro_batches = [next(self._iterator) for _ in range(count)]
        self.step += 1
        return micro_batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "tokens_per_micro_batch": self.tokens_per_micro_batch,
                "samples_per_step": self.samples_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position, with the budget it was read under (the micro-batches of a
        step depend on it). The samples per step must be the spec's: they are the optimisation."""
        if "step" not in state or "samples_per_step" not in state:
            raise DataError(f"loader state {state} predates batch.samples_per_step (steps were sized by the token "
                            "budget): this checkpoint cannot continue under the new batching; start a new run")
        if int(state["samples_per_step"]) != self.samples_per_step:
            raise DataError(f"the checkpoint was trained with batch.samples_per_step={state['samples_per_step']}, "
                            f"this run has {self.samples_per_step}: the optimisation would change")
        budget = int(state["tokens_per_micro_batch"])
        if budget < 1:
            raise DataError(f"loader state {state}: tokens_per_micro_batch must be positive")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise DataError(f"loader state {state} is outside the {self.steps_per_epoch} steps of an epoch")
        if budget != self.tokens_per_micro_batch:
            self.tokens_per_micro_batch, self._plans = budget, {}
        self.epoch, self.step, self._iterator = epoch, step, None


def eval_micro_batches(examples: Sequence[Example], tokens_per_micro_batch: int, num_batches: int) -> list[MicroBatch]:
    """The first `num_batches` micro-batches of the held-out examples in file order: the same on
    every rank and at every evaluation."""
    lengths = [example.num_tokens for example in examples]
    batches = fill_micro_batches(range(len(examples)), lengths, tokens_per_micro_batch)
    return [MicroBatch(tuple(batch)) for batch in batches[:num_batches]]
