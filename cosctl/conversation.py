"""One conversation record -> text token ids and labels: the chat template, validation and truncation
(docs/design.md §5). Reading files of records and collating them is `cosctl.data`'s.

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

from collections.abc import Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerFast

from cos_model import IGNORE_INDEX

IMAGE_TOKEN = "<image>"


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id that marks visual-token positions (one per visual token after expansion)."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


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
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == split_special
    ):
        ids = [encoding.ids for encoding in backend.encode_batch(wanted, add_special_tokens=False)]
    else:  # also sets the backend up as above, for the next call
        ids = tokenizer(wanted, add_special_tokens=False)["input_ids"]
    encoded = dict(zip(wanted, ids, strict=True))
    return [encoded[text] if text else [] for text in texts]


def assemble(
    pieces: Pieces, piece_ids: list[list[int]], bos_id: int | None, eos_id: int
) -> tuple[list[int], list[bool], int]:
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


def expand(
    ids: Sequence[int], mask: Sequence[bool], image_pos: int, image_id: int, num_visual_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels): text ids with the visual-token slots inserted at `image_pos`."""
    labels = [token if labelled else IGNORE_INDEX for token, labelled in zip(ids, mask, strict=True)]
    if image_pos < 0:
        return list(ids), labels
    slots = [image_id] * num_visual_tokens
    return (
        list(ids[:image_pos]) + slots + list(ids[image_pos:]),
        labels[:image_pos] + [IGNORE_INDEX] * num_visual_tokens + labels[image_pos:],
    )


def encode_conversation(
    turns: list[dict], tokenizer: PreTrainedTokenizerFast, num_visual_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a validated conversation under the chat template above (not truncated)."""
    pieces = conversation_pieces(turns)
    ids, mask, image_pos = assemble(
        pieces, tokenize(tokenizer, pieces.texts), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
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


def encode_records(
    records: Sequence, indices: Sequence[int], tokenizer: PreTrainedTokenizerFast, max_text_tokens: int
) -> tuple[list[Encoded], list[tuple[int, str, str]]]:
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
        piece_ids, start = flat[start : start + len(pieces.texts)], start + len(pieces.texts)
        ids, mask, image_pos = assemble(pieces, piece_ids, tokenizer.bos_token_id, tokenizer.eos_token_id)
        truncated = len(ids) > max_text_tokens
        if truncated:  # text tokens only: the visual tokens sit inside the first prompt and are never cut
            ids, mask = ids[:max_text_tokens], mask[:max_text_tokens]
            if not any(mask[1:]) or image_pos > max_text_tokens:
                bad.append((index, record_id_of(record, index), "too_long"))
                continue
        encoded.append(
            Encoded(
                index,
                record_id_of(record, index),
                str(record.get("task", "unknown")),
                record_image(record),
                ids,
                mask,
                image_pos,
                truncated,
            )
        )
    bad.sort()
    return encoded, bad


def num_label_tokens(labels) -> int:
    """Tokens that carry a loss: labels other than IGNORE_INDEX after the causal shift (the first
    position predicts nothing), exactly as transformers' causal-LM loss counts them."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())
