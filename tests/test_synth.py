"""Synthetic multitask set: determinism, task mix, boxes that match the pixels, tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cosctl.data.synth import PALETTE, TASKS, box_to_text, size_name, synthesize

NUM_SAMPLES = 40
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("first", "again", "other_seed")}
    for name, seed in (("first", 0), ("again", 0), ("other_seed", 1)):
        synthesize(dirs[name], NUM_SAMPLES, seed=seed, image_size=IMAGE_SIZE)
    return dirs


def records(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "train.json").read_text()) + json.loads((out_dir / "eval.json").read_text())


def files_bytes(out_dir: Path) -> dict[str, bytes]:
    paths = sorted(path for path in out_dir.rglob("*") if path.is_file())
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in paths}


def test_same_seed_writes_byte_identical_files(synth_dirs):
    """Two runs with the same arguments write the same json, images and tokenizer, byte for byte."""
    first, again = files_bytes(synth_dirs["first"]), files_bytes(synth_dirs["again"])
    assert len([name for name in first if name.endswith(".png")]) == NUM_SAMPLES
    assert first == again


def test_different_seed_gives_different_data(synth_dirs):
    """Another seed changes the records and the images."""
    first, other = files_bytes(synth_dirs["first"]), files_bytes(synth_dirs["other_seed"])
    assert first["train.json"] != other["train.json"]
    pngs = [name for name in first if name.endswith(".png")]
    assert sum(first[name] != other[name] for name in pngs) == len(pngs)


def test_metadata_counts_every_task_per_split(synth_dirs):
    """synth.json counts each task per split, all four tasks occur, and the splits add up."""
    out_dir = synth_dirs["first"]
    meta = json.loads((out_dir / "synth.json").read_text())
    assert (meta["seed"], meta["num_samples"], meta["image_size"]) == (0, NUM_SAMPLES, IMAGE_SIZE)
    assert (meta["num_train"], meta["num_eval"]) == (36, 4)
    for split in ("train", "eval"):
        split_records = json.loads((out_dir / f"{split}.json").read_text())
        assert meta["tasks"][split] == {task: sum(r["task"] == task for r in split_records) for task in TASKS}
    assert all(meta["tasks"]["train"][task] > 0 for task in TASKS)


def test_records_are_llava_format_with_one_image_each(synth_dirs):
    """Each record points at its png and asks one question after a single leading <image>."""
    out_dir = synth_dirs["first"]
    for record in records(out_dir):
        assert (out_dir / record["image"]).is_file()
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert 0 < len(gpt["value"]) < 250


def test_object_boxes_are_the_drawn_pixels(synth_dirs):
    """Every box lies inside the image and is exactly the extent of its shape's colour."""
    out_dir = synth_dirs["first"]
    for record in records(out_dir):
        pixels = np.asarray(Image.open(out_dir / record["image"]))
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert 2 <= len(record["objects"]) <= 5
        for obj in record["objects"]:
            left, top, right, bottom = obj["box"]
            assert 0 <= left < right <= IMAGE_SIZE and 0 <= top < bottom <= IMAGE_SIZE
            inside = np.all(pixels[top:bottom, left:right] == PALETTE[obj["colour"]], axis=-1)
            rows, columns = np.nonzero(inside)
            extent = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
            assert extent == (0, 0, right - left, bottom - top)


def test_refexp_answer_is_the_box_of_the_named_object(synth_dirs):
    """A referring expression's answer is its object's pixel box in integer percent."""
    refexps = [r for r in records(synth_dirs["first"]) if r["task"] == "refexp"]
    assert refexps
    for record in refexps:
        question, answer = (turn["value"] for turn in record["conversations"])
        colour, shape = re.search(r"the (\w+) (\w+)[.?]", question).groups()
        matches = [obj for obj in record["objects"] if (obj["colour"], obj["shape"]) == (colour, shape)]
        assert len(matches) == 1
        assert answer == box_to_text(tuple(matches[0]["box"]), IMAGE_SIZE)
        percent = [int(value) for value in answer.strip("[]").split(", ")]
        # Integer percent is off by at most half a percent of the side.
        errors = [abs(p * IMAGE_SIZE / 100 - px) for p, px in zip(percent, matches[0]["box"], strict=True)]
        assert max(errors) <= IMAGE_SIZE / 200 + 1e-9


def test_vqa_and_ocr_answers_follow_from_the_scene(synth_dirs):
    """Count, existence and OCR answers equal what the scene annotation says was drawn."""
    checked = 0
    for record in records(synth_dirs["first"]):
        question, answer = (turn["value"] for turn in record["conversations"])
        objects = record["objects"]
        if record["task"] == "ocr":
            assert answer == record["text"]["value"] and re.fullmatch(r"[A-Z0-9]{2,4}", answer)
        elif question.endswith("How many shapes are there?"):
            assert answer == str(len(objects))
        elif match := re.search(r"How many (\w+)s are there\?", question):
            assert answer == str(sum(obj["shape"] == match.group(1) for obj in objects))
        elif match := re.search(r"Is there a (\w+) (\w+)\?", question):
            present = any((obj["colour"], obj["shape"]) == match.groups() for obj in objects)
            assert answer == ("yes" if present else "no")
        else:
            continue
        checked += 1
    assert checked >= 5


def test_scenes_hold_small_shapes_and_small_text(synth_dirs):
    """Most scenes have a small shape, and text is at most a few pixels tall."""
    scenes = records(synth_dirs["first"])
    sizes = [{size_name(obj["box"][2] - obj["box"][0], IMAGE_SIZE) for obj in r["objects"]} for r in scenes]
    with_small = [names for names in sizes if "small" in names]
    assert len(with_small) >= len(scenes) // 2
    texts = [r["text"] for r in scenes if r["text"] is not None]
    assert len(texts) >= len(scenes) // 2
    assert all(text["box"][3] - text["box"][1] <= 12 for text in texts)


def test_tokenizer_loads_with_transformers_and_round_trips(synth_dirs):
    """The saved tokenizer loads both ways with special tokens set and decodes text back unchanged."""
    folder = synth_dirs["first"] / "tokenizer"
    for tokenizer in (PreTrainedTokenizerFast.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)):
        assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "<unk>",
            "<s>",
            "</s>",
            "<pad>",
        )
        assert 300 < len(tokenizer) <= 1024
        text = records(synth_dirs["first"])[0]["conversations"][0]["value"][len("<image>\n") :] + " [12, 40, 30, 62]"
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids


def test_image_placeholder_is_a_single_token(synth_dirs):
    """`<image>` encodes to one special id, also when glued to neighbouring text."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(synth_dirs["first"] / "tokenizer")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.encode("<image>", add_special_tokens=False) == [image_id]
    ids = tokenizer.encode("USER: <image>\nWhat colour?", add_special_tokens=False)
    assert ids.count(image_id) == 1
    assert image_id in tokenizer.all_special_ids


def test_invalid_arguments_are_rejected(tmp_path):
    """Zero samples, tiny images and an eval fraction of 1 are refused before anything is written."""
    invalid = ({"num_samples": 0}, {"num_samples": 4, "image_size": 16}, {"num_samples": 4, "eval_fraction": 1.0})
    for kwargs in invalid:
        with pytest.raises(ValueError):
            synthesize(tmp_path / "out", seed=0, **kwargs)
    assert not (tmp_path / "out").exists()
