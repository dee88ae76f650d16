"""LLaVA-shaped data through the training loop: text-only and long records, packing, a damaged image,
the prepared store reused on restart, and a ZeRO-3 step where one rank's micro-batch has no image."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.data.records import collate, load_examples, load_image, load_tokenizer
from tests.harness import run_script_on_two_ranks
from tests.llava import write_llava_set
from tests.test_train import engine_gradient, relative_difference, tiny_spec

NUM_VISUAL = 32  # the tiny recipe's pretraining chain


@pytest.fixture(scope="module")
def llava_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny synthetic set rewritten as LLaVA-1.5 files: a quarter text-only, a quarter long
    multi-turn (truncated at max_text_tokens=96), one JPEG cut short; eval.json as the synth one."""
    out = tmp_path_factory.mktemp("llava") / "data"
    write_llava_set(tiny_data, out, truncated=1)
    write_llava_set(tiny_data, out, name="eval.json", source="eval.json")
    return out


def mixed_batches(data: Path) -> tuple[dict, dict, list]:
    """A text-only sample and an image sample, each as its own collated micro-batch."""
    tokenizer = load_tokenizer(data / "tokenizer")
    examples, _ = load_examples(data / "train.json", data, tokenizer, NUM_VISUAL, 96, 0.1)
    text = next(e for e in examples if e.image_path is None)
    image = next(e for e in examples if e.image_path is not None)
    pixels = load_image(data / image.image_path, 64)
    return (
        {**collate([text], [], tokenizer.pad_token_id, image_size=64), "num_samples": 1},
        {**collate([image], [pixels], tokenizer.pad_token_id), "num_samples": 1},
        [text, image, pixels, tokenizer.pad_token_id],
    )


def test_packed_micro_batches_give_the_padded_gradient(llava_data, tmp_path):
    """`accumulate` over one packed row (a text-only and an image sample) leaves the gradient of the
    same two samples in padded rows, to 1e-5 relative."""
    spec = tiny_spec(llava_data, tmp_path / "out", 1)
    *_, (text, image, pixels, pad) = mixed_batches(llava_data)
    padded = {**collate([text, image], [pixels], pad), "num_samples": 2}
    packed = {**collate([text, image], [pixels], pad, packing=True), "num_samples": 2}
    assert "attention_mask" not in packed
    assert relative_difference(engine_gradient(spec, [packed]), engine_gradient(spec, [padded])) < 1e-5


@pytest.mark.slow
def test_training_on_llava_records_reuses_its_prepared_store(llava_data, tmp_path, capsys, monkeypatch):
    """Two packed steps over text-only, multi-turn and truncated records (one damaged JPEG skipped at
    preparation), then a restart that resumes: the second start maps the same store without
    tokenising again (its files keep their mtimes) and logs that it does."""
    from cosctl.data import prepare_parts
    from cosctl.train.loop import run_training

    out = tmp_path / "out"
    overrides = [
        "data.max_bad_fraction=0.05",
        "batch.packing=true",
        f"data.prepared={tmp_path / 'prepared'}",
        "eval.every_steps=2",
    ]
    saved = dict(os.environ)
    try:
        first = run_training(tiny_spec(llava_data, out, 2, *overrides), run_dir=tmp_path / "a", output=str(out))
        assert first["steps"] == 2
        logged = capsys.readouterr().out
        assert "unreadable_image=1" in logged and "text-only" in logged and "truncated" in logged
        stores = sorted((tmp_path / "prepared").iterdir())
        assert [p.name.split("-")[0] for p in stores] == ["eval", "train"]
        mtimes = {p: p.stat().st_mtime_ns for store in stores for p in store.iterdir()}

        def no_tokenising(*args, **kwargs):
            raise AssertionError("re-tokenised a prepared split")

        monkeypatch.setattr(prepare_parts, "encode_records", no_tokenising)
        second = run_training(tiny_spec(llava_data, out, 3, *overrides), run_dir=tmp_path / "b", output=str(out))
        logged = capsys.readouterr().out
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert second["steps"] == 3 and second["budget_origin"] == "checkpoint"
    assert logged.count("data: using prepared") == 2 and "preparing" not in logged
    assert {p: p.stat().st_mtime_ns for store in stores for p in store.iterdir()} == mtimes
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens"] > 0 for r in records if "loss" in r)


ZERO3_SCRIPT = """
import os, sys, torch
from pathlib import Path
from tests.test_data_train import mixed_batches
from tests.test_train import engine_gradient, tiny_spec
data, out = Path(sys.argv[1]), Path(sys.argv[2])
text, image, _ = mixed_batches(data)
rank = int(os.environ["RANK"])
grads = engine_gradient(tiny_spec(data, out / "run", 1), [text] if rank == 0 else [image])
if torch.distributed.get_rank() == 0:
    torch.save(grads, out / "grads.pt")
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_step_where_one_rank_has_no_image(llava_data, tmp_path):
    """Two ZeRO-3 ranks, rank 0's micro-batch text-only (no image at all), rank 1's with an image: the
    step completes (no collective hangs) with the gradient of both samples in one micro-batch on one
    process, to 1e-5 relative."""
    from tests.test_train import reference_gradient

    run_script_on_two_ranks(ZERO3_SCRIPT, tmp_path, str(llava_data), str(tmp_path))
    text, image, _ = mixed_batches(llava_data)
    assert text["pixel_values"].shape[0] == 0 and bool((text["labels"] != IGNORE_INDEX).any())
    expected = reference_gradient(llava_data, tiny_spec(llava_data, tmp_path / "run", 1), text, image)
    got = torch.load(tmp_path / "grads.pt")
    assert relative_difference(got, expected) < 1e-5
