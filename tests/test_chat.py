"""`cos_model.chat`: a templated string is cut into exactly the pieces its conversation is cut into."""

from __future__ import annotations

import pytest

from cos_model.chat import (
    ANSWER,
    BOS,
    EOS,
    IMAGE,
    PROMPT,
    Piece,
    conversation_pieces,
    encode,
    render,
    template_pieces,
)

CONVERSATIONS = {
    "image_first": [("<image>\nWhat colour is it?", "red")],
    "image_after_text": [("What colour is it?\n<image>", "red")],
    "multi_turn": [("<image>\nHow many?", "3"), ("And squares?", "1"), ("Circles?", "2")],
    "text_only": [("Say hi.", "hi"), ("Again.", "hi hi")],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("open_prompt", [False, True])
def test_template_text_is_cut_where_the_conversation_is(name, open_prompt):
    """template_pieces(render(turns)) == conversation_pieces(turns), whole or as a generation prompt."""
    pairs = list(CONVERSATIONS[name])
    if open_prompt:
        pairs[-1] = (pairs[-1][0], None)
    text = render(pairs, "<s>", "</s>")
    assert template_pieces(text, "<s>", "</s>") == conversation_pieces(pairs)


def test_pieces_of_a_conversation_around_its_image():
    """bos | "USER: " | image | "\\n{question} ASSISTANT: " | answer | eos."""
    assert conversation_pieces([("<image>\nQ?", "A")]) == [
        Piece(BOS),
        Piece(PROMPT, "USER: "),
        Piece(IMAGE),
        Piece(PROMPT, "\nQ? ASSISTANT: "),
        Piece(ANSWER, "A"),
        Piece(EOS),
    ]


def test_users_own_strings_are_cut_alike():
    """No leading bos still starts with bos; an answer begun by the user stays open (no eos); every
    `<image>` of any turn is cut out."""
    assert template_pieces("USER: <image> ASSISTANT: The", "<s>", "</s>") == [
        Piece(BOS),
        Piece(PROMPT, "USER: "),
        Piece(IMAGE),
        Piece(PROMPT, " ASSISTANT: "),
        Piece(ANSWER, "The"),
    ]
    pieces = template_pieces("<s>USER: <image>a ASSISTANT: b</s>USER: <image>c ASSISTANT: ", "<s>", "</s>")
    assert [piece.kind for piece in pieces].count(IMAGE) == 2


class _CountingTokenizer:
    """A stand-in with the attributes `encode` reads: one id per character, bos 1, eos 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_encode_labels_answers_and_their_eos_and_places_images():
    """Labels cover each answer and the eos after it; image positions index the text tokens."""
    [(ids, mask, images)] = encode(_CountingTokenizer(), [conversation_pieces([("<image>x", "ab"), ("y", "c")])])
    assert ids == [
        1,
        *map(ord, "USER: "),
        *map(ord, "x ASSISTANT: "),
        97,
        98,
        2,
        *map(ord, "USER: y ASSISTANT: "),
        99,
        2,
    ]
    assert images == [1 + len("USER: ")]
    labelled = [token for token, flag in zip(ids, mask, strict=True) if flag]
    assert labelled == [97, 98, 2, 99, 2]
