"""LLaVA-format records -> validated token sequences (examples) -> collated tensors (docs/design.md §5).

Owns reading conversation JSON (`[{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}...]}]`),
the tokenizer, reports of bad records, and collating; the chat template, its labels, validation and truncation
of one record are `cosctl.data.conversation`'s. Preparing whole splits into memory-mapped token stores is
`cosctl.data.prepare`'s; image bytes and pixels are `cosctl.data.images`'; grouping examples into steps and
micro-batches is `cosctl.train.batching`'s.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cos_model import IGNORE_INDEX

from ..common.errors import DataError
from .conversation import IMAGE_TOKEN, encode_records, expand, image_token_id
from .images import CLIP_MEAN, CLIP_STD, ImageSource, decode_image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DataError",
    "DataReport",
    "Example",
    "IGNORE_INDEX",
    "LengthStats",
    "check_bad_fraction",
    "collate",
    "image_problem",
    "length_stats",
    "load_examples",
    "load_image",
    "load_tokenizer",
    "resolve_image_path",
]

MAX_REPORTED_BAD_IDS = 10
# What a user changes for each kind of bad record (named in the error that stops a run).
BAD_RECORD_HINTS = {
    "too_long": "raise data.max_text_tokens",
    "missing_image": "check data.root (images are found relative to it)",
    "unreadable_image": "re-encode or remove the damaged image files",
    "no_caption": "give each shard sample a .txt caption or a .json with conversations",
    "bad_caption": "write shard captions (.txt) in UTF-8",
    "bad_json": "fix the shard samples' .json members",
}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local folder, adding `<image>` (special) and a pad token if missing.

    Adding `<image>` grows the vocabulary: the model's embeddings must be resized to `len(tokenizer)`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: tokenizer folder not found")
    try:
        # AutoTokenizer: real LLM folders may ship only a sentencepiece model, converted on load.
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many types for a broken folder
        raise DataError(f"{folder}: cannot load tokenizer: {exc}") from exc
    if hasattr(tokenizer, "legacy"):
        # Llama-style classes rebuild their Metaspace pre-tokenizer from `legacy` when loaded, and
        # save_pretrained leaves it out: recorded, the published and exported copies tokenise as this one.
        tokenizer.init_kwargs["legacy"] = tokenizer.legacy
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise DataError(f"{folder}: tokenizer has no eos token, which ends every answer")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of everything that decides token ids here: the tokenizer's full serialisation (vocabulary,
    merges, normaliser, added tokens such as `<image>`) and its bos/eos ids. The same files give the
    same fingerprint wherever they were loaded from (a local folder or a published model)."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, image_token_id(tokenizer)]).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Example:
    """One validated record as model input; `labels` align with `input_ids` (the model shifts).
    `image_path` is the record's own, relative to the image root unless absolute, or None for a
    text-only record. `num_text_tokens` counts the tokens that are not visual-token slots."""

    record_id: str
    task: str
    image_path: str | None
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    num_text_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class LengthStats:
    """Lengths over a set of examples: text tokens (shortest, mean) and whole sequences (longest)."""

    min_text_tokens: int
    mean_text_tokens: int
    max_tokens: int


def length_stats(examples) -> LengthStats:
    """Of a list of `Example`s, or of any record set with `length_stats()` (a prepared token store)."""
    if hasattr(examples, "length_stats"):
        return examples.length_stats()
    text = [example.num_text_tokens for example in examples]
    return LengthStats(min(text), sum(text) // len(text), max(example.num_tokens for example in examples))


@dataclass
class DataReport:
    """What a split kept and why it dropped the rest (`truncated` records are kept, cut short)."""

    source: str
    num_records: int
    num_ok: int
    bad: dict[str, int] = field(default_factory=dict)
    bad_ids: list[str] = field(default_factory=list)
    num_truncated: int = 0
    num_text_only: int = 0

    @property
    def num_bad(self) -> int:
        return self.num_records - self.num_ok

    def summary(self) -> str:
        line = f"{self.source}: {self.num_records} records, {self.num_ok} ok, {self.num_bad} bad"
        if self.num_text_only:
            line += f", {self.num_text_only} text-only"
        if self.num_truncated:
            line += f", {self.num_truncated} truncated at data.max_text_tokens"
        if self.bad:
            reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad.items()))
            line += f" ({reasons}; first bad ids: {', '.join(self.bad_ids)})"
        return line

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "num_records": self.num_records,
            "num_ok": self.num_ok,
            "bad": self.bad,
            "bad_ids": self.bad_ids,
            "num_truncated": self.num_truncated,
            "num_text_only": self.num_text_only,
        }


def check_bad_fraction(report: DataReport, max_bad_fraction: float) -> None:
    """Raise a DataError naming the file, the counts and the settings to change when more than
    `max_bad_fraction` of the records are bad, or none is usable."""
    fraction = report.num_bad / max(report.num_records, 1)
    if fraction > max_bad_fraction or report.num_ok == 0:
        hints = sorted({BAD_RECORD_HINTS[reason] for reason in report.bad if reason in BAD_RECORD_HINTS})
        advice = "; ".join([*hints, "or raise data.max_bad_fraction to skip them"])
        raise DataError(
            f"{report.summary()}: {fraction:.1%} bad, above data.max_bad_fraction={max_bad_fraction:.1%} ({advice})"
        )


def read_records(json_path: Path) -> list:
    """The records of a JSON list file; a one-line `DataError` for a missing, unreadable or empty file."""
    if not json_path.is_file():
        raise DataError(f"{json_path}: data file not found")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{json_path}: not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise DataError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DataError(f"{json_path}: no records")
    return records


def resolve_image_path(image_root: str | Path, image: str) -> Path:
    """`image` relative to `image_root`; absolute paths are kept."""
    path = Path(image)
    return path if path.is_absolute() else Path(image_root) / path


def image_problem(path: Path, cache: dict[Path, str | None]) -> str | None:
    """'missing_image', 'unreadable_image' (every pixel decoded) or None; each file is read once per
    `cache`."""
    if path not in cache:
        cache[path] = ImageSource("").problem(str(Path(path).resolve()))
    return cache[path]


def load_examples(
    json_path: str | Path,
    image_root: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    num_visual_tokens: int,
    max_text_tokens: int,
    max_bad_fraction: float,
) -> tuple[list[Example], DataReport]:
    """Validate and tokenise every record into memory; skip bad ones (each image decoded once), and
    raise if more than `max_bad_fraction` of them are bad (or none is usable). Training runs use the
    memory-mapped `cosctl.data.tokenstore` instead; this is for small sets and tests."""
    json_path = Path(json_path)
    records = read_records(json_path)
    encoded, bad = encode_records(records, range(len(records)), tokenizer, max_text_tokens)
    source = ImageSource(image_root)
    checked: dict[str, str | None] = {}
    examples: list[Example] = []
    num_truncated = 0
    for item in encoded:
        if item.image is not None:
            if item.image not in checked:
                checked[item.image] = source.problem(item.image)
            if checked[item.image] is not None:
                bad.append((item.index, item.record_id, checked[item.image]))
                continue
        input_ids, labels = expand(item.ids, item.mask, item.image_pos, image_token_id(tokenizer), num_visual_tokens)
        examples.append(Example(item.record_id, item.task, item.image, tuple(input_ids), tuple(labels), len(item.ids)))
        num_truncated += item.truncated
    bad.sort()
    report = DataReport(
        str(json_path),
        len(records),
        len(examples),
        dict(Counter(reason for _, _, reason in bad)),
        [record_id for _, record_id, _ in bad[:MAX_REPORTED_BAD_IDS]],
        num_truncated,
        sum(example.image_path is None for example in examples),
    )
    check_bad_fraction(report, max_bad_fraction)
    return examples, report


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square, [0, 1], CLIP-normalised: float32 (3, image_size, image_size)."""
    try:
        return decode_image(path, image_size)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DataError(f"{path}: cannot read image: {exc}") from exc


