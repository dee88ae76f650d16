"""Multimodal sequence packing (`batch.packing`): rows of several samples, each attending to itself only."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from cos_model import IGNORE_INDEX
from cosctl.data.records import Example, collate
from cosctl.train.batching import padding_fraction, split_step
from cosctl.train.loader import MicroBatchDataset
from tests.tiny import TINY_VOCAB, tiny_config, tiny_model


def samples(config, seed: int = 0) -> tuple[list[Example], list[torch.Tensor]]:
    """Five samples as the data module builds them: bos, prompt (with the image slots for three of
    them), answer + eos labelled; lengths from 9 text tokens to a long multi-turn one."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    examples, images = [], []
    for index, (prompt, answer, has_image) in enumerate(
        [(5, 3, True), (12, 40, False), (3, 2, True), (20, 30, True), (6, 8, False)]
    ):
        text = [rng.randrange(3, TINY_VOCAB - 2) for _ in range(prompt + answer)]
        ids = [1] + text[:prompt]
        if has_image:
            ids = ids[:3] + [config.image_token_id] * config.num_visual_tokens + ids[3:]
            images.append(torch.randn(3, config.image_size, config.image_size, generator=generator))
        labels = [IGNORE_INDEX] * len(ids) + text[prompt:] + [2]
        ids = ids + text[prompt:] + [2]
        examples.append(
            Example(
                str(index),
                "t",
                "x.png" if has_image else None,
                tuple(ids),
                tuple(labels),
                len(ids) - has_image * config.num_visual_tokens,
            )
        )
    return examples, images


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token losses of one row (0 where the next label is ignored)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_packed_rows_give_each_sample_its_unpacked_loss():
    """The same five samples (two text-only, three with images) in padded rows and in one packed row
    (position ids restarting per sample, no attention mask): every sample's loss agrees to 1e-5, and
    the model's summed loss too. `use_cache=False`, as `accumulate` passes: with a KV cache,
    transformers does not look for packed sequences and lets samples attend to each other."""
    config = tiny_config()
    model = tiny_model(config)
    examples, images = samples(config)
    padded = collate(examples, images, pad_token_id=0)
    packed = collate(examples, images, pad_token_id=0, packing=True)
    assert packed["input_ids"].shape == (1, sum(e.num_tokens for e in examples))
    padded_logits = model(**padded).logits
    packed_logits = model(**packed, use_cache=False).logits[0]
    start = 0
    for row, example in enumerate(examples):
        n = example.num_tokens
        unpacked = token_losses(padded_logits[row, :n], padded["labels"][row, :n])
        within = token_losses(packed_logits[start : start + n], packed["labels"][0, start : start + n])
        assert torch.allclose(within, unpacked, atol=1e-5, rtol=0), example.record_id
        start += n
    count = torch.tensor(float(sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)))
    summed_padded = model(**padded, num_items_in_batch=count).loss
    summed_packed = model(**packed, num_items_in_batch=count, use_cache=False).loss
    assert torch.allclose(summed_packed, summed_padded, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_packed_sample_does_not_see_its_neighbours():
    """Changing one sample's tokens leaves the other samples' logits in the packed row unchanged."""
    config = tiny_config()
    model = tiny_model(config)
    examples, images = samples(config)
    before = model(**collate(examples, images, 0, packing=True), use_cache=False).logits[0]
    changed = Example(
        "1", "t", None, tuple(reversed(examples[1].input_ids)), examples[1].labels, examples[1].num_text_tokens
    )
    after = model(**collate([examples[0], changed, *examples[2:]], images, 0, packing=True), use_cache=False).logits[0]
    first, second = examples[0].num_tokens, examples[0].num_tokens + examples[1].num_tokens
    assert torch.allclose(before[:first], after[:first], atol=1e-6)
    assert torch.allclose(before[second:], after[second:], atol=1e-6)
    assert not torch.allclose(before[first:second], after[first:second])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_packed_steps_use_every_sample_once_within_budget(world_size):
    """Packing fills rows up to the budget: every sample of the step trains once, no row exceeds the
    budget, ranks run equal passes, and there are fewer passes (and no padding) than padded rows."""
    rng = random.Random(1)
    lengths = [rng.randint(30, 520) for _ in range(300)]
    chosen = list(range(0, 300, 2))
    packed = split_step(chosen, lengths, world_size, 1024, packing=True)
    padded = split_step(chosen, lengths, world_size, 1024)
    trained = sorted(i for plan in packed for micro in plan if not micro.filler for i in micro.indices)
    assert trained == chosen and len({len(plan) for plan in packed}) == 1
    assert all(sum(lengths[i] for i in micro.indices) <= 1024 for plan in packed for micro in plan)
    assert len(packed[0]) < len(padded[0])
    assert padding_fraction(packed[0], lengths, packing=True) == 0.0
    assert padding_fraction(padded[0], lengths, packing=False) > 0.0


def test_a_packed_micro_batch_keeps_its_images_in_sample_order(tmp_path):
    """The dataset packs a micro-batch into one row; images are stacked in the order of the samples
    that have one, so the model writes each image into its own sample's slots."""
    from PIL import Image

    config = tiny_config()
    examples, _ = samples(config)
    colours = {}
    for index, example in enumerate(examples):
        if example.image_path is not None:
            path = tmp_path / f"{index}.png"
            colours[index] = (40 * index, 0, 0)
            Image.new("RGB", (8, 8), colours[index]).save(path)
            examples[index] = Example(
                example.record_id, "t", str(path), example.input_ids, example.labels, example.num_text_tokens
            )
    dataset = MicroBatchDataset(examples, tmp_path, config.image_size, 0, packing=True)
    from cosctl.train.batching import MicroBatch

    batch = dataset[MicroBatch((3, 1, 0))]
    assert batch["input_ids"].shape[0] == 1 and batch["num_samples"] == 3
    assert batch["pixel_values"].shape[0] == 2
    red = batch["pixel_values"][:, 0].mean(dim=(1, 2))
    assert red[0] > red[1]  # sample 3's image (brighter red) first, then sample 0's
