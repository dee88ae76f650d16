"""One tokenisation on every path (docs/design.md §5): training (`encode_conversation`), `cosctl eval`'s
prompts (`build_prompt`) and `CosProcessor` on its chat template's output give the same ids for the same
conversation, for the synthetic ByteLevel tokenizer and for Llama/Vicuna SentencePiece tokenizers
(Metaspace, legacy=False and legacy=True), whatever the record's shape.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoTokenizer

from cos_model import IGNORE_INDEX
from cos_model.processing import CosImageProcessor, CosProcessor
from cosctl.data.conversation import encode_conversation
from cosctl.data.records import load_tokenizer, tokenizer_fingerprint
from cosctl.evaluate.records import build_prompt, render_prompt

NUM_VISUAL_TOKENS = 3
TOKENIZERS = ("bytelevel", "llama", "llama-legacy")
SHAPES = ("image_first", "image_after_text", "multi_turn", "text_only")


@pytest.fixture(scope="module")
def tokenizers(tokenizer, llama_tokenizer_dirs) -> dict:
    """The synthetic set's ByteLevel tokenizer and the Llama-style ones, as `load_tokenizer` loads them."""
    return {
        "bytelevel": tokenizer,
        "llama": load_tokenizer(llama_tokenizer_dirs[False]),
        "llama-legacy": load_tokenizer(llama_tokenizer_dirs[True]),
    }


def _turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def shaped_record(synth_dir, shape: str) -> dict:
    """A record of the given shape made from the synthetic set's questions and answers."""
    samples = json.loads((synth_dir / "train.json").read_text())[:3]
    qa = [(s["conversations"][0]["value"].removeprefix("<image>\n"), s["conversations"][1]["value"]) for s in samples]
    (q1, a1), (q2, a2), (q3, a3) = qa
    record = {"id": shape, "image": samples[0]["image"], "task": samples[0]["task"]}
    turns = {
        "image_first": [_turn("human", f"<image>\n{q1}"), _turn("gpt", a1)],
        "image_after_text": [_turn("human", f"{q1}\n<image>"), _turn("gpt", a1)],
        "multi_turn": [
            *[_turn("human", f"<image>\n{q1}"), _turn("gpt", a1)],
            *[_turn("human", q2), _turn("gpt", a2)],
            *[_turn("human", q3), _turn("gpt", a3)],
        ],
        "text_only": [_turn("human", q1), _turn("gpt", a1), _turn("human", q2), _turn("gpt", a2)],
    }[shape]
    if shape == "text_only":
        del record["image"]
    return {**record, "conversations": turns}


def user_content(value: str) -> list[dict]:
    """A human turn as chat-template content: its text and image items in order ("\\n" between them)."""
    before, placeholder, after = value.partition("<image>")
    if not placeholder:
        return [{"type": "text", "text": value}]
    items = [{"type": "text", "text": before.removesuffix("\n")}] if before else []
    items.append({"type": "image"})
    return items + ([{"type": "text", "text": after.removeprefix("\n")}] if after else [])


def messages_of(turns: list[dict]) -> list[dict]:
    """A record's conversation as `apply_chat_template` messages."""
    messages = []
    for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
        messages.append({"role": "user", "content": user_content(human["value"])})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": gpt["value"]}]})
    return messages


def prompt_end(labels: list[int]) -> int:
    """Where the last answer's labels start in a training sequence."""
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def _processed(processor: CosProcessor, text: str, record: dict) -> list[int]:
    images = [Image.new("RGB", (8, 8))] * ("image" in record)
    return processor(images=images, text=text)["input_ids"][0]


def test_llama_folders_are_metaspace_sentencepiece_that_splits_differ_on(llama_tokenizer_dirs, tokenizers):
    """The Llama-style folders use a Metaspace pre-tokenizer ("first" for legacy=False, "always" for
    legacy=True) as loaded, and where a text is cut changes its ids ("<s>USER:" vs "USER:")."""
    for legacy, name in ((False, "llama"), (True, "llama-legacy")):
        saved = json.loads((llama_tokenizer_dirs[legacy] / "tokenizer.json").read_text())["pre_tokenizer"]
        scheme = "always" if legacy else "first"
        assert (saved["type"], saved["prepend_scheme"]) == ("Metaspace", scheme)
        tokenizer = tokenizers[name]
        assert json.loads(tokenizer.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == scheme
        assert type(tokenizer).__name__ == "LlamaTokenizer"
        assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
        assert tokenizer.convert_tokens_to_ids("<image>") == 512
    llama = tokenizers["llama"]
    whole = llama.tokenize("<s>USER: ")
    assert whole[1:] != llama.tokenize("USER: ") and whole[0] == "<s>"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", TOKENIZERS)
def test_processor_tokenises_whole_conversations_as_training(synth_dir, tokenizers, name, shape):
    """apply_chat_template of a whole conversation renders the training text and the processor gives
    encode_conversation's ids, token for token."""
    tokenizer, record = tokenizers[name], shaped_record(synth_dir, shape)
    processor = CosProcessor(CosImageProcessor(image_size=64), tokenizer, num_visual_tokens=NUM_VISUAL_TOKENS)
    turns = record["conversations"]
    text = processor.apply_chat_template(messages_of(turns))
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert text == render_prompt(turns, bos, eos) + turns[-1]["value"] + eos
    expected, _ = encode_conversation(turns, tokenizer, NUM_VISUAL_TOKENS)
    assert _processed(processor, text, record) == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", TOKENIZERS)
def test_generation_prompts_are_the_training_ids_on_every_path(synth_dir, tokenizers, name, shape):
    """The prompt (messages up to the last user turn, add_generation_prompt) through the processor, and
    `cosctl eval`'s prompt (image records: eval needs an image), equal the training ids up to where the
    last answer's labels start; so does the processor on eval's rendered prompt text."""
    tokenizer, record = tokenizers[name], shaped_record(synth_dir, shape)
    processor = CosProcessor(CosImageProcessor(image_size=64), tokenizer, num_visual_tokens=NUM_VISUAL_TOKENS)
    ids, labels = encode_conversation(record["conversations"], tokenizer, NUM_VISUAL_TOKENS)
    expected = ids[: prompt_end(labels)]
    text = processor.apply_chat_template(messages_of(record["conversations"])[:-1], add_generation_prompt=True)
    assert _processed(processor, text, record) == expected
    rendered = render_prompt(record["conversations"], tokenizer.bos_token, tokenizer.eos_token)
    assert text == rendered and _processed(processor, rendered, record) == expected
    if shape != "text_only":
        prompt = build_prompt(record, tokenizer, NUM_VISUAL_TOKENS, synth_dir)
        assert list(prompt.input_ids) == expected and prompt.text == rendered


@pytest.mark.parametrize("legacy", [False, True])
def test_a_saved_llama_tokenizer_loads_back_the_same(llama_tokenizer_dirs, tmp_path, legacy):
    """A tokenizer saved as the stages and the export save it (`save_pretrained` of the loaded one) loads
    back, with transformers' AutoTokenizer and with load_tokenizer, with the same pre-tokenizer and ids."""
    loaded = load_tokenizer(llama_tokenizer_dirs[legacy])
    loaded.save_pretrained(tmp_path)
    for again in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)):
        assert again.backend_tokenizer.to_str() == loaded.backend_tokenizer.to_str()
        assert tokenizer_fingerprint(again) == tokenizer_fingerprint(loaded)
        text = "USER: <image>\nWhat colour is the circle? ASSISTANT: red"
        assert again(text, add_special_tokens=False)["input_ids"] == loaded(text, add_special_tokens=False)["input_ids"]
