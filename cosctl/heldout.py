"""Held-out evaluation during training: the eval loss with each record's own image and with the next
record's (the gap is how much the model uses the image), and generation scored per task as `cosctl
eval` scores it. Both are collective: every rank evaluates the same held-out micro-batches."""

from __future__ import annotations

from pathlib import Path

import torch

from .conversation import num_label_tokens
from .run import Run


def next_images(pixels: list[torch.Tensor | None], index: int) -> torch.Tensor | None:
    """Micro-batch `index`'s images, each replaced by the next image in held-out order: across micro-
    batch boundaries, the very last by the very first; None for a micro-batch without images. Built
    per micro-batch, so no second copy of the held-out pixels is ever held."""
    own = pixels[index]
    if own is None:
        return None
    following = next(images for images in pixels[index + 1 :] + pixels[: index + 1] if images is not None)
    return torch.cat([own[1:], following[:1]])


class Evaluator:
    """Mean loss per label token over the first `eval.num_batches` held-out micro-batches (the same
    batches on every rank, every time), as `{"eval_loss": ...}`; with `eval.swapped_images` (and two
    held-out images at least) also the loss with every record given the next record's image, as
    `eval_loss_swapped_images`. The gap between the two is how much the model uses the image; a model
    that answers from the language prior alone has none. Without held-out data: `{}`."""

    def __init__(self, run: Run, budget):
        self.engine, self.device = run.engine, run.dist.device
        self.every = run.spec.eval.every_steps
        self.batches = run.eval_batches(budget)
        self.pixels = [batch.get("pixel_values") for batch in self.batches]
        num_images = sum(len(images) for images in self.pixels if images is not None)
        self.swapped = run.spec.eval.swapped_images and num_images >= 2

    def due(self, step: int) -> bool:
        return bool(self.batches) and step % self.every == 0

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        if not self.batches:
            return {}
        self.engine.eval()
        losses = {"eval_loss": self._loss(swap=False)}
        if self.swapped:
            losses["eval_loss_swapped_images"] = self._loss(swap=True)
        self.engine.train()
        return losses

    def _loss(self, swap: bool) -> float:
        total, count = 0.0, 0
        for index, batch in enumerate(self.batches):
            if swap and self.pixels[index] is not None:
                batch = {**batch, "pixel_values": next_images(self.pixels, index)}
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "num_samples"}
            total += self.engine(**inputs, num_items_in_batch=torch.tensor(1.0)).loss.item()
            count += num_label_tokens(batch["labels"])
        return total / max(count, 1)


class GenerationEval:
    """Every `eval.generate_every_steps` steps: greedy generation on the first `eval.generate_samples`
    usable held-out records, scored per task like `cosctl eval` (collective; the same records on
    every rank). Returns `eval/<task>/<metric>` entries for the step's record."""

    def __init__(self, run: Run):
        self.every = run.spec.eval.generate_every_steps
        self.run = run
        if self.every is None:
            return
        from .evaluate.records import load_eval_records

        root = Path(run.spec.data.root)
        self.records = load_eval_records(
            root / run.spec.data.eval, root, limit=run.spec.eval.generate_samples, skip_bad=True
        )

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def __call__(self) -> dict[str, float]:
        from .evaluate.generation import generate_and_score, metrics_record

        run, spec = self.run, self.run.spec
        _, scores = generate_and_score(
            run.engine,
            run.stage.tokenizer,
            self.records,
            Path(spec.data.root),
            max_new_tokens=spec.eval.generate_max_new_tokens,
            batch_size=spec.eval.generate_batch_size,
            device=run.dist.device,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
        )
        run.engine.train()
        return metrics_record(scores)
