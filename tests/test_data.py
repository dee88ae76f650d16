"""Data pipeline: chat template and labels, bad-record accounting, token-budget plans, resumable loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cosctl import data
from cosctl.data import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    DataError,
    Example,
    MicroBatchLoader,
    load_examples,
    collate,
    image_token_id,
    load_image,
    load_tokenizer,
    order_micro_batches,
    samples_per_micro_batch,
)
from cosctl.synth import synthesize

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("synth")
    synthesize(out_dir, num_samples=40, seed=0, image_size=IMAGE_SIZE)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(synth_dir) -> PreTrainedTokenizerFast:
    return load_tokenizer(synth_dir / "tokenizer")


def build(synth_dir: Path, tokenizer, num_visual_tokens: int = 32, json_name: str = "train.json", **kwargs):
    options = {"max_text_tokens": 128, "max_bad_fraction": 0.0, **kwargs}
    return load_examples(synth_dir / json_name, synth_dir, tokenizer, num_visual_tokens, **options)


def make_loader(synth_dir, examples, rank=0, world_size=1, num_workers=0, budget=512) -> MicroBatchLoader:
    return MicroBatchLoader(examples, synth_dir, IMAGE_SIZE, 3, budget, seed=7, rank=rank,
                            world_size=world_size, num_workers=num_workers)


def test_chat_template_labels_only_answers(synth_dir, tokenizer):
    """Sequence = <s>USER: <32 image ids>\\nQ ASSISTANT: A</s>; only A and </s> carry labels."""
    examples, report = build(synth_dir, tokenizer)
    assert (report.num_records, report.num_ok, report.bad) == (36, 36, {})
    records = {r["id"]: r for r in json.loads((synth_dir / "train.json").read_text())}
    image_id = image_token_id(tokenizer)
    for example in examples:
        question, answer = (turn["value"] for turn in records[example.record_id]["conversations"])
        ids, labels = list(example.input_ids), list(example.labels)
        assert len(ids) == len(labels) == example.num_tokens
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids.count(image_id) == 32
        assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == image_id)
        labelled = [label for label in labels if label != IGNORE_INDEX]
        assert labelled == ids[len(ids) - len(labelled):]
        assert tokenizer.decode(labelled) == answer + "</s>"
        text = tokenizer.decode([token for token in ids if token != image_id])
        assert text == "<s>USER: " + question.replace(IMAGE_TOKEN, "") + " ASSISTANT: " + answer + "</s>"


def test_multi_turn_conversations_label_every_answer(tmp_path, synth_dir, tokenizer):
    """Two question/answer pairs: both answers and their </s> are labelled, the prompts are not."""
    record = {"id": "two", "image": str(synth_dir / "images/synth-000000.png"), "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"}]}
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
        {"id": "two_tokens", "image": image, "conversations": [
            {"from": "human", "value": "<image> <image>\nWhat?"}, answer]},
        {"id": "empty_answer", "image": image, "conversations": [question, {"from": "gpt", "value": "  "}]},
        {"id": "wrong_roles", "image": image, "conversations": [answer, question]},
        {"id": "no_turns", "image": image, "conversations": []},
        ["not", "a", "mapping"],
        {"id": "too_long", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + "describe " * 200}, answer]},
    ]


def test_each_bad_record_is_counted_by_reason_and_skipped(tmp_path, synth_dir, tokenizer, monkeypatch):
    """Every kind of broken record is skipped and counted under its reason; shared images open once."""
    (tmp_path / "mixed.json").write_text(json.dumps(broken_records(tmp_path, synth_dir)))
    opened = []
    real_open = data.Image.open
    monkeypatch.setattr(data.Image, "open", lambda path, *args: opened.append(path) or real_open(path, *args))
    examples, report = build(tmp_path, tokenizer, json_name="mixed.json", max_bad_fraction=0.6)
    assert report.bad == {
        "missing_image": 2, "unreadable_image": 1, "no_image_token": 1, "extra_image_tokens": 1,
        "empty_answer": 1, "bad_conversation": 2, "not_a_mapping": 1, "too_long": 1,
    }
    assert (report.num_records, report.num_ok, report.num_bad) == (18, 8, 10)
    assert report.bad_ids[:3] == ["missing_file", "no_image_key", "corrupt"] and "#16" in report.bad_ids
    assert [example.record_id for example in examples] == [f"synth-{index:06d}" for index in range(8)]
    assert len(opened) == len(set(opened)) == 9
    assert "8 ok, 10 bad" in report.summary() and "too_long=1" in report.summary()


def test_too_many_bad_records_raise_with_counts(tmp_path, synth_dir, tokenizer):
    """Above max_bad_fraction the error names the file, the counts per reason and the first bad ids."""
    (tmp_path / "mixed.json").write_text(json.dumps(broken_records(tmp_path, synth_dir)))
    with pytest.raises(DataError) as error:
        build(tmp_path, tokenizer, json_name="mixed.json", max_bad_fraction=0.5)
    message = str(error.value)
    assert "mixed.json" in message and "10 bad" in message
    assert "missing_image=2" in message and "unreadable_image=1" in message and "missing_file" in message


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


def test_plan_covers_every_index_once_within_budget():
    """Each epoch's plan holds every index once, respects the padded-token budget and is reproducible."""
    lengths = [int(length) for length in torch.randint(20, 200, (500,), generator=torch.Generator().manual_seed(0))]
    for epoch in range(3):
        plan = order_micro_batches(lengths, 1024, seed=1, epoch=epoch)
        assert sorted(index for batch in plan for index in batch) == list(range(500))
        assert all(max(lengths[i] for i in batch) * len(batch) <= 1024 for batch in plan)
        assert plan == order_micro_batches(lengths, 1024, seed=1, epoch=epoch)
    assert order_micro_batches(lengths, 1024, 1, 0) != order_micro_batches(lengths, 1024, 1, 1)
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in plan)
    assert padded < 1.1 * sum(lengths)


