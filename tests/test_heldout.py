"""Held-out evaluation during training (cosctl.train.heldout) on sets shaped like LLaVA-1.5's published mix:
micro-batches collated by the real collate, text-only micro-batches and runs of them, swapped images
that always differ from a record's own, and the held-out file and images under an s3:// data root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosctl.data.records import load_examples, load_tokenizer
from cosctl.train.heldout import ImageSwap, swap_partners
from cosctl.train.loader import ExampleRecords
from cosctl.train.run import held_out_batches
from tests.conftest_s3 import create_bucket, use_credentials
from tests.harness import run, steps, tiny_spec, train_command
from tests.llava import write_llava665k_set

IMAGE_SIZE = 64
BUDGET = 256  # two image records (32 visual + at most 96 text tokens) per micro-batch


def text_only_at_both_ends(path: Path, num_first: int = 6, num_last: int = 6) -> list[dict]:
    """Rewrite a LLaVA-665K-shaped file so that it opens with its first `num_first` text-only records
    and closes with its last `num_last` (as a held-out split cut inside ShareGPT blocks), the other
    records between in their order; returns them."""
    records = json.loads(path.read_text())
    text_only = [index for index, record in enumerate(records) if "image" not in record]
    assert len(text_only) >= num_first + num_last, "the seed gives too few text-only records"
    first, last = text_only[:num_first], text_only[len(text_only) - num_last :]
    middle = [index for index in range(len(records)) if index not in first + last]
    reordered = [records[index] for index in first + middle + last]
    path.write_text(json.dumps(reordered, indent=1))
    return reordered


def collated(path: Path, tokenizer, num_batches: int = 64):
    """The held-out micro-batches of `path` exactly as a run builds them (`cosctl.train.run.held_out_batches`)."""
    examples, _ = load_examples(path, path.parent, tokenizer, 32, 96, 1.0)
    records = ExampleRecords(examples, path.parent)
    return held_out_batches(
        records, image_size=IMAGE_SIZE, pad_token_id=tokenizer.pad_token_id, tokens_per_micro_batch=BUDGET,
        num_batches=num_batches,
    )  # fmt: skip


@pytest.fixture
def llava665k_heldout(tmp_path, synth_dir) -> Path:
    """A held-out file of 80 records shaped like llava_v1_5_mix665k.json, text-only runs at both ends."""
    path = write_llava665k_set(tmp_path / "llava", synth_dir, 80, seed=3, name="eval.json")
    text_only_at_both_ends(path)
    return path


def test_every_image_record_is_scored_with_another_image(llava665k_heldout, tokenizer):
    """On LLaVA-665K-shaped held-out batches from the real collate (text-only micro-batches first and
    last, empty (0, 3, s, s) pixels): each image row gets the pixels of the next distinct image's first
    row, never its own image, although neighbours often share one; text-only micro-batches keep their
    empty tensors; the swapped count is every record with an image."""
    batches = collated(llava665k_heldout, tokenizer)
    empty = (0, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batches[0].inputs["pixel_values"].shape == batches[-1].inputs["pixel_values"].shape == empty
    assert batches[0].images == batches[-1].images == ()
    names = [name for batch in batches for name in batch.images]
    assert sum(a == b for a, b in zip(names, names[1:], strict=False)) >= 10  # records in a row on one image
    swap = ImageSwap(batches)
    assert swap.num_swapped == len(names) == sum(len(b.inputs["pixel_values"]) for b in batches)
    distinct = list(dict.fromkeys(names))
    first_rows = {}
    for batch in batches:
        for row, name in enumerate(batch.images):
            first_rows.setdefault(name, batch.inputs["pixel_values"][row])
    for index, batch in enumerate(batches):
        own, swapped = batch.inputs["pixel_values"], swap(index)
        assert swapped.shape == own.shape
        for row, name in enumerate(batch.images):
            partner = distinct[(distinct.index(name) + 1) % len(distinct)]
            assert partner != name and torch.equal(swapped[row], first_rows[partner])
            assert not torch.equal(swapped[row], own[row])
    assert swap_partners([batch.images for batch in batches]) == swap.partner  # a pure function of the names


def test_one_distinct_image_or_none_swaps_nothing(tmp_path, synth_dir, tokenizer):
    """A held-out set whose image records all show one image, or that is text-only throughout, has
    nothing to swap: no partners, no swapped records, every micro-batch's pixels as collated."""
    path = write_llava665k_set(tmp_path / "llava", synth_dir, 60, seed=3, name="eval.json")
    records = json.loads(path.read_text())
    one_image = next(r["image"] for r in records if "image" in r)
    for case in ("one image", "text only"):
        if case == "one image":
            kept = [{**r, "image": one_image} if "image" in r else r for r in records]
        else:
            kept = [r for r in records if "image" not in r]
        path.write_text(json.dumps(kept))
        batches = collated(path, tokenizer)
        swap = ImageSwap(batches)
        assert swap.partner == {} and swap.num_swapped == 0, case
        assert all(swap(i) is batch.inputs["pixel_values"] for i, batch in enumerate(batches)), case
    assert all(batch.inputs["pixel_values"].shape[0] == 0 for batch in batches)


