"""One conversation record -> text token ids and labels: validation and truncation of training records
(docs/design.md §5). Reading files of records and collating them is `cosctl.data.records`'s.

The chat template and how a conversation is cut into pieces and tokenised are `cos_model.chat`'s, the one
definition that `cosctl eval` and the exported `CosProcessor` use too, so a conversation has the same ids
on every path, whatever the tokenizer (ByteLevel BPE, Llama/Vicuna SentencePiece with Metaspace):

    <s>USER: {human_1} ASSISTANT: {gpt_1}</s>USER: {human_2} ASSISTANT: {gpt_2}</s>...

- A record with an `image` has one `<image>` placeholder, anywhere in its first human turn; it becomes
  `num_visual_tokens` copies of the image token id, where the model writes the visual tokens. A record
  without `image` (LLaVA-1.5's text-only conversations) has no placeholder and no visual tokens.
- Labels are IGNORE_INDEX everywhere except each answer and its `</s>`.
- A record with more than `data.max_text_tokens` text tokens is cut there (visual tokens are never cut
  and never counted); one whose answers would all be cut off is a bad record (`too_long`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformers import PreTrainedTokenizerFast

from cos_model import IGNORE_INDEX
from cos_model.chat import IMAGE_TOKEN, Piece, encode, tokenize
from cos_model.chat import assemble as assemble_pieces
from cos_model.chat import conversation_pieces as chat_pieces

__all__ = [
    "IMAGE_TOKEN",
    "Encoded",
    "assemble",
    "conversation_pieces",
    "conversation_problem",
    "encode_conversation",
    "encode_records",
    "expand",
    "image_token_id",
    "num_label_tokens",
    "record_id_of",
    "record_image",
    "tokenize",
]


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """The id that marks visual-token positions (one per visual token after expansion)."""
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def conversation_pieces(turns: list[dict]) -> list[Piece]:
    """A validated record's turns cut into the pieces `cos_model.chat` tokenises one by one."""
    return chat_pieces([(human["value"], gpt["value"]) for human, gpt in zip(turns[0::2], turns[1::2], strict=True)])


def assemble(
    pieces: list[Piece], piece_ids: Sequence[list[int]], bos_id: int | None, eos_id: int
) -> tuple[list[int], list[bool], int]:
    """(text token ids, label mask, image position) of a training conversation from the ids of its text
    pieces: the visual tokens go before text token `image position` (-1: none); labels are the answers
    and their eos."""
    ids, mask, images = assemble_pieces(pieces, iter(piece_ids), bos_id, eos_id)
    return ids, mask, _image_pos(images)


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


def _image_pos(images: list[int]) -> int:
    return images[0] if images else -1  # a training record has at most one image


def encode_conversation(
    turns: list[dict], tokenizer: PreTrainedTokenizerFast, num_visual_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a validated conversation under the chat template above (not truncated)."""
    ids, mask, images = encode(tokenizer, [conversation_pieces(turns)])[0]
    return expand(ids, mask, _image_pos(images), image_token_id(tokenizer), num_visual_tokens)


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
    good: list[tuple[int, dict]] = []
    bad: list[tuple[int, str, str]] = []
    for index in indices:
        record = records[index]
        problem = "not_a_mapping" if not isinstance(record, dict) else conversation_problem(record)
        if problem is not None:
            bad.append((index, record_id_of(record, index), problem))
        else:
            good.append((index, record))
    assembled = encode(tokenizer, [conversation_pieces(record["conversations"]) for _, record in good])
    encoded: list[Encoded] = []
    for (index, record), (ids, mask, images) in zip(good, assembled, strict=True):
        image_pos = _image_pos(images)
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
