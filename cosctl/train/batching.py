"""Optimizer steps of a fixed number of samples, cut into token-budget micro-batches (docs/design.md §5).

What an optimizer step sees is set by `batch.samples_per_step` alone (the global batch, over all
ranks), so a 32-token stage takes as many steps per epoch as a 336-token one; the token budget only
decides how those samples are split into micro-batches, and therefore how many accumulation passes a
rank makes in a step (which may vary from step to step):

    epoch e:  permute the records with (seed, e) -> consecutive steps of `samples_per_step` samples
              (a last partial step is dropped)
    step:     its samples dealt to the ranks, longest first, each to the rank with the fewest tokens
              -> on each rank: sorted by length and cut into micro-batches of at most
              `tokens_per_micro_batch` padded tokens (longest x count), or, with `batch.packing`,
              packed first-fit-decreasing into rows of at most that many tokens
              -> every rank runs as many micro-batches as the busiest rank (it splits its fullest
              ones, or runs a label-free filler): ZeRO-3 forwards are collective

Everything is a pure function of (lengths, seed, epoch, step, world size, budget, packing), so every
rank knows the whole step without talking to the others, and a run resumed on another world size sees
the same samples in the same steps. The position `{epoch, step}` (steps read in the epoch) is what a
checkpoint stores, with the budget and the samples per step it was read under, the data it was read
from (`data_pin()`: the number of records and the data key) and the skip list.

The loader that reads the steps (records -> micro-batches, in workers, with a position to save) is
`cosctl.train.loader`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..common.errors import DataError

ORDER = "pcg64-v1"  # how an epoch's order is drawn; checkpoints without it used `legacy_epoch_order`


@dataclass(frozen=True)
class MicroBatch:
    """Example indices run in one forward/backward pass; a `filler` pass trains nothing (all labels
    ignored) and exists so that this rank takes part in as many collectives as the others."""

    indices: tuple[int, ...]
    filler: bool = False


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The examples' order in `epoch`: a seeded permutation (int64), the same on every rank."""
    digest = hashlib.sha256(f"cosctl-order:{seed}:{epoch}".encode()).digest()
    generator = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return generator.permutation(num_examples)


def legacy_epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of checkpoints written before `ORDER` (a Python list shuffle), for exact resume."""
    order = list(range(num_examples))
    random.Random(f"cosctl-order:{seed}:{epoch}").shuffle(order)
    return order


def _check_fits(index: int, length: int, tokens_per_micro_batch: int) -> None:
    if length > tokens_per_micro_batch:
        raise DataError(
            f"example {index} has {length} tokens, more than tokens_per_micro_batch="
            f"{tokens_per_micro_batch}: raise batch.tokens_per_micro_batch or lower "
            "data.max_text_tokens"
        )


def longest_sample(records) -> tuple[int, int]:
    """(index, tokens) of the longest sample of a record set, visual tokens included (the first of
    equals)."""
    lengths = np.asarray(records.lengths)
    index = int(np.argmax(lengths))
    return index, int(lengths[index])


def check_budget_fits(records, tokens_per_micro_batch: int, setting: str, split: str) -> None:
    """Refuse a token budget below the longest sample before any step runs: a sample is never split
    across micro-batches, so the step holding it could not run (it may come hours in)."""
    index, tokens = longest_sample(records)
    if tokens > tokens_per_micro_batch:
        raise DataError(
            f"{split}: the longest sample, {records.record_id(index)!r}, has {tokens} tokens (visual tokens "
            f"included), more than {setting}={tokens_per_micro_batch}: raise {setting} to at least {tokens} "
            "or lower data.max_text_tokens"
        )


def fill_micro_batches(indices: Sequence[int], lengths: Sequence[int], tokens_per_micro_batch: int) -> list[list[int]]:
    """Cut `indices`, in order, into micro-batches whose padded size `max_len * num_samples` fits."""
    micro_batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in indices:
        length = int(lengths[index])
        _check_fits(index, length, tokens_per_micro_batch)
        if batch and max(longest, length) * (len(batch) + 1) > tokens_per_micro_batch:
            micro_batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, length)
    return micro_batches + [batch] if batch else micro_batches


def pack_micro_batches(indices: Sequence[int], lengths: Sequence[int], tokens_per_micro_batch: int) -> list[list[int]]:
    """First-fit decreasing: longest first, each sample into the first row with room, rows of at most
    `tokens_per_micro_batch` tokens in all (no padding). Rows in order of creation."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(indices, key=lambda i: (-int(lengths[i]), i)):
        length = int(lengths[index])
        _check_fits(index, length, tokens_per_micro_batch)
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(tokens_per_micro_batch)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


def deal_to_ranks(indices: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest first, each sample to the rank holding the fewest tokens so far (ties: lowest rank)."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(indices, key=lambda i: (-int(lengths[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(index)
        loads[rank] += int(lengths[index])
    return shares


def split_step(
    indices: Sequence[int], lengths: Sequence[int], world_size: int, tokens_per_micro_batch: int, packing: bool = False
) -> list[list[MicroBatch]]:
    """Every rank's micro-batches for one optimizer step over `indices` (pure; see the module doc)."""
    indices = [int(i) for i in indices]
    step_lengths = {i: int(lengths[i]) for i in indices}
    per_rank = []
    for share in deal_to_ranks(indices, step_lengths, world_size):
        if packing:
            per_rank.append(pack_micro_batches(share, step_lengths, tokens_per_micro_batch))
        else:
            ordered = sorted(share, key=lambda i: (step_lengths[i], i))
            per_rank.append(fill_micro_batches(ordered, step_lengths, tokens_per_micro_batch))
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
            shortest = min(indices, key=lambda i: (step_lengths[i], i)) if not batches else batches[0][0]
            plan += [MicroBatch((shortest,), filler=True)] * (target - len(plan))
        plans.append(plan)
    return plans


def padding_fraction(micro_batches: Sequence[MicroBatch], lengths: Sequence[int], packing: bool) -> float:
    """Share of the computed token positions that are padding (0 for packed rows)."""
    real = padded = 0
    for micro in micro_batches:
        sizes = [int(lengths[i]) for i in micro.indices]
        real += sum(sizes)
        padded += sum(sizes) if packing else max(sizes) * len(sizes)
    return 1.0 - real / padded if padded else 0.0


# --- records ---------------------------------------------------------------------------------------


def eval_micro_batches(examples, tokens_per_micro_batch: int, num_batches: int) -> list[MicroBatch]:
    """The first `num_batches` micro-batches of the held-out examples in file order: the same on
    every rank and at every evaluation."""
    lengths = examples.lengths if hasattr(examples, "lengths") else [example.num_tokens for example in examples]
    batches = fill_micro_batches(range(len(lengths)), lengths, tokens_per_micro_batch)
    return [MicroBatch(tuple(batch)) for batch in batches[:num_batches]]
