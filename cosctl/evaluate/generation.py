"""Batched greedy generation over eval records, sharded over ranks, and its scores: the in-process eval
that `cosctl eval` runs and that a training loop can call on its DeepSpeed engine.

    predictions, scores = generate_and_score(engine, tokenizer, records, image_root, max_new_tokens=32,
                                             batch_size=8, device=dist.device, rank=dist.rank,
                                             world_size=dist.world_size)

How the work is split. Records are sorted by prompt length (longest first, then by position) and cut into
batches of `batch_size`; rank r generates batches r, r + N, r + 2N, ... So a batch holds the same
records whatever the number of ranks, and the predictions do not depend on it (same padding, same
shapes, same numbers). Prompts are left-padded, decoding is greedy with the KV cache, and a row stops at
the tokenizer's eos. A batch may mix records with an image and text-only ones (its `pixel_values` hold
the images of the rows that have one, in row order) or hold no image at all (no `pixel_values`).

ZeRO-3. A partitioned model gathers its weights inside every forward, and a gather is a collective:
every rank must run the same forwards of the same modules. Three things could make them differ, and all
are evened out when the model's parameters are partitioned (DeepSpeed's `ds_id`) and there are several
ranks:
- the number of batches: ranks with fewer batches run filler batches (one record, the shortest prompt)
  until all ranks have run ceil(batches / N), and drop their output;
- the number of decoding steps: generation runs with transformers' `synced_gpus=True`, so a rank whose
  rows have all ended keeps stepping until every rank's have (up to `max_new_tokens`);
- the vision tower: a rank whose batch is text-only while another's has images would skip its gathers.
  The model itself runs it on a blank image, times zero, whenever its parameters are partitioned
  (`CosForConditionalGeneration.embed_inputs`), so no flag is passed from here.
A plain (unpartitioned) model skips all three. Every rank then gets every prediction (`all_gather_object`) and
scores them, so the return value is the same on all ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..common.errors import DataError
from ..common.log import log
from ..data.conversation import record_image
from ..data.images import ImageSource
from .records import EvalPrompt, build_prompt, check_records, image_source
from .scoring import Scores, eval_items, score


@dataclass(frozen=True)
class Batch:
    """Record indices to generate together; `keep` is False for a ZeRO-3 filler batch."""

    indices: tuple[int, ...]
    keep: bool = True


def plan_batches(prompt_lengths: list[int], batch_size: int) -> list[tuple[int, ...]]:
    """Record indices in batches of at most `batch_size`, longest prompts first (ties: file order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    return [tuple(order[start : start + batch_size]) for start in range(0, len(order), batch_size)]


def rank_batches(batches: list[tuple[int, ...]], rank: int, world_size: int, equal_counts: bool) -> list[Batch]:
    """Rank `rank`'s batches: every `world_size`-th one from its rank on; with `equal_counts`, filler
    batches (the last record of the last batch: the shortest prompt) up to ceil(len(batches) / world_size)."""
    mine = [Batch(indices) for indices in batches[rank::world_size]]
    if equal_counts and batches:
        mine += [Batch((batches[-1][-1],), keep=False)] * (math.ceil(len(batches) / world_size) - len(mine))
    return mine


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine (or any wrapper holding it as `.module`), else `model`."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def cos_config(module: nn.Module):
    """The CosConfig of a CosForConditionalGeneration, bare or inside a peft model."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.config


def is_partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 partitions the module's parameters (each then carries a DeepSpeed `ds_id`)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


def load_pixels(images: ImageSource, names: list[str], image_size: int) -> torch.Tensor:
    """The named images' model pixels, stacked (a folder or an `s3://` root; remote ones fetched
    together); a DataError naming the first that cannot be read."""
    pixels = images.load_many(names, image_size)
    for loaded in pixels:
        if isinstance(loaded, DataError):
            raise loaded
    return torch.stack(pixels)


def batch_pixels(images: ImageSource, records: list[dict], image_size: int) -> torch.Tensor | None:
    """The pixels of the records that have an image, in record order; None when none has (text-only)."""
    names = [name for name in map(record_image, records) if name is not None]
    return load_pixels(images, names, image_size) if names else None


def collate_prompts(
    prompts: list[EvalPrompt], pad_token_id: int, pixel_values: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`, beside the images of the prompts that have one
    (`pixel_values`, one row per such prompt, in order; left out when no prompt has an image)."""
    width = max(len(prompt.input_ids) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids)
        attention_mask[row, width - len(prompt.input_ids) :] = 1
    collated = {"input_ids": input_ids, "attention_mask": attention_mask}
    return collated if pixel_values is None else {**collated, "pixel_values": pixel_values}