def test_generation_eval_takes_the_first_held_out_records_text_only_ones_included(tmp_path, synth_dir):
    """The training loop's generation eval takes the first `eval.generate_samples` held-out records in
    file order, the text-only run that opens a LLaVA-665K-shaped split included, as `cosctl eval` would."""
    from types import SimpleNamespace

    from cosctl.train.heldout import GenerationEval

    path = write_llava665k_set(tmp_path / "data", synth_dir, 60, seed=1, name="eval.json", source="eval.json")
    records = text_only_at_both_ends(path)
    spec = tiny_spec(path.parent, tmp_path / "out", 2, "eval.generate_every_steps=2", "eval.generate_samples=9")
    picked = GenerationEval(SimpleNamespace(spec=spec)).records
    assert picked == records[:9]
    assert sum("image" not in record for record in picked) == 6


def llava665k_root(root: Path, tiny_data: Path) -> Path:
    """A data root with a 120-record LLaVA-665K-shaped train.json and a 60-record eval.json that opens
    and closes with text-only runs, images and tokenizer beside them."""
    write_llava665k_set(root, tiny_data, 120, seed=0)
    text_only_at_both_ends(write_llava665k_set(root, tiny_data, 60, seed=1, name="eval.json", source="eval.json"))
    return root


def eval_records(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


def expected_swapped(root: Path, num_batches: int = 64) -> int:
    """Records with an image among the evaluated held-out records, counted from the file."""
    tokenizer = load_tokenizer(root / "tokenizer")
    return sum(len(batch.images) for batch in collated(root / "eval.json", tokenizer, num_batches))


@pytest.mark.slow
def test_one_rank_evaluates_a_llava665k_split_with_text_only_ends(tiny_data, tmp_path, in_process):
    """One rank in this process, held-out batches collated by the run from a LLaVA-665K-shaped split whose
    first and last micro-batches are text-only: every eval logs the loss, the swapped-image loss and
    the count of records given another image; generation on the same split generates for its first
    records, the text-only run that opens it (ShareGPT: task `unknown`, exact match)."""
    root = llava665k_root(tmp_path / "data", tiny_data)
    spec = tiny_spec(
        root, tmp_path / "out", 2, "eval.every_steps=2", f"batch.tokens_per_micro_batch={BUDGET}",
        "eval.generate_every_steps=2", "eval.generate_samples=4", "eval.generate_max_new_tokens=4",
    )  # fmt: skip
    in_process(spec, tmp_path / "work")
    evals = eval_records(tmp_path / "work")
    assert sorted(evals) == [0, 2]
    for record in evals.values():
        assert record["eval_loss_swapped_images"] != record["eval_loss"] > 0
        assert record["eval_swapped_records"] == expected_swapped(root) > 0
    assert [key for key in evals[2] if key.startswith("eval/")] == ["eval/unknown/exact_match"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_evaluate_a_llava665k_split_with_text_only_ends(tiny_data, tmp_path):
    """Two ZeRO-3 ranks evaluate the same LLaVA-665K-shaped held-out batches, text-only micro-batches
    included (collective forwards with and without the vision tower in step): both losses and the
    swapped count at steps 0 and 2."""
    root = llava665k_root(tmp_path / "data", tiny_data)
    cmd = train_command(
        root, tmp_path / "work", tmp_path / "out", 2, 2, "eval.every_steps=2", f"batch.tokens_per_micro_batch={BUDGET}"
    )
    run(cmd, tmp_path)
    evals = eval_records(tmp_path / "work")
    assert sorted(evals) == [0, 2] and sorted(steps(tmp_path / "work")) == [1, 2]
    for record in evals.values():
        assert record["eval_loss_swapped_images"] != record["eval_loss"] > 0
        assert record["eval_swapped_records"] == expected_swapped(root) > 0


def upload(server, bucket: str, folder: Path, prefix: str) -> None:
    """The data root's files uploaded by another S3 client, as a user fills a bucket."""
    client = server.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "tokenizer" not in path.parts:
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.mark.s3
@pytest.mark.slow
def test_held_out_loss_and_generation_read_an_s3_data_root(
    tiny_data, tmp_path, in_process, moto_server, s3_env, monkeypatch
):
    """data.root = s3://BUCKET/PREFIX: the held-out loss (own and swapped images) and the generation eval
    read the held-out file and images through the object store, and log what the same files on disk give."""
    root = llava665k_root(tmp_path / "data", tiny_data)
    use_credentials(monkeypatch, moto_server)
    bucket = create_bucket(moto_server)
    upload(moto_server, bucket, root, "llava")
    overrides = [
        "eval.every_steps=1", f"batch.tokens_per_micro_batch={BUDGET}", "eval.generate_every_steps=1",
        "eval.generate_samples=4", "eval.generate_max_new_tokens=4", f"storage.endpoint_url={s3_env}",
        "storage.path_style=true",
    ]  # fmt: skip
    logged = {}
    for name, data_root in (("s3", f"s3://{bucket}/llava"), ("disk", str(root))):
        spec = tiny_spec(root, tmp_path / f"out-{name}", 1, f"data.root={data_root}",
                         f"data.cache_dir={tmp_path / 'cache'}", *overrides)  # fmt: skip
        in_process(spec, tmp_path / name)
        logged[name] = eval_records(tmp_path / name)
    assert logged["s3"][1]["eval_swapped_records"] == expected_swapped(root)
    generated = [key for key in logged["s3"][1] if key.startswith("eval/")]
    assert generated and all(logged["s3"][1][key] == logged["disk"][1][key] for key in generated)
    for key in ("eval_loss", "eval_loss_swapped_images"):
        assert logged["s3"][1][key] == pytest.approx(logged["disk"][1][key], rel=1e-6)
