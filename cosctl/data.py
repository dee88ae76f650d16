"""LLaVA-format records -> validated token sequences (examples) -> collated tensors (docs/design.md §5).

Owns reading conversation JSON (`[{"id", "image"?, "conversations": [{"from": "human"|"gpt",
"value"}...]}]`), rejecting and counting bad records, the chat template and its labels, truncation,
and collating. Preparing whole splits into memory-mapped token stores is `cosctl.prepare`'s; image
bytes and pixels are `cosctl.images`'; grouping examples into steps and micro-batches is
`cosctl.batching`'s.

Chat template, one sequence per record (`<s>`/`</s>` are the tokenizer's bos/eos ids):

    <s>USER: {human_1} ASSISTANT: {gpt_1}</s>USER: {human_2} ASSISTANT: {gpt_2}</s>...

- A record with an `image` has one `<image>` placeholder, anywhere in its first human turn; it becomes
  `num_visual_tokens` copies of the image token id, where the model writes the visual tokens. A record
  without `image` (LLaVA-1.5's text-only conversations) has no placeholder and no visual tokens.
- Labels are IGNORE_INDEX everywhere except each answer and its `</s>`.
- The text before `<image>`, the rest of each prompt and each answer are tokenised separately, so the
  placeholder never merges with its neighbours and an answer tokenises as it is generated after
  "ASSISTANT: ".
- A record with more than `data.max_text_tokens` text tokens is cut there (visual tokens are never cut
  and never counted); one whose answers would all be cut off is a bad record (`too_long`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cos_model import IGNORE_INDEX

from .errors import DataError
from .images import CLIP_MEAN, CLIP_STD, ImageSource, decode_image

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DataError", "DataReport", "Example", "IGNORE_INDEX", "IMAGE_TOKEN", "LengthStats",
    "check_bad_fraction", "collate", "encode_conversation", "image_problem", "image_token_id", "length_stats",
    "load_examples",
    "load_image", "load_tokenizer", "resolve_image_path",
]

IMAGE_TOKEN = "<image>"
MAX_REPORTED_BAD_IDS = 10
# What a user changes for each kind of bad record (named in the error that stops a run).
BAD_RECORD_HINTS = {
    "too_long": "raise data.max_text_tokens",
    "missing_image": "check data.root (images are found relative to it)",
    "unreadable_image": "re-encode or remove the damaged image files",
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
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise DataError(f"{folder}: tokenizer has no eos token, which ends every answer")
    return tokenizer


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id that marks visual-token positions (one per visual token after expansion)."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


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
        return {"source": self.source, "num_records": self.num_records, "num_ok": self.num_ok, "bad": self.bad,
                "bad_ids": self.bad_ids, "num_truncated": self.num_truncated, "num_text_only": self.num_text_only}


def check_bad_fraction(report: DataReport, max_bad_fraction: float) -> None:
    """Raise a DataError naming the file, the counts and the settings to change when more than
    `max_bad_fraction` of the records are bad, or none is usable."""
    fraction = report.num_bad / max(report.num_records, 1)
    if fraction > max_bad_fraction or report.num_ok == 0:
        hints = sorted({BAD_RECORD_HINTS[reason] for reason in report.bad if reason in BAD_RECORD_HINTS})
        advice = "; ".join([*hints, "or raise data.max_bad_fraction to skip them"])
        raise DataError(f"{report.summary()}: {fraction:.1%} bad, above data.max_bad_fraction="
                        f"{max_bad_fraction:.1%} ({advice})")


# --- records -> token sequences ----------------------------------------------------------------------


class Pieces(NamedTuple):
    """A conversation's text in tokenising order: prompts and answers, and where the visual tokens go
    (before piece `image_before`; -1 for a text-only record)."""

    texts: list[str]
    is_answer: list[bool]
    image_before: int


def conversation_pieces(turns: list[dict]) -> Pieces:
    texts: list[str] = []
    is_answer: list[bool] = []
    image_before = -1
    for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
        before, placeholder, after = ("USER: " + human["value"] + " ASSISTANT: ").partition(IMAGE_TOKEN)
        texts.append(before)
        is_answer.append(False)
        if placeholder:
            image_before = len(texts)
            texts.append(after)
            is_answer.append(False)
        texts.append(gpt["value"])
        is_answer.append(True)
    return Pieces(texts, is_answer, image_before)


def tokenize(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, in one batched call; "" -> [].

    The ids are `tokenizer(texts, add_special_tokens=False)["input_ids"]`'s. When the Rust backend is
    set up as that call leaves it (no truncation, no padding, special tokens kept whole) it is called
    directly: transformers' conversion of every encoding to Python costs as much as tokenising."""
    wanted = list(dict.fromkeys(text for text in texts if text))  # each distinct text once ("USER: " ...)
    if not wanted:
        return [[] for _ in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == split_special):
        ids = [encoding.ids for encoding in backend.encode_batch(wanted, add_special_tokens=False)]
    else:  # also sets the backend up as above, for the next call
        ids = tokenizer(wanted, add_special_tokens=False)["input_ids"]
    encoded = dict(zip(wanted, ids, strict=True))
    return [encoded[text] if text else [] for text in texts]


