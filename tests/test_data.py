"""Records to examples: chat template and labels, bad-record accounting, images, collate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cosctl.data.conversation import IMAGE_TOKEN, image_token_id
from cosctl.data.images import ImageSource, decodes
from cosctl.data.records import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    load_examples,
    load_image,
    load_tokenizer,
)
from tests.llava import truncated_jpeg, write_llava_set

IMAGE_SIZE = 64


def build(synth_dir: Path, tokenizer, num_visual_tokens: int = 32, json_name: str = "train.json", **kwargs):
    options = {"max_text_tokens": 128, "max_bad_fraction": 0.0, **kwargs}
    return load_examples(synth_dir / json_name, synth_dir, tokenizer, num_visual_tokens, **options)


def test_chat_template_labels_only_answers(synth_dir, tokenizer):
    """Sequence = <s>USER: <32 image ids>\\nQ ASSISTANT: A</s>; only A and </s> carry labels."""
    examples, report = build(synth_dir, tokenizer)
    num_train = len(json.loads((synth_dir / "train.json").read_text()))
    assert (report.num_records, report.num_ok, report.bad) == (num_train, num_train, {}) and num_train >= 36
    records = {r["id"]: r for r in json.loads((synth_dir / "train.json").read_text())}
    image_id = image_token_id(tokenizer)
    for example in examples:
        question, answer = (turn["value"] for turn in records[example.record_id]["conversations"])
        ids, labels = list(example.input_ids), list(example.labels)
        assert len(ids) == len(labels) == example.num_tokens
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids.count(image_id) == 32
        assert all(label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == image_id)
        labelled = [label for label in labels if label != IGNORE_INDEX]
        assert labelled == ids[len(ids) - len(labelled) :]
        assert tokenizer.decode(labelled) == answer + "</s>"
        text = tokenizer.decode([token for token in ids if token != image_id])
        assert text == "<s>USER: " + question.replace(IMAGE_TOKEN, "") + " ASSISTANT: " + answer + "</s>"


def test_multi_turn_conversations_label_every_answer(tmp_path, synth_dir, tokenizer):
    """Two question/answer pairs: both answers and their </s> are labelled, the prompts are not."""
    record = {
        "id": "two",
        "image": str(synth_dir / "images/synth-000000.png"),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "3"},
        ],
    }
    (tmp_path / "two.json").write_text(json.dumps([record]))
    (example,), _ = build(tmp_path, tokenizer, num_visual_tokens=4, json_name="two.json")
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "red</s>3</s>"
    assert example.task == "unknown" and example.image_path == record["image"]


def broken_records(root: Path, synth_dir: Path) -> list:
    """Eight good records plus one of each kind of bad record."""
    good = json.loads((synth_dir / "train.json").read_text())[:8]
    (root / "images").mkdir()
    for record in good:
        shutil.copy(synth_dir / record["image"], root / record["image"])
    (root / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    question, answer = {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}
    image = good[0]["image"]
    return good + [
        {"id": "missing_file", "image": "images/nope.png", "conversations": [question, answer]},
        {"id": "no_image_key", "conversations": [question, answer]},
        {"id": "corrupt", "image": "images/corrupt.png", "conversations": [question, answer]},
        {"id": "no_token", "image": image, "conversations": [{"from": "human", "value": "What?"}, answer]},
        {
            "id": "two_tokens",
            "image": image,
            "conversations": [{"from": "human", "value": "<image> <image>\nWhat?"}, answer],
        },
        {"id": "empty_answer", "image": image, "conversations": [question, {"from": "gpt", "value": "  "}]},
        {"id": "wrong_roles", "image": image, "conversations": [answer, question]},
        {"id": "no_turns", "image": image, "conversations": []},
        ["not", "a", "mapping"],
        {
            "id": "too_long",
            "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + "describe " * 200}, answer],
        },
    ]


def test_each_bad_record_is_counted_by_reason_and_skipped(tmp_path, synth_dir, tokenizer, monkeypatch):
    """Every kind of broken record is skipped and counted under its reason; shared images are read once."""
    (tmp_path / "mixed.json").write_text(json.dumps(broken_records(tmp_path, synth_dir)))
    opened = []
    real_read = ImageSource.read_bytes
    monkeypatch.setattr(ImageSource, "read_bytes", lambda self, image: opened.append(image) or real_read(self, image))
    examples, report = build(tmp_path, tokenizer, json_name="mixed.json", max_bad_fraction=0.6)
    assert report.bad == {
        "missing_image": 1,
        "image_token_without_image": 1,
        "unreadable_image": 1,
        "no_image_token": 1,
        "extra_image_tokens": 1,
        "empty_answer": 1,
        "bad_conversation": 2,
        "not_a_mapping": 1,
        "too_long": 1,
    }
    assert (report.num_records, report.num_ok, report.num_bad) == (18, 8, 10)
    assert report.bad_ids[:3] == ["missing_file", "no_image_key", "corrupt"] and "#16" in report.bad_ids
    assert [example.record_id for example in examples] == [f"synth-{index:06d}" for index in range(8)]
    assert len(opened) == len(set(opened)) == 10  # 8 good, missing, corrupt
    assert "8 ok, 10 bad" in report.summary() and "too_long=1" in report.summary()


def test_too_many_bad_records_raise_with_counts(tmp_path, synth_dir, tokenizer):
    """Above max_bad_fraction the error names the file, the counts per reason and the first bad ids."""
    (tmp_path / "mixed.json").write_text(json.dumps(broken_records(tmp_path, synth_dir)))
    with pytest.raises(DataError) as error:
        build(tmp_path, tokenizer, json_name="mixed.json", max_bad_fraction=0.5)
    message = str(error.value)
    assert "mixed.json" in message and "10 bad" in message
    assert "missing_image=1" in message and "unreadable_image=1" in message and "missing_file" in message
    assert "data.max_bad_fraction" in message and "raise data.max_text_tokens" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "not found"), ("[{bad", "not valid JSON"), ('{"id": 1}', "expected a JSON list"), ("[]", "no records")],
)
def test_unusable_json_file_raises(tmp_path, tokenizer, content, expected):
    """A missing file, invalid JSON, a non-list or an empty list is a DataError naming the file."""
    if content is not None:
        (tmp_path / "train.json").write_text(content)
    with pytest.raises(DataError, match=expected) as error:
        build(tmp_path, tokenizer)
    assert str(tmp_path / "train.json") in str(error.value)


def test_load_tokenizer_adds_image_and_pad_tokens(tmp_path):
    """A tokenizer without <image> or pad gains <image> as one special token and pads with unk."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "red": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("red <image> red", add_special_tokens=False) == [2, image_token_id(tokenizer), 2]
    assert image_token_id(tokenizer) == 3 and tokenizer.pad_token_id == 0
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)


