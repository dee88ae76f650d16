"""LLaVA-format records -> validated token sequences (examples) -> collated tensors (docs/design.md §5).

Owns reading conversation JSON (`[{"id", "image", "conversations": [{"from": "human"|"gpt",
"value"}...]}]`), rejecting and counting bad records, the chat template and its labels, image loading
and collating. How examples are grouped into steps and micro-batches is `cosctl.batching`'s.

Chat template, one sequence per record (`<s>`/`</s>` are the tokenizer's bos/eos ids):

    <s>USER: {human_1} ASSISTANT: {gpt_1}</s>USER: {human_2} ASSISTANT: {gpt_2}</s>...

- The single `<image>` placeholder (first human turn) becomes `num_visual_tokens` copies of the image
  token id; the model writes the visual tokens into exactly those positions.
- Labels are IGNORE_INDEX everywhere except each answer and its `</s>`.
- The text before `<image>`, the rest of each prompt and each answer are tokenised separately, so the
  placeholder never merges with its neighbours and an answer tokenises as it is generated after
  "ASSISTANT: ".
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cos_model import IGNORE_INDEX

from .errors import DataError

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_REPORTED_BAD_IDS = 10


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


@dataclass(frozen=True)
class Example:
    """One validated record as model input; `labels` align with `input_ids` (the model shifts).
    `image_path` is the record's own, relative to the image root unless absolute. `num_text_tokens`
    counts the tokens that are not visual-token slots (recorded where the slots are inserted)."""

    record_id: str
    task: str
    image_path: str
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


def length_stats(examples: Sequence[Example]) -> LengthStats:
    text = [example.num_text_tokens for example in examples]
    return LengthStats(min(text), sum(text) // len(text), max(example.num_tokens for example in examples))


@dataclass
class DataReport:
    """What `load_examples` kept and why it dropped the rest."""

    source: str
    num_records: int
    num_ok: int
    bad: dict[str, int] = field(default_factory=dict)
    bad_ids: list[str] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return self.num_records - self.num_ok

    def summary(self) -> str:
        line = f"{self.source}: {self.num_records} records, {self.num_ok} ok, {self.num_bad} bad"
        if self.bad:
            reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad.items()))
            line += f" ({reasons}; first bad ids: {', '.join(self.bad_ids)})"
        return line


def encode_conversation(
    turns: list[dict], tokenizer: PreTrainedTokenizerFast, num_visual_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a validated conversation under the chat template above."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    input_ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX] * len(input_ids)
    for human, gpt in zip(turns[0::2], turns[1::2]):
        before, placeholder, after = ("USER: " + human["value"] + " ASSISTANT: ").partition(IMAGE_TOKEN)
        prompt = encode(before)
        if placeholder:
            prompt += [image_token_id(tokenizer)] * num_visual_tokens + encode(after)
        answer = encode(gpt["value"]) + [tokenizer.eos_token_id]
        input_ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return input_ids, labels


def conversation_problem(record: dict) -> str | None:
    """The reason a record's conversation cannot be trained on, or None."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return "bad_conversation"
    for position, turn in enumerate(turns):
        role = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            return "bad_conversation"
    if IMAGE_TOKEN not in turns[0]["value"]:
        return "no_image_token"
    if sum(turn["value"].count(IMAGE_TOKEN) for turn in turns) > 1:
        return "extra_image_tokens"
    if any(not turn["value"].strip() for turn in turns[1::2]):
        return "empty_answer"
    return None


def resolve_image_path(image_root: str | Path, image: str) -> Path:
    """`image` relative to `image_root`; absolute paths are kept."""
    path = Path(image)
    return path if path.is_absolute() else Path(image_root) / path


def image_problem(path: Path, cache: dict[Path, str | None]) -> str | None:
    """'missing_image', 'unreadable_image' or None; each file is opened once per `cache`."""
    if path not in cache:
        problem = None
        if not path.is_file():
            problem = "missing_image"
        else:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) for damage
                problem = "unreadable_image"
        cache[path] = problem
    return cache[path]


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


def load_examples(
    json_path: str | Path,
    image_root: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    num_visual_tokens: int,
    max_text_tokens: int,
    max_bad_fraction: float,
) -> tuple[list[Example], DataReport]:
    """Validate and tokenise every record; skip bad ones, and raise if more than
    `max_bad_fraction` of them are bad (or none is usable)."""
    json_path = Path(json_path)
    records = read_records(json_path)
    examples: list[Example] = []
    bad: Counter[str] = Counter()
    bad_ids: list[str] = []
    checked_images: dict[Path, str | None] = {}
    for index, record in enumerate(records):
        is_mapping = isinstance(record, dict)
        record_id = str(record.get("id", f"#{index}")) if is_mapping else f"#{index}"
        problem = "not_a_mapping" if not is_mapping else conversation_problem(record)
        if problem is None:
            image = record.get("image")
            image_path = resolve_image_path(image_root, image) if isinstance(image, str) and image else None
            problem = "missing_image" if image_path is None else image_problem(image_path, checked_images)
        if problem is None:
            input_ids, labels = encode_conversation(record["conversations"], tokenizer, num_visual_tokens)
            num_text_tokens = len(input_ids) - num_visual_tokens  # one image per record
            if num_text_tokens > max_text_tokens:
                problem = "too_long"
        if problem is not None:
            bad[problem] += 1
            if len(bad_ids) < MAX_REPORTED_BAD_IDS:
                bad_ids.append(record_id)
            continue
        task = str(record.get("task", "unknown"))
        examples.append(Example(record_id, task, image, tuple(input_ids), tuple(labels), num_text_tokens))
    report = DataReport(str(json_path), len(records), len(examples), dict(bad), bad_ids)
    bad_fraction = report.num_bad / report.num_records
    if bad_fraction > max_bad_fraction or not examples:
        raise DataError(f"{report.summary()}: {bad_fraction:.1%} bad, max_bad_fraction={max_bad_fraction:.1%}")
    return examples, report


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square, [0, 1], CLIP-normalised: float32 (3, image_size, image_size)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    except Exception as exc:  # PIL raises many types for damaged files
        raise DataError(f"{path}: cannot read image: {exc}") from exc
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def collate(examples: Sequence[Example], images: list[torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows to the longest example and stack the images."""
    num_columns = max(example.num_tokens for example in examples)
    input_ids = torch.full((len(examples), num_columns), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), num_columns), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), num_columns), dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : example.num_tokens] = torch.tensor(example.input_ids)
        labels[row, : example.num_tokens] = torch.tensor(example.labels)
        attention_mask[row, : example.num_tokens] = 1
    pixel_values = torch.stack(images)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "pixel_values": pixel_values}