def assemble(pieces: Pieces, piece_ids: list[list[int]], bos_id: int | None,
             eos_id: int) -> tuple[list[int], list[bool], int]:
    """(text token ids, label mask, image position) of a conversation: the visual tokens go before
    text token `image position` (-1: none); labels are the answers and their eos."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    mask: list[bool] = [False] * len(ids)
    image_pos = -1
    for index, (piece, answer) in enumerate(zip(piece_ids, pieces.is_answer, strict=True)):
        if index == pieces.image_before:
            image_pos = len(ids)
        if answer:
            piece = [*piece, eos_id]
        ids += piece
        mask += [answer] * len(piece)
    return ids, mask, image_pos


def expand(ids: Sequence[int], mask: Sequence[bool], image_pos: int, image_id: int,
           num_visual_tokens: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): text ids with the visual-token slots inserted at `image_pos`."""
    labels = [token if labelled else IGNORE_INDEX for token, labelled in zip(ids, mask, strict=True)]
    if image_pos < 0:
        return list(ids), labels
    slots = [image_id] * num_visual_tokens
    return (list(ids[:image_pos]) + slots + list(ids[image_pos:]),
            labels[:image_pos] + [IGNORE_INDEX] * num_visual_tokens + labels[image_pos:])


def encode_conversation(
    turns: list[dict], tokenizer: PreTrainedTokenizerFast, num_visual_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a validated conversation under the chat template above (not truncated)."""
    pieces = conversation_pieces(turns)
    ids, mask, image_pos = assemble(pieces, tokenize(tokenizer, pieces.texts), tokenizer.bos_token_id,
                                    tokenizer.eos_token_id)
    return expand(ids, mask, image_pos, image_token_id(tokenizer), num_visual_tokens)


def record_image(record: dict) -> str | None:
    """The record's image name, None for a text-only record (no `image`, or an empty one)."""
    image = record.get("image")
    return image if isinstance(image, str) and image else None


def conversation_problem(record: dict) -> str | None:
    """The reason a record cannot be trained on, or None (images are checked elsewhere)."""
    if "image" in record and record["image"] not in (None, "") and not isinstance(record["image"], str):
        return "bad_image_field"  # e.g. a list: several images per record are not supported
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return "bad_conversation"
    for position, turn in enumerate(turns):
        role = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            return "bad_conversation"
    placeholders = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if record_image(record) is None:
        if placeholders:
            return "image_token_without_image"
    elif IMAGE_TOKEN not in turns[0]["value"]:
        return "misplaced_image_token" if placeholders else "no_image_token"
    elif placeholders > 1:
        return "extra_image_tokens"
    if any(not turn["value"].strip() for turn in turns[1::2]):
        return "empty_answer"
    return None


class Encoded(NamedTuple):
    """A record ready to store: text token ids, label mask, visual-token position (-1: text-only)."""

    index: int
    record_id: str
    task: str
    image: str | None
    ids: list[int]
    mask: list[bool]
    image_pos: int
    truncated: bool


def record_id_of(record, index: int) -> str:
    return str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"


def encode_records(records: Sequence, indices: Sequence[int], tokenizer: PreTrainedTokenizerFast,
                   max_text_tokens: int) -> tuple[list[Encoded], list[tuple[int, str, str]]]:
    """Validate, tokenise (in one batched call) and truncate `records[i]` for i in `indices`: the
    encoded ones and the bad ones as (index, record id, reason). Images are not looked at."""
    good: list[tuple[int, dict, Pieces]] = []
    bad: list[tuple[int, str, str]] = []
    for index in indices:
        record = records[index]
        problem = "not_a_mapping" if not isinstance(record, dict) else conversation_problem(record)
        if problem is not None:
            bad.append((index, record_id_of(record, index), problem))
        else:
            good.append((index, record, conversation_pieces(record["conversations"])))
    flat = tokenize(tokenizer, [text for _, _, pieces in good for text in pieces.texts])
    encoded: list[Encoded] = []
    start = 0
    for index, record, pieces in good:
        piece_ids, start = flat[start:start + len(pieces.texts)], start + len(pieces.texts)
        ids, mask, image_pos = assemble(pieces, piece_ids, tokenizer.bos_token_id, tokenizer.eos_token_id)
        truncated = len(ids) > max_text_tokens
        if truncated:  # text tokens only: the visual tokens sit inside the first prompt and are never cut
            ids, mask = ids[:max_text_tokens], mask[:max_text_tokens]
            if not any(mask[1:]) or image_pos > max_text_tokens:
                bad.append((index, record_id_of(record, index), "too_long"))
                continue
        encoded.append(Encoded(index, record_id_of(record, index), str(record.get("task", "unknown")),
                               record_image(record), ids, mask, image_pos, truncated))
    bad.sort()
    return encoded, bad


def read_records(json_path: Path) -> list:
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
    memory-mapped `cosctl.tokenstore` instead; this is for small sets and tests."""
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
    report = DataReport(str(json_path), len(records), len(examples), dict(Counter(reason for _, _, reason in bad)),
                        [record_id for _, record_id, _ in bad[:MAX_REPORTED_BAD_IDS]],
                        num_truncated,
                        sum(example.image_path is None for example in examples))
    check_bad_fraction(report, max_bad_fraction)
    return examples, report


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square, [0, 1], CLIP-normalised: float32 (3, image_size, image_size)."""
    try:
        return decode_image(path, image_size)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DataError(f"{path}: cannot read image: {exc}") from exc


def collate(examples: Sequence, images: list[torch.Tensor], pad_token_id: int,
            packing: bool = False, image_size: int | None = None) -> dict[str, torch.Tensor]:
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
        return {"input_ids": torch.cat(rows)[None], "labels": torch.cat(targets)[None],
                "position_ids": torch.cat([torch.arange(len(row)) for row in rows])[None],
                "pixel_values": pixel_values}
    num_columns = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), num_columns), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), num_columns), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), num_columns), dtype=torch.long)
    for row, (ids, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = target
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixel_values": pixel_values}