def collate(
    examples: Sequence,
    images: list[torch.Tensor],
    pad_token_id: int,
    packing: bool = False,
    image_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Token rows and stacked images of a micro-batch. `examples` have `input_ids` and `labels`
    (sequences or arrays); `images` are those of the examples that have one, in order.

    Unpacked: one row per example, right-padded to the longest, with an attention mask.
    Packed: one row holding every example back to back, `position_ids` restarting at 0 for each, and
    no attention mask: the model then attends within each example only (transformers' padding-free
    path: a block-diagonal mask under SDPA, varlen kernels under flash-attention).
    """
    rows = [torch.as_tensor(np.asarray(example.input_ids), dtype=torch.long) for example in examples]
    targets = [torch.as_tensor(np.asarray(example.labels), dtype=torch.long) for example in examples]
    if images:
        pixel_values = torch.stack(images)
    else:
        size = image_size or 1
        pixel_values = torch.zeros((0, 3, size, size), dtype=torch.float32)
    if packing:
        return {
            "input_ids": torch.cat(rows)[None],
            "labels": torch.cat(targets)[None],
            "position_ids": torch.cat([torch.arange(len(row)) for row in rows])[None],
            "pixel_values": pixel_values,
        }
    num_columns = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), num_columns), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), num_columns), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), num_columns), dtype=torch.long)
    for row, (ids, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixel_values": pixel_values}