def test_plan_rejects_an_example_longer_than_the_budget():
    """A single example over budget is an error naming its length and the budget."""
    with pytest.raises(DataError, match="example 1 has 600 tokens.*tokens_per_micro_batch=512"):
        order_micro_batches([100, 600], 512, seed=0, epoch=0)


def test_32_token_stage_packs_far_more_samples_than_528(synth_dir, tokenizer):
    """At one token budget, 32-visual-token examples fill micro-batches with >= 4x the samples of 528."""
    budget = 4096
    mean_samples = {}
    for num_visual_tokens in (32, 528):
        examples, _ = build(synth_dir, tokenizer, num_visual_tokens=num_visual_tokens)
        lengths = [example.num_tokens for example in examples] * 10
        plan = order_micro_batches(lengths, budget, seed=0, epoch=0)
        mean_samples[num_visual_tokens] = len(lengths) / len(plan)
    assert mean_samples[32] >= 4 * mean_samples[528]
    assert samples_per_micro_batch(32, 40, budget) >= 4 * samples_per_micro_batch(528, 40, budget)
    assert samples_per_micro_batch(528, 40, budget) == 7


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


def test_ranks_read_disjoint_samples_in_step(synth_dir, tokenizer):
    """With two ranks, each reads its own micro-batches, they never share a sample, and batches match."""
    examples, _ = build(synth_dir, tokenizer)
    loaders = [make_loader(synth_dir, examples, rank=rank, world_size=2) for rank in range(2)]
    plans = [loader.rank_micro_batches(0) for loader in loaders]
    assert len(plans[0]) == len(plans[1]) >= 2
    seen = [{index for batch in plan for index in batch} for plan in plans]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) >= len(examples) - max(len(batch) for plan in plans for batch in plan)
    for loader, plan in zip(loaders, plans):
        batch = loader.next_micro_batch()
        chosen = [examples[index] for index in plan[0]]
        assert batch["num_samples"] == len(chosen)
        assert batch["pixel_values"].shape == (len(chosen), 3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.equal(batch["input_ids"], collate(chosen, [torch.zeros(3, 1, 1)] * len(chosen), 3)["input_ids"])


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert one.keys() == other.keys() and one["num_samples"] == other["num_samples"]
        assert all(torch.equal(one[key], other[key]) for key in one if key != "num_samples")


@pytest.mark.parametrize("position", ["mid_epoch", "end_of_epoch"])
def test_restored_loader_yields_the_same_batches_across_epochs(synth_dir, tokenizer, position):
    """A loader restored from state_dict() continues with exactly the original's batches, into epoch 2."""
    examples, _ = build(synth_dir, tokenizer)
    original = make_loader(synth_dir, examples, rank=1, world_size=2)
    num_per_epoch = len(original.rank_micro_batches(0))
    num_before = 1 if position == "mid_epoch" else num_per_epoch
    for _ in range(num_before):
        original.next_micro_batch()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_micro_batch() for _ in range(num_per_epoch + 1)]
    assert original.state_dict()["epoch"] == 1 + (position == "end_of_epoch")
    restored = make_loader(synth_dir, examples, rank=1, world_size=2)
    restored.load_state_dict(state)
    assert_same_batches([restored.next_micro_batch() for _ in range(num_per_epoch + 1)], expected)


def test_worker_processes_give_the_same_stream(synth_dir, tokenizer):
    """Loading with DataLoader workers yields the same batches, across an epoch, as loading inline."""
    examples, _ = build(synth_dir, tokenizer)
    inline, workers = (make_loader(synth_dir, examples, num_workers=n, budget=1024) for n in (0, 2))
    num_batches = len(inline.rank_micro_batches(0)) + 1
    assert_same_batches([workers.next_micro_batch() for _ in range(num_batches)],
                        [inline.next_micro_batch() for _ in range(num_batches)])


def test_loader_rejects_too_few_micro_batches_and_bad_state(synth_dir, tokenizer):
    """More ranks than micro-batches, or a state outside the plan, is a DataError."""
    examples, _ = build(synth_dir, tokenizer)
    with pytest.raises(DataError, match="world_size=64"):
        make_loader(synth_dir, examples[:4], rank=0, world_size=64)
    loader = make_loader(synth_dir, examples)
    with pytest.raises(DataError, match="outside the plan"):
        loader.load_state_dict({"epoch": 0, "index": 10_000})


def test_restored_loader_adopts_the_saved_budget(synth_dir, tokenizer):
    """A position saved under another token budget (an `auto` budget probed differently after a resume)
    restores that budget too, so the stream continues with the original's batches."""
    examples, _ = build(synth_dir, tokenizer)
    original = make_loader(synth_dir, examples, budget=1024)
    original.next_micro_batch()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_micro_batch() for _ in range(3)]
    restored = make_loader(synth_dir, examples, budget=512)
    restored.load_state_dict(state)
    assert restored.tokens_per_micro_batch == 1024
    assert_same_batches([restored.next_micro_batch() for _ in range(3)], expected)
    with pytest.raises(DataError, match="must be positive"):
        restored.load_state_dict({**state, "tokens_per_micro_batch": 0})
