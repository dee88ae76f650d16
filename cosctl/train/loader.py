"""This rank's stream of optimizer steps (`StepLoader`): the steps `cosctl.train.batching` plans, read as
collated micro-batches, in DataLoader workers when there are, with the position a checkpoint saves.

Records come as a list of `cosctl.data.records.Example`s or as a prepared store
(`cosctl.data.tokenstore.StoreRecords`); the loader keeps only an array of lengths (one int32 per record)
and builds each micro-batch from the records when it is loaded, in DataLoader workers when there are.

A sample whose image cannot be read at run time is kept in its micro-batch with its labels ignored
and a blank image (a label-free filler of itself): token counts, image counts and collectives stay as
planned, and `accumulate` weighs it zero. Each step, the ranks share what they found
(`take_new_bad_samples` -> gathered -> `add_bad_samples`), so the run's skip list is the same on every
rank; it is saved with the position, its samples are never read again, and it counts against
`data.max_bad_fraction` (which a resume may raise).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cos_model import IGNORE_INDEX

from ..common.errors import DataError, UserError
from ..data.images import ImageSource
from ..data.records import Example, collate
from ..data.tokenstore import Sample
from ..plan.resolve import steps_per_epoch
from .batching import ORDER, MicroBatch, epoch_order, legacy_epoch_order, split_step

log = logging.getLogger(__name__)


class ExampleRecords:
    """A list of `Example`s (images under `image_root`) in the shape the loader reads: lengths and
    samples, like a prepared store's `StoreRecords`."""

    def __init__(self, examples: Sequence[Example], image_root: str | Path | None):
        self.examples = examples
        self.images = ImageSource(image_root or "")
        self.lengths = np.array([example.num_tokens for example in examples], dtype=np.int32)
        self.num_source_records, self.num_bad = len(examples), 0

    def __len__(self) -> int:
        return len(self.examples)

    def record_id(self, index: int) -> str:
        return self.examples[index].record_id

    def image(self, index: int) -> str | None:
        return self.examples[index].image_path

    def data_pin(self) -> dict:
        """The number of examples and a sha256 of what they hold (ids, tokens, labels, images)."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(repr((example.record_id, example.input_ids, example.labels, example.image_path)).encode())
        return {"records": len(self.examples), "key": digest.hexdigest()}

    def sample(self, index: int) -> Sample:
        example = self.examples[index]
        return Sample(
            example.record_id,
            np.asarray(example.input_ids, dtype=np.int64),
            np.asarray(example.labels, dtype=np.int64),
            example.image_path,
        )


def as_records(examples, image_root: str | Path | None = None):
    """`examples` as loader records: a prepared store's records as they are, a list of examples wrapped."""
    return examples if hasattr(examples, "sample") else ExampleRecords(examples, image_root)


class MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset keyed by a `MicroBatch`, so DataLoader workers load and collate whole
    micro-batches while the main process keeps the order. `root` is the image folder of a list of
    examples; a prepared store's records know where their images are."""

    def __init__(self, examples, root: str | Path | None, image_size: int, pad_token_id: int, packing: bool = False):
        self.records = as_records(examples, root)
        self.image_size = image_size
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.skipped: set[int] = set()  # samples whose image failed before: never read again in the run

    def load(self, micro_batch: MicroBatch) -> tuple[dict, list[tuple[int, str]]]:
        """The collated micro-batch, and (index, reason) of each sample whose image failed or is in
        `skipped` (those samples are kept with a blank image and no labels)."""
        samples = [self.records.sample(index) for index in micro_batch.indices]
        wanted = [
            s.image
            for i, s in zip(micro_batch.indices, samples, strict=True)
            if s.image is not None and i not in self.skipped
        ]
        loaded = iter(self.records.images.load_many(wanted, self.image_size))
        images, failed = [], []
        for position, (index, sample) in enumerate(zip(micro_batch.indices, samples, strict=True)):
            if sample.image is None:
                continue
            pixels = DataError(f"{sample.image}: skipped") if index in self.skipped else next(loaded)
            if isinstance(pixels, DataError):
                failed.append((index, str(pixels)))
                pixels = torch.zeros(3, self.image_size, self.image_size)
                samples[position] = Sample(
                    sample.record_id, sample.input_ids, np.full_like(sample.labels, IGNORE_INDEX), sample.image
                )
            images.append(pixels)
        batch = collate(samples, images, self.pad_token_id, packing=self.packing, image_size=self.image_size)
        if micro_batch.filler:
            batch["labels"].fill_(IGNORE_INDEX)
        batch["num_samples"] = 0 if micro_batch.filler else len(samples) - len(failed)
        return batch, failed

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        batch, failed = self.load(micro_batch)
        for _, reason in failed:
            log.warning("%s; the sample trains nothing", reason)
        return batch


