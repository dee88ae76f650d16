"""Held-out evaluation during training: the eval loss with each record's own image and with another
record's (the gap is how much the model uses the image), and generation scored per task as `cosctl
eval` scores it. Both are collective: every rank evaluates the same held-out micro-batches.

Whose image a record gets (`ImageSwap`): the distinct image names of the evaluated held-out records,
in held-out order (by first appearance), form a cycle; a record whose image is the k-th distinct one
gets the (k+1)-th, the last the first. So every record with an image is scored with an image of
another name, also where consecutive records share one image (LLaVA's files hold several records per
image in a row), the same on every rank and at every eval. Text-only records keep no image; with
fewer than two distinct images nothing can be swapped and no swapped loss is logged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.log import log
from ..data.conversation import num_label_tokens
from ..data.prepare import split_source
from .run import HeldOutBatch, Run


def swap_partners(images: Sequence[Sequence[str | None]]) -> dict[str, str]:
    """Each distinct image name -> the next distinct one in held-out order (by first appearance), the
    last -> the first; {} with fewer than two distinct names. `images`: per micro-batch, the name of
    each image row (None: an image that failed to load, left out)."""
    distinct = list(dict.fromkeys(name for names in images for name in names if name is not None))
    if len(distinct) < 2:
        return {}
    return {name: distinct[(position + 1) % len(distinct)] for position, name in enumerate(distinct)}


class ImageSwap:
    """The held-out micro-batches' `pixel_values` with every image row replaced by its partner's
    pixels (`swap_partners`), built one micro-batch at a time from the rows already collated (the
    partner's first appearance): no second copy of the held-out pixels is held. `num_swapped` counts
    the records given another image."""

    def __init__(self, batches: Sequence[HeldOutBatch]):
        self.pixels = [batch.inputs["pixel_values"] for batch in batches]
        self.names = [batch.images for batch in batches]
        self.partner = swap_partners(self.names)
        self.num_distinct = len({name for names in self.names for name in names if name is not None})
        self.where: dict[str, tuple[int, int]] = {}
        for index, names in enumerate(self.names):
            for row, name in enumerate(names):
                if name is not None:
                    self.where.setdefault(name, (index, row))
        self.num_swapped = sum(name in self.partner for names in self.names for name in names)

    def __call__(self, index: int) -> torch.Tensor:
        """Micro-batch `index`'s swapped images; its own (possibly empty) tensor when it has no image to
        swap, e.g. a text-only micro-batch, whose `pixel_values` has no rows."""
        own, names = self.pixels[index], self.names[index]
        if not any(name in self.partner for name in names):
            return own
        rows = []
        for row, name in enumerate(names):
            source, source_row = self.where[self.partner[name]] if name in self.partner else (index, row)
            rows.append(self.pixels[source][source_row])
        return torch.stack(rows)


class Evaluator:
    """Mean loss per label token over the first `eval.num_batches` held-out micro-batches (the same
    batches on every rank, every time), as `{"eval_loss": ...}`; with `eval.swapped_images` (and two
    distinct held-out images at least) also the loss with every record given another record's image
    (see the module doc), as `eval_loss_swapped_images`, and how many records were given one, as
    `eval_swapped_records`. The gap between the two losses is how much the model uses the image; a
    model that answers from the language prior alone has none. Without held-out data: `{}`."""

    def __init__(self, run: Run, budget):
        self.engine, self.device = run.engine, run.dist.device
        self.every = run.spec.eval.every_steps
        self.batches = run.eval_batches(budget)
        self.swap = ImageSwap(self.batches) if run.spec.eval.swapped_images and self.batches else None
        if self.swap is not None:
            num_samples = sum(len(batch.inputs["input_ids"]) for batch in self.batches)
            if self.swap.num_swapped:
                log.info(
                    f"held-out eval: {len(self.batches)} micro-batches of {num_samples} records; the "
                    f"swapped-image loss gives each of the {self.swap.num_swapped} with an image the next "
                    f"of {self.swap.num_distinct} distinct images in held-out order"
                )
            else:
                log.info(
                    f"held-out eval: {self.swap.num_distinct} distinct image(s) among the held-out records: "
                    "nothing to swap, no swapped-image loss"
                )
                self.swap = None

    def due(self, step: int) -> bool:
        return bool(self.batches) and step % self.every == 0

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        if not self.batches:
            return {}
        self.engine.eval()
        losses = {"eval_loss": self._loss(swap=False)}
        if self.swap is not None:
            losses["eval_loss_swapped_images"] = self._loss(swap=True)
            losses["eval_swapped_records"] = self.swap.num_swapped
        self.engine.train()
        return losses

    def _loss(self, swap: bool) -> float:
        total, count = 0.0, 0
        for index, batch in enumerate(self.batches):
            inputs = batch.inputs
            if swap:
                inputs = {**inputs, "pixel_values": self.swap(index)}
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k != "num_samples"}
            total += self.engine(**inputs, num_items_in_batch=torch.tensor(1.0)).loss.item()
            count += num_label_tokens(batch.inputs["labels"])
        return total / max(count, 1)


class GenerationEval:
    """Every `eval.generate_every_steps` steps: greedy generation on the first `eval.generate_samples`
    held-out records that can be generated for (text-only ones included; a record whose image cannot
    be read, or that `cosctl eval` would refuse, is left out with a warning), scored per task like
    `cosctl eval` (collective; the same records on every rank). The held-out file and its images are
    read through `data.root`, a folder or an `s3://` root, as the training data is. Returns
    `eval/<task>/<metric>` entries for the step's record; none when no record can be generated for."""

    def __init__(self, run: Run):
        self.every = run.spec.eval.generate_every_steps
        self.run = run
        self.records: list[dict] = []
        if self.every is None:
            return
        from ..data.conversation import record_image
        from ..evaluate.records import load_eval_records

        source = split_source(run.spec.data, run.spec.data.eval, run.spec.storage.to_settings())
        self.images = source.images()
        self.records = load_eval_records(
            source.local_json(), self.images, limit=run.spec.eval.generate_samples, skip_bad=True
        )
        if not self.records:
            log.info(f"generation eval: no record of {source.json_uri()} can be generated for; it is skipped")
        else:
            num_text_only = sum(record_image(record) is None for record in self.records)
            log.info(
                f"generation eval: {len(self.records)} held-out records ({num_text_only} text-only) every "
                f"{self.every} steps"
            )

    def due(self, step: int) -> bool:
        return self.every is not None and bool(self.records) and step % self.every == 0

    def __call__(self) -> dict[str, float]:
        from ..evaluate.generation import generate_and_score, metrics_record

        run, spec = self.run, self.run.spec
        _, scores = generate_and_score(
            run.engine,
            run.stage.tokenizer,
            self.records,
            self.images,
            max_new_tokens=spec.eval.generate_max_new_tokens,
            batch_size=spec.eval.generate_batch_size,
            device=run.dist.device,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
        )
        run.engine.train()
        return metrics_record(scores)