def test_load_image_resizes_and_normalises(tmp_path):
    """Images become CLIP-normalised float32 (3, S, S); an unreadable file is a DataError naming it."""
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "red.png")
    pixels = load_image(tmp_path / "red.png", 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected = [(1.0 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    assert torch.allclose(pixels.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png", 32)


def test_collate_right_pads_tokens_labels_and_mask():
    """Shorter rows are padded with the pad id, IGNORE_INDEX labels and a zero mask; images stack."""
    short = Example("a", "vqa", "a.png", (1, 5, 6), (IGNORE_INDEX, 5, 6), 3)
    long = Example("b", "vqa", "b.png", (1, 7, 8, 9, 2), (IGNORE_INDEX, IGNORE_INDEX, 8, 9, 2), 5)
    batch = collate([short, long], [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)], pad_token_id=3)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 3, 3], [1, 7, 8, 9, 2]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, 5, 6, ignore, ignore], [ignore, ignore, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"][1].sum() == 3 * 64


# --- LLaVA-1.5 records as published: text-only, multi-turn, <image> anywhere, long, damaged images ------


def test_text_only_records_train_without_visual_tokens(tmp_path, synth_dir, tokenizer):
    """A ShareGPT-style record (no `image`, a `model` key) is a valid example with no image tokens;
    `<image>` in a record without an image is a bad record."""
    turns = [
        {"from": "human", "value": "Name a colour."},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Another?"},
        {"from": "gpt", "value": "blue"},
    ]
    records = [
        {"id": "text", "model": "", "conversations": turns},
        {"id": "stray", "conversations": [{"from": "human", "value": "<image> what?"}, turns[1]]},
    ]
    (tmp_path / "text.json").write_text(json.dumps(records))
    (example,), report = build(tmp_path, tokenizer, json_name="text.json", max_bad_fraction=0.5)
    assert example.image_path is None and image_token_id(tokenizer) not in example.input_ids
    assert example.num_text_tokens == example.num_tokens
    assert (
        tokenizer.decode(
            [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        )
        == "red</s>blue</s>"
    )
    assert report.bad == {"image_token_without_image": 1} and report.num_text_only == 1


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_image_placeholder_anywhere_in_the_first_turn(tmp_path, synth_dir, tokenizer, where):
    """`<image>` at the start, middle or end of the first human turn: the visual slots sit exactly
    there, the text around them is unchanged; in a later turn it is a bad record."""
    value = {"start": "<image>\nWhat colour?", "middle": "Look: <image> What colour?", "end": "What colour?\n<image>"}[
        where
    ]
    image = str(synth_dir / "images/synth-000000.png")
    records = [
        {
            "id": "x",
            "image": image,
            "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "late",
            "image": image,
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "<image> and?"},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    (tmp_path / "x.json").write_text(json.dumps(records))
    (example,), report = build(tmp_path, tokenizer, num_visual_tokens=4, json_name="x.json", max_bad_fraction=0.5)
    ids = list(example.input_ids)
    first = ids.index(image_token_id(tokenizer))
    assert ids[first : first + 4] == [image_token_id(tokenizer)] * 4 and ids.count(image_token_id(tokenizer)) == 4
    before, after = value.split("<image>")
    assert tokenizer.decode(ids[:first]) == "<s>USER: " + before
    assert tokenizer.decode(ids[first + 4 :]).startswith(after + " ASSISTANT: red")
    assert report.bad == {"misplaced_image_token": 1}


def test_long_records_are_truncated_keeping_every_visual_token(tmp_path, synth_dir, tokenizer):
    """A record over data.max_text_tokens is cut to that many text tokens, with all its visual tokens
    and the answers that fit; one whose answers would all be cut is bad (too_long)."""
    image = str(synth_dir / "images/synth-000000.png")
    long_answer = "red square " * 100
    records = [
        {
            "id": "long",
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": long_answer},
                {"from": "human", "value": "Short?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "id": "long_prompt",
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\n" + "describe " * 100},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    (tmp_path / "long.json").write_text(json.dumps(records))
    (example,), report = build(tmp_path, tokenizer, json_name="long.json", max_text_tokens=40, max_bad_fraction=0.5)
    assert example.num_text_tokens == 40 and example.num_tokens == 40 + 32
    assert list(example.input_ids).count(image_token_id(tokenizer)) == 32
    full, _ = data_encode(records[0], tokenizer)
    assert list(example.input_ids) == full[:72]
    assert any(label != IGNORE_INDEX for label in example.labels)
    assert report.num_truncated == 1 and report.bad == {"too_long": 1}
    assert "truncated at data.max_text_tokens" in report.summary()


def data_encode(record, tokenizer):
    from cosctl.data.conversation import encode_conversation

    return encode_conversation(record["conversations"], tokenizer, 32)


def test_truncated_jpeg_passes_verify_but_is_a_bad_record(tmp_path, synth_dir, tokenizer):
    """A JPEG written by PIL and cut short passes `Image.verify()`; preparation decodes every pixel,
    so its record is counted as unreadable_image and skipped."""
    records = write_llava_set(synth_dir, tmp_path, num_records=8, truncated=1)
    examples, report = build(tmp_path, tokenizer, max_text_tokens=512, max_bad_fraction=0.2)
    assert report.bad == {"unreadable_image": 1} and report.bad_ids == [records[0]["id"]]
    assert len(examples) == 7 and report.num_text_only == 2
    with pytest.raises(DataError, match="unreadable_image=1.*data.max_bad_fraction"):
        build(tmp_path, tokenizer, max_text_tokens=512, max_bad_fraction=0.0)


def test_truncated_jpeg_does_not_load(tmp_path, synth_dir):
    """load_image names the damaged file."""
    truncated_jpeg(synth_dir / "images/synth-000000.png", tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg", 32)


def test_a_truncated_jpeg_stays_bad_after_a_library_turned_on_pils_tolerance(tmp_path, synth_dir, monkeypatch):
    """Importing lmms-eval sets PIL's LOAD_TRUNCATED_IMAGES for the whole process; a cut-short image
    still fails to load, so it is counted as bad instead of training as grey padding."""
    from PIL import ImageFile

    truncated_jpeg(synth_dir / "images/synth-000000.png", tmp_path / "cut.jpg")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg", 32)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert not decodes((tmp_path / "cut.jpg").read_bytes())  # the check preparation runs


def test_collate_text_only_and_packed(synth_dir, tokenizer):
    """A micro-batch without images has an empty (0, 3, S, S) pixel tensor; a packed one is one row
    with position ids restarting per example and no attention mask."""
    short = Example("a", "t", None, (1, 5, 6), (IGNORE_INDEX, 5, 6), 3)
    long = Example("b", "t", None, (1, 7, 8, 9), (IGNORE_INDEX, IGNORE_INDEX, 8, 9), 4)
    batch = collate([short, long], [], pad_token_id=3, image_size=8)
    assert batch["pixel_values"].shape == (0, 3, 8, 8) and batch["input_ids"].shape == (2, 4)
    packed = collate([short, long], [], pad_token_id=3, packing=True, image_size=8)
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[1, 5, 6, 1, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 8, 9]]


def test_batched_tokenising_gives_the_tokenizers_own_ids(synth_dir, tokenizer):
    """`tokenize` (the Rust backend called directly once it is set up) gives exactly what calling the
    tokenizer gives, special tokens in the text included, also after truncation was switched on."""
    from cosctl.data.conversation import tokenize

    texts = ["USER: What colour is the square? ASSISTANT: ", "red</s> and <image> too", "", " 12, 40, 30, 62"]
    expected = [tokenizer.encode(text, add_special_tokens=False) if text else [] for text in texts]
    assert tokenize(tokenizer, texts) == expected
    tokenizer(["a long text"], add_special_tokens=False, truncation=True, max_length=2)
    assert tokenize(tokenizer, texts) == expected
    assert tokenize(tokenizer, texts) == expected


def test_image_problem_decodes_each_file_once(tmp_path, synth_dir):
    """image_problem (used by eval records) tells missing from damaged, decoding every pixel."""
    from cosctl.data.records import image_problem

    truncated_jpeg(synth_dir / "images/synth-000000.png", tmp_path / "cut.jpg")
    cache: dict = {}
    assert image_problem(synth_dir / "images/synth-000000.png", cache) is None
    assert image_problem(tmp_path / "cut.jpg", cache) == "unreadable_image"
    assert image_problem(tmp_path / "absent.jpg", cache) == "missing_image" and len(cache) == 3