def decode_new_tokens(tokenizer, new_tokens: torch.Tensor) -> list[str]:
    """Each row's text up to its first eos, special tokens dropped, surrounding whitespace stripped."""
    texts = []
    for row in new_tokens.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generate_batch(
    module: nn.Module,
    tokenizer,
    prompts: list[EvalPrompt],
    pixel_values: torch.Tensor | None,
    *,
    max_new_tokens: int,
    device: torch.device,
    synced: bool,
) -> list[str]:
    """Greedy continuations of `prompts` (one batch; `pixel_values`: the images of the prompts that have
    one, in order, None when none has) with the KV cache. Settings a
    model's generation config may carry that would change greedy decoding (beams, sampling, repetition
    penalties, a minimum length) are set to their neutral values, so every model is decoded the same way."""
    collated = collate_prompts(prompts, tokenizer.pad_token_id, pixel_values)
    inputs = {k: v.to(device) for k, v in collated.items()}
    output = module.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
    )
    return decode_new_tokens(tokenizer, output[:, inputs["input_ids"].shape[1] :].cpu())


def prediction_rows(
    records: list[dict], prompts: list[EvalPrompt], texts: dict[str, str], scores: Scores
) -> list[dict]:
    """One row per record, in file order: id, task, prompt, prediction, reference (+ answers), score."""
    rows = []
    for record, prompt in zip(records, prompts, strict=True):
        row = {
            "id": prompt.id,
            "task": prompt.task,
            "prompt": prompt.text,
            "prediction": texts[prompt.id],
            "reference": prompt.reference,
        }
        if record.get("answers") is not None:
            row["answers"] = record["answers"]
        rows.append({**row, "score": scores.per_record[prompt.id]})
    return rows


def metrics_record(scores: Scores, prefix: str = "eval") -> dict[str, float]:
    """Per-task aggregates as flat metrics-log keys: {"eval/<task>/<metric>": value} (counts left out),
    the keys `cosctl report` plots against the step."""
    return {
        f"{prefix}/{task}/{metric}": float(value)
        for task, values in scores.tasks.items()
        for metric, value in values.items()
        if metric != "num"
    }


def generate_and_score(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    image_root: str | Path | ImageSource,
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    default_task: str = "unknown",
) -> tuple[list[dict], Scores]:
    """Generate greedily for every record and score the predictions (`cosctl.evaluate.scoring.score`).

    `model`: a CosForConditionalGeneration, a peft model around one, or a DeepSpeed engine holding
    either (ZeRO-3 included). `records`: LLaVA-format eval records (`cosctl.evaluate.records`; checked
    here, images under `image_root`: a folder, an `s3://` root or an `ImageSource`; text-only records
    are generated for from their text; a record without `task` is typed as `cosctl.evaluate.scoring.eval_items`
    types it). Collective when `world_size` > 1: every
    rank passes the same records and settings and gets the same result (see the module docstring for
    the split and for ZeRO-3). The model is put in eval mode and returned to its previous mode.

    Returns the prediction rows in record order ({id, task, prompt, prediction, reference, answers
    when the record has them, score: that record's metrics}) and the `Scores`.
    """
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"world_size={world_size} needs an initialised process group")
    module = unwrap(model)
    config = cos_config(module)
    images = image_source(image_root)
    records = check_records(list(records), "eval records", images)
    items = eval_items(records, default_task)
    # Each record's task as scoring assigns it (its own, or inferred), so the rows and scores agree.
    prompts = [
        build_prompt(record, tokenizer, config.num_visual_tokens, images.root, item.task)
        for record, item in zip(records, items, strict=True)
    ]
    partitioned = is_partitioned(module)
    batches = plan_batches([len(prompt.input_ids) for prompt in prompts], batch_size)
    mine = rank_batches(batches, rank, world_size, equal_counts=partitioned and world_size > 1)
    was_training = module.training
    module.eval()
    local: dict[str, str] = {}
    started = time.monotonic()
    try:
        for number, batch in enumerate(mine, 1):
            chosen = [prompts[i] for i in batch.indices]
            texts = generate_batch(
                module,
                tokenizer,
                chosen,
                batch_pixels(images, [records[i] for i in batch.indices], config.image_size),
                max_new_tokens=max_new_tokens,
                device=torch.device(device),
                synced=partitioned and world_size > 1,
            )
            if batch.keep:
                local.update((prompt.id, text) for prompt, text in zip(chosen, texts, strict=True))
            if number % math.ceil(len(mine) / 10) == 0 or number == len(mine):
                log.info(f"eval: batch {number}/{len(mine)} on rank {rank} ({time.monotonic() - started:.1f} s)")
    finally:
        module.train(was_training)
    if world_size > 1:
        gathered: list[dict[str, str] | None] = [None] * world_size
        dist.all_gather_object(gathered, local)
        local = {key: text for part in gathered for key, text in part.items()}
    scores = score(items, local)
    return prediction_rows(records, prompts, local, scores), scores
