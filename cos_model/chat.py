"""The chat template and how a conversation becomes text token ids: the one definition that training
(`cosctl.data.conversation`), `cosctl eval` and the exported `CosProcessor` share (docs/design.md §5).

    <s>USER: {human_1} ASSISTANT: {answer_1}</s>USER: {human_2} ASSISTANT: {answer_2}</s>...

A conversation is cut into pieces; bos, eos and each `<image>` are never text, and every text piece is
tokenised on its own, without special tokens:

    <s> | "USER: " + human_1 up to <image> | <image> | rest of human_1 + " ASSISTANT: " | answer_1 | </s> |
    "USER: " + human_2 + " ASSISTANT: " | answer_2 | </s> | ...

Where a text is cut decides its ids: a Metaspace pre-tokenizer (Llama/Vicuna SentencePiece) prepends "▁"
to a text's first word, and with `prepend_scheme="first"` (transformers' `legacy=False`) not after a
special token, so "<s>USER:" in one call is `['<s>', 'US', 'ER', ':']` and "USER:" alone `['▁USER', ':']`.
Every path therefore cuts the same way:

- `conversation_pieces(pairs)`: from (human, answer) pairs; training records, eval prompts (last
  answer None: the prompt ends with " ASSISTANT: ");
- `template_pieces(text, bos, eos)`: from a rendered string, `CHAT_TEMPLATE`'s output or a user's own
  string in that form: cut after a leading bos, at each eos, after the first " ASSISTANT: " of each turn
  and around each `<image>`. A message that itself contains bos, eos or " ASSISTANT: " is ambiguous in
  the template and is not supported;
- `encode(tokenizer, conversations)`: pieces -> (ids, label mask, image positions), all texts in one
  batched `tokenize` call. Labels are the answers and the eos that ends each.

An answer is a piece of its own, so it tokenises as the model generates it after "ASSISTANT: ".
Pure Python (the tokenizer is duck-typed): the export ships this file as remote code beside processing.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

IMAGE_TOKEN = "<image>"
USER_PREFIX = "USER: "
ANSWER_PREFIX = " ASSISTANT: "

# Piece kinds: bos and eos are one id each, an image marks where visual tokens go, prompts and answers
# are texts.
BOS, EOS, IMAGE, PROMPT, ANSWER = "bos", "eos", "image", "prompt", "answer"

# The same template for `apply_chat_template`. A user turn's content is a string or a list of items
# rendered in order, joined by "\n" (an image as `<image>`): [image, text] -> "<image>\n{text}" and
# [text, image] -> "{text}\n<image>", LLaVA's two placements. Assistant turns end with eos.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] in ('image', 'text') -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if item['type'] == 'image' -%}{{- '<image>' -}}{%- else -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('only user and assistant turns are supported, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT: ' -}}{%- endif -%}"
)


class Piece(NamedTuple):
    """One piece of a conversation: `kind` BOS, EOS or IMAGE (no text), PROMPT or ANSWER (`text`)."""

    kind: str
    text: str = ""


BOS_PIECE, EOS_PIECE, IMAGE_PIECE = Piece(BOS), Piece(EOS), Piece(IMAGE)


def _prompt_pieces(prompt: str, image_token: str) -> list[Piece]:
    first, *rest = prompt.split(image_token)
    pieces = [Piece(PROMPT, first)]
    for text in rest:
        pieces += [IMAGE_PIECE, Piece(PROMPT, text)]
    return pieces


def conversation_pieces(pairs: Sequence[tuple[str, str | None]], image_token: str = IMAGE_TOKEN) -> list[Piece]:
    """The pieces of (human, answer) turns; a last answer of None leaves the prompt open for generation."""
    pieces = [BOS_PIECE]
    for human, answer in pairs:
        pieces += _prompt_pieces(USER_PREFIX + human + ANSWER_PREFIX, image_token)
        if answer is not None:
            pieces += (Piece(ANSWER, answer), EOS_PIECE)
    return pieces


def render(pairs: Sequence[tuple[str, str | None]], bos_token: str | None, eos_token: str) -> str:
    """The template as text (what `CHAT_TEMPLATE` renders for string contents)."""
    turns = (
        USER_PREFIX + human + ANSWER_PREFIX + ("" if answer is None else answer + eos_token) for human, answer in pairs
    )
    return (bos_token or "") + "".join(turns)


def template_pieces(
    text: str, bos_token: str | None, eos_token: str | None, image_token: str = IMAGE_TOKEN
) -> list[Piece]:
    """The pieces of a templated string, cut where `conversation_pieces` cuts the same conversation
    (bos first whether or not the text starts with it)."""
    if bos_token:
        text = text.removeprefix(bos_token)
    turns = text.split(eos_token) if eos_token else [text]
    pieces = [BOS_PIECE]
    for index, turn in enumerate(turns):
        prompt, prefix, answer = turn.partition(ANSWER_PREFIX)
        if prompt or prefix:
            pieces += _prompt_pieces(prompt + prefix, image_token)
        if answer:
            pieces.append(Piece(ANSWER, answer))
        if index < len(turns) - 1:
            pieces.append(EOS_PIECE)
    return pieces


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
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
    pieces: Sequence[Piece], text_ids: Iterator[list[int]], bos_id: int | None, eos_id: int | None
) -> tuple[list[int], list[bool], list[int]]:
    """(text token ids, label mask, image positions) of one conversation; `text_ids` yields the ids of
    its non-empty texts in order. The visual tokens of image k go before text token `image positions[k]`;
    labels are the answers and the eos right after each."""
    ids: list[int] = []
    mask: list[bool] = []
    images: list[int] = []
    previous = None
    for kind, text in pieces:
        if kind == IMAGE:
            images.append(len(ids))
            continue
        if kind == BOS:
            if bos_id is not None:
                ids.append(bos_id)
                mask.append(False)
        elif kind == EOS:
            ids.append(eos_id)
            mask.append(previous == ANSWER)
        elif text:
            piece = next(text_ids)
            ids += piece
            mask += [kind == ANSWER] * len(piece)
        previous = kind
    return ids, mask, images


def encode(tokenizer, conversations: Sequence[Sequence[Piece]]) -> list[tuple[list[int], list[bool], list[int]]]:
    """`assemble` of each conversation's pieces, every text tokenised in one batched call."""
    text_ids = iter(tokenize(tokenizer, [text for pieces in conversations for _, text in pieces if text]))
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return [assemble(pieces, text_ids, bos_id, eos_id) for pieces in conversations]


__all__ = [
    "ANSWER_PREFIX",
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "USER_PREFIX",
    "Piece",
    "assemble",
    "conversation_pieces",
    "encode",
    "render",
    "template_pieces",
    "tokenize",
]