class _LoaderItems(torch.utils.data.Dataset):
    """What DataLoader workers return to `StepLoader`: ("ok", batch, failed images) or ("error", a
    user error), so that a problem in a worker reaches the user as its one line, not as a traceback
    of the worker process."""

    def __init__(self, dataset: MicroBatchDataset):
        self.dataset = dataset

    def __getitem__(self, micro_batch: MicroBatch) -> tuple:
        try:
            return ("ok", *self.dataset.load(micro_batch))
        except UserError as err:
            return ("error", err)


def _as_is(item):
    return item


class StepLoader:
    """Endless, rank-aware, resumable stream of optimizer steps: `next_step()` gives this rank's
    micro-batches of the next step (collated: input_ids, labels, attention_mask or position_ids
    (packed), pixel_values and `num_samples`). Epochs follow one another; the position is
    `{epoch, step}`."""

    def __init__(
        self,
        examples,
        *,
        image_root: str | Path | None = None,
        image_size: int,
        pad_token_id: int,
        tokens_per_micro_batch: int,
        samples_per_step: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int = 0,
        packing: bool = False,
        max_bad_fraction: float = 0.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        records = as_records(examples, image_root)
        if samples_per_step < world_size:
            raise DataError(
                f"batch.samples_per_step={samples_per_step} is smaller than the {world_size} ranks; "
                "each rank needs at least one sample per step"
            )
        if steps_per_epoch(len(records), samples_per_step) < 1:
            raise DataError(
                f"{len(records)} examples are fewer than batch.samples_per_step={samples_per_step}: "
                "not one optimizer step per epoch"
            )
        self.records = records
        self.dataset = MicroBatchDataset(records, None, image_size, pad_token_id, packing)
        self.lengths = records.lengths
        self.tokens_per_micro_batch, self.samples_per_step = tokens_per_micro_batch, samples_per_step
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.packing = packing
        self.order = ORDER
        self.data_pin = records.data_pin()
        # Images failing at run time may use what preparation left of the data.max_bad_fraction budget.
        self.max_bad_fraction = max_bad_fraction
        self.bad_allowance = int(max_bad_fraction * records.num_source_records) - records.num_bad
        # The run's skip list, the same on every rank (`add_bad_samples`); the dataset reads it.
        self.bad_samples: set[int] = self.dataset.skipped
        self._new_bad: dict[int, str] = {}  # this rank's failures not yet shared
        self.epoch, self.step = 0, 0
        self._iterator: Iterator[tuple] | None = None
        self._order: tuple[int, Sequence[int]] | None = None
        self._plans: dict[tuple[int, int], list[list[MicroBatch]]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.lengths), self.samples_per_step)

    def step_micro_batches(self, epoch: int, step: int) -> list[list[MicroBatch]]:
        """Every rank's micro-batches of step `step` of `epoch` (the last few are cached: the stream
        plans ahead of the step being trained when workers prefetch)."""
        if (epoch, step) not in self._plans:
            if self._order is None or self._order[0] != epoch:
                draw = epoch_order if self.order == ORDER else legacy_epoch_order
                self._order = (epoch, draw(len(self.lengths), self.seed, epoch))
            chosen = self._order[1][step * self.samples_per_step : (step + 1) * self.samples_per_step]
            if len(self._plans) > 256:
                self._plans.clear()
            self._plans[epoch, step] = split_step(
                chosen, self.lengths, self.world_size, self.tokens_per_micro_batch, self.packing
            )
        return self._plans[epoch, step]

    def _epoch_stream(self) -> Iterator[tuple]:
        """This rank's loaded micro-batches from the current position to the end of the epoch."""
        epoch, first = self.epoch, self.step
        items = (
            micro
            for step in range(first, self.steps_per_epoch)
            for micro in self.step_micro_batches(epoch, step)[self.rank]
        )
        loading = _LoaderItems(self.dataset)
        if self.num_workers == 0:
            return (loading[micro] for micro in items)
        # batch_size=None: each sampler item is already a whole micro-batch, collated in the worker.
        # Pinned on GPU, so the trainer's host-to-device copies run asynchronously.
        return iter(
            DataLoader(
                loading,
                sampler=items,
                batch_size=None,
                collate_fn=_as_is,
                num_workers=self.num_workers,
                pin_memory=torch.cuda.is_available(),
            )
        )

    def next_step(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._iterator = self._epoch_stream()
        count = len(self.step_micro_batches(self.epoch, self.step)[self.rank])
        micro_batches = []
        for _ in range(count):
            item = next(self._iterator)
            if item[0] == "error":
                self._iterator = None
                raise item[1]
            _, batch, failed = item
            self._count_failed(failed)
            micro_batches.append(batch)
        self.step += 1
        if self.world_size == 1:  # alone, what this rank found is what every rank found
            self.add_bad_samples(self.take_new_bad_samples())
        return micro_batches

    def _count_failed(self, failed: list[tuple[int, str]]) -> None:
        for index, reason in failed:
            if index not in self.bad_samples:
                self._new_bad.setdefault(index, reason)

    def take_new_bad_samples(self) -> dict[int, str]:
        """This rank's samples whose image failed since the last call (index -> reason), to be shared
        with the other ranks (`add_bad_samples`; a single rank's `next_step` adds them itself)."""
        found, self._new_bad = self._new_bad, {}
        return found

    def add_bad_samples(self, found: dict[int, str]) -> None:
        """Add what every rank found (the same dict on every rank) to the run's skip list; past
        `data.max_bad_fraction`, the same DataError on every rank, naming the first image."""
        new = {index: reason for index, reason in sorted(found.items()) if index not in self.bad_samples}
        if not new:
            return
        self.bad_samples.update(new)
        if len(self.bad_samples) > self.bad_allowance:
            raise DataError(
                f"{next(iter(new.values()))}: {len(self.bad_samples)} images failed during training, beyond "
                f"what data.max_bad_fraction={self.max_bad_fraction:.1%} allows after {self.records.num_bad} bad "
                "records at preparation; fix the images or raise data.max_bad_fraction (it may change on resume)"
            )
        if self.rank == 0:
            for index, reason in new.items():
                log.warning(
                    "%s; sample %s is skipped for the rest of the run (%d of %d allowed by data.max_bad_fraction)",
                    reason,
                    self.records.record_id(index),
                    len(self.bad_samples),
                    self.bad_allowance,
                )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "tokens_per_micro_batch": self.tokens_per_micro_batch,
            "samples_per_step": self.samples_per_step,
            "order": self.order,
            "data": self.data_pin,
            "bad_samples": sorted(self.bad_samples),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position, with the budget it was read under (the micro-batches of a
        step depend on it) and its skip list. The samples per step must be the spec's (they are the
        optimisation), and the data those it pinned (a position written before pins is taken as is)."""
        if "step" not in state or "samples_per_step" not in state:
            raise DataError(
                f"loader state {state} predates batch.samples_per_step (steps were sized by the token "
                "budget): this checkpoint cannot continue under the new batching; start a new run"
            )
        if int(state["samples_per_step"]) != self.samples_per_step:
            raise DataError(
                f"the checkpoint was trained with batch.samples_per_step={state['samples_per_step']}, "
                f"this run has {self.samples_per_step}: the optimisation would change"
            )
        budget = int(state["tokens_per_micro_batch"])
        if budget < 1:
            raise DataError(f"loader state {state}: tokens_per_micro_batch must be positive")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise DataError(f"loader state {state} is outside the {self.steps_per_epoch} steps of an epoch")
        if state.get("data", self.data_pin) != self.data_pin:
            raise DataError(
                f"loader state {state['data']} was saved on other data than these ({self.data_pin}): "
                "its position would repeat or skip samples"
            )
        order = state.get("order", "legacy")
        if order not in (ORDER, "legacy"):
            raise DataError(f"loader state {state}: unknown data order {order!r} (written by a newer cosctl?)")
        if budget != self.tokens_per_micro_batch or order != self.order:
            self.tokens_per_micro_batch, self.order, self._plans, self._order = budget, order, {}, None
        self.bad_samples.clear()  # in place: the dataset reads the same set
        self.bad_samples.update(int(index) for index in state.get("bad_samples", []))
        self._new_bad = {}
        self.epoch, self.step, self._iterator = epoch, step, None
