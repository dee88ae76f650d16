"""Prepared token stores: prepared once, keyed by content, reused after a restart, mapped by the loader;
images that fail at run time; data under an s3:// root (moto, and Ceph when required)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.common.errors import StorageError
from cosctl.common.log import setup_logging
from cosctl.data import prepare_parts, tokenstore
from cosctl.data.prepare import load_split, prepare_split
from cosctl.data.records import DataError, load_examples, load_tokenizer
from cosctl.data.split import SplitSource, split_key
from cosctl.data.tokenstore import TokenStore
from cosctl.storage import StoreSettings
from cosctl.train.loader import StepLoader
from tests.conftest_s3 import create_bucket, use_credentials
from tests.llava import truncated_jpeg, write_llava_set

IMAGE_SIZE = 64
NUM_VISUAL = 32


@pytest.fixture
def llava_dir(tmp_path, synth_dir) -> Path:
    """A LLaVA-shaped set of 40 records (a quarter text-only, a quarter long multi-turn), one
    truncated JPEG."""
    write_llava_set(synth_dir, tmp_path / "llava", num_records=40, truncated=1)
    return tmp_path / "llava"


def source_for(root, *, max_text_tokens: int = 48, image_check: str = "decode", **kwargs) -> SplitSource:
    cache = kwargs.pop("cache_dir", None)
    return SplitSource(
        root=str(root),
        name=kwargs.pop("name", "train.json"),
        max_text_tokens=max_text_tokens,
        image_check=image_check,
        cache_dir=Path(cache) if cache else None,
        **kwargs,
    )


def load(source: SplitSource, tokenizer, max_bad_fraction: float = 0.1, workers: int = 0):
    return load_split(
        source, tokenizer, num_visual_tokens=NUM_VISUAL, max_bad_fraction=max_bad_fraction, workers=workers
    )


def test_store_holds_what_load_examples_builds(llava_dir, tokenizer):
    """The mapped store gives, record for record, the in-memory examples' ids, labels, images and
    report (text-only, multi-turn, truncated, and the truncated JPEG skipped)."""
    records = load(source_for(llava_dir), tokenizer)
    examples, report = load_examples(llava_dir / "train.json", llava_dir, tokenizer, NUM_VISUAL, 48, 0.1)
    assert len(records) == len(examples) == 39
    assert records.store.report.bad == report.bad == {"unreadable_image": 1}
    assert records.store.report.num_truncated == report.num_truncated > 0
    assert records.store.report.num_text_only == report.num_text_only == 10
    for index, example in enumerate(examples):
        sample = records.sample(index)
        assert sample.record_id == example.record_id and sample.image == example.image_path
        assert sample.input_ids.tolist() == list(example.input_ids)
        assert sample.labels.tolist() == list(example.labels)
        assert records.lengths[index] == example.num_tokens
    assert records.length_stats().max_tokens == max(example.num_tokens for example in examples)


def test_prepared_store_is_reused_after_a_restart(llava_dir, tokenizer, monkeypatch, capsys):
    """A second start with the same inputs maps the first one's store: nothing is tokenised again and
    no file is rewritten; it logs that it uses the prepared store."""
    source = source_for(llava_dir)
    setup_logging(0, None)
    first = load(source, tokenizer)
    folder = first.store.folder
    assert folder.parent == llava_dir / "prepared" and "preparing" in capsys.readouterr().out
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no parts or staging left
    mtimes = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    def no_tokenising(*args, **kwargs):
        raise AssertionError("re-tokenised a prepared split")

    monkeypatch.setattr(prepare_parts, "encode_records", no_tokenising)
    second = load(source, tokenizer)
    assert second.store.folder == folder
    logged = capsys.readouterr().out
    assert "data: using prepared" in logged and "preparing" not in logged
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == mtimes
    assert np.array_equal(second.lengths, first.lengths)


def test_the_key_follows_content_tokenizer_and_settings(llava_dir, tokenizer, tmp_path):
    """Same size and mtime but other bytes: a new key. Another max_text_tokens: a new key. The same
    tokenizer files in another folder: the same key."""
    source = source_for(llava_dir)
    path = llava_dir / "train.json"
    key = split_key(source, tokenizer)[0]
    text, stat = path.read_text(), path.stat()
    path.write_text(text.replace("Are you sure?", "Are you SURE?", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert split_key(source, tokenizer)[0] != key
    path.write_text(text)
    assert split_key(source, tokenizer)[0] == key
    assert split_key(source_for(llava_dir, max_text_tokens=64), tokenizer)[0] != key
    shutil.copytree(llava_dir / "tokenizer", tmp_path / "elsewhere")
    assert split_key(source, load_tokenizer(tmp_path / "elsewhere"))[0] == key


def test_child_and_worker_processes_prepare_the_same_store(llava_dir, tokenizer, tmp_path):
    """Preparing in a spawned child (large files), and there with two worker processes, writes the same
    arrays as preparing in the calling process."""
    inline = prepare_split(source_for(llava_dir, prepared=str(tmp_path / "a")), tokenizer, workers=0)
    child = prepare_split(source_for(llava_dir, prepared=str(tmp_path / "b")), tokenizer, workers=0, child_min_bytes=0)
    pooled = prepare_split(source_for(llava_dir, prepared=str(tmp_path / "c")), tokenizer, workers=2)
    for other in (child, pooled):
        for name in tokenstore.ARRAYS:
            assert np.array_equal(getattr(inline, name), getattr(other, name)), name
        assert inline.meta["report"] == other.meta["report"] and inline.key == other.key


def test_too_many_bad_records_name_the_settings(llava_dir, tokenizer):
    """Over data.max_bad_fraction: one DataError naming the file, the reasons and the settings."""
    with pytest.raises(DataError, match=r"train.json.*unreadable_image=1.*data.max_bad_fraction"):
        load(source_for(llava_dir), tokenizer, max_bad_fraction=0.0)
    with pytest.raises(DataError, match=r"too_long=\d+.*raise data.max_text_tokens"):
        load(source_for(llava_dir, max_text_tokens=8), tokenizer, max_bad_fraction=0.0)


def test_a_store_that_cannot_be_written_names_data_prepared(llava_dir, tokenizer, tmp_path):
    """An unwritable prepared location is a DataError naming data.prepared."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="data.prepared"):
        load(source_for(llava_dir, prepared=str(blocker / "sub")), tokenizer)


def test_a_store_is_picklable_by_path(llava_dir, tokenizer):
    """Pickling a store's records (for spawned workers) carries its path, not its arrays."""
    import pickle

    records = load(source_for(llava_dir), tokenizer)
    blob = pickle.dumps(records)
    assert len(blob) < 4096
    copy = pickle.loads(blob)
    assert copy.sample(3).input_ids.tolist() == records.sample(3).input_ids.tolist()


# --- run time: images that fail after preparation, worker errors ------------------------------------


def loader_over(records, **kwargs) -> StepLoader:
    options = {
        "image_size": IMAGE_SIZE,
        "pad_token_id": 3,
        "tokens_per_micro_batch": 1024,
        "samples_per_step": 8,
        "seed": 7,
        "rank": 0,
        "world_size": 1,
        **kwargs,
    }
    return StepLoader(records, **options)


def test_an_image_damaged_after_preparation_becomes_a_label_free_filler(llava_dir, tokenizer):
    """An image cut short after preparation: its sample stays in its micro-batch (same tokens, a blank
    image) with no labels, is counted once per run against data.max_bad_fraction, and a restored
    loader behaves the same; over the budget the run stops with a DataError naming the setting."""
    records = load(source_for(llava_dir), tokenizer, max_bad_fraction=0.2)
    loader = loader_over(records, max_bad_fraction=0.2)
    plan = loader.step_micro_batches(0, 0)[0]
    victim = next(i for m in plan for i in m.indices if records.sample(i).image is not None)
    image = llava_dir / records.sample(victim).image
    clean = [loader.dataset[m] for m in plan]
    truncated_jpeg(image, image)
    state = loader.state_dict()
    step = loader.next_step()
    where = next(n for n, m in enumerate(plan) if victim in m.indices)
    row = plan[where].indices.index(victim)
    assert step[where]["num_samples"] == clean[where]["num_samples"] - 1
    assert torch.equal(step[where]["input_ids"], clean[where]["input_ids"])
    assert bool((step[where]["labels"][row] == IGNORE_INDEX).all())
    assert loader.bad_samples == {victim} and loader.state_dict()["bad_samples"] == [victim]
    restored = loader_over(records, max_bad_fraction=0.2)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_step()[where]["labels"], step[where]["labels"])
    strict = loader_over(records, max_bad_fraction=0.0)
    with pytest.raises(DataError, match=f"{image.name}.*data.max_bad_fraction"):
        strict.next_step()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_worker_error_reaches_the_user_as_one_line(llava_dir, tokenizer, num_workers):
    """A storage failure while loading (here an image path that is a folder) is raised in the main
    process as the worker's one-line error naming the file, not as a worker traceback."""
    records = load(source_for(llava_dir), tokenizer)
    loader = loader_over(records, num_workers=num_workers)
    plan = loader.step_micro_batches(0, 0)[0]
    victim = next(i for m in plan for i in m.indices if records.sample(i).image is not None)
    image = llava_dir / records.sample(victim).image
    image.unlink()
    image.mkdir()
    with pytest.raises(StorageError) as error:
        loader.next_step()
    assert str(image) in str(error.value) and "\n" not in str(error.value)
    assert "Traceback" not in str(error.value)


def test_store_records_and_examples_load_the_same_micro_batches(synth_dir, tokenizer):
    """Batches built from the mapped store equal those built from in-memory examples."""
    records = load(source_for(synth_dir, max_text_tokens=128), tokenizer, max_bad_fraction=0.0)
    examples, _ = load_examples(synth_dir / "train.json", synth_dir, tokenizer, NUM_VISUAL, 128, 0.0)
    from_store, from_examples = loader_over(records), loader_over(examples, image_root=synth_dir)
    for _ in range(3):
        for one, other in zip(from_store.next_step(), from_examples.next_step(), strict=True):
            assert all(torch.equal(one[k], other[k]) for k in one if k != "num_samples")


# --- data under s3:// ------------------------------------------------------------------------------


def upload_folder(server, bucket: str, folder: Path, prefix: str) -> None:
    """The set's files uploaded by another S3 client, as a user's bucket is filled."""
    client = server.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "tokenizer" not in path.parts and "prepared" not in path.parts:
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def check_s3_root(server, monkeypatch, llava_dir, tokenizer, tmp_path) -> None:
    use_credentials(monkeypatch, server)
    bucket = create_bucket(server)
    upload_folder(server, bucket, llava_dir, "llava")
    settings = StoreSettings(endpoint_url=server.endpoint, region=server.region, path_style=True)
    cache_bytes = 6 << 10
    remote = source_for(
        f"s3://{bucket}/llava", settings=settings, cache_dir=tmp_path / "cache", image_cache_bytes=cache_bytes
    )
    records = load(remote, tokenizer)
    local = load(source_for(llava_dir), tokenizer)
    assert records.store.report.bad == local.store.report.bad == {"unreadable_image": 1}
    assert records.store.folder.is_relative_to(tmp_path / "cache")
    assert np.array_equal(records.lengths, local.lengths)
    again = load(remote, tokenizer)  # found in the bucket (and in the cache): not prepared again
    assert again.store.key == records.store.key
    from_s3, from_disk = loader_over(records, num_workers=1), loader_over(local)
    for _ in range(2):
        for one, other in zip(from_s3.next_step(), from_disk.next_step(), strict=True):
            assert all(torch.equal(one[k], other[k]) for k in one if k != "num_samples")
    cached = [p.stat().st_size for p in (tmp_path / "cache" / "data" / "images").rglob("*") if p.is_file()]
    assert cached and sum(cached) <= cache_bytes
    with pytest.raises(DataError, match=f"s3://{bucket}/llava/coco/nope.jpg"):
        records.images.load("coco/nope.jpg", IMAGE_SIZE)


@pytest.mark.s3
def test_images_and_records_from_an_s3_root_on_moto(moto_server, s3_env, monkeypatch, llava_dir, tokenizer, tmp_path):
    """data.root = s3://BUCKET/PREFIX: the JSON is fetched, the store is prepared into the bucket and
    mapped from the local cache, images are read by the loader workers through the object store, the
    image cache stays within its bound, and the batches equal those of the same files on disk."""
    check_s3_root(moto_server, monkeypatch, llava_dir, tokenizer, tmp_path)


@pytest.mark.s3
@pytest.mark.slow
def test_images_and_records_from_an_s3_root_on_ceph(ceph_s3, monkeypatch, llava_dir, tokenizer, tmp_path):
    """The same against Ceph radosgw (SigV4 checked): skipped unless Ceph is installed or required."""
    check_s3_root(ceph_s3, monkeypatch, llava_dir, tokenizer, tmp_path)


def test_token_store_rejects_a_damaged_folder(llava_dir, tokenizer):
    """A store file of the wrong size is a DataError saying to delete the folder."""
    records = load(source_for(llava_dir), tokenizer)
    folder = records.store.folder
    with open(folder / "tokens.npy", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(DataError, match="delete"):
        TokenStore(folder)


def test_cosctl_data_prepare_writes_then_reuses(llava_dir, tmp_path):
    """`cosctl data prepare SPEC` prepares the train and eval splits and says what they hold; a second
    call finds both (reused) and the files keep their mtimes."""
    from typer.testing import CliRunner

    from cosctl.cli.app import app
    from tests.harness import RECIPES

    shutil.copy(llava_dir / "train.json", llava_dir / "eval.json")
    args = [
        "data",
        "prepare",
        str(RECIPES / "tiny" / "pretrain.yaml"),
        "--set",
        f"data.root={llava_dir}",
        "--set",
        f"model.tokenizer={llava_dir / 'tokenizer'}",
        "--set",
        "data.max_bad_fraction=0.1",
    ]

    def prepare() -> list[dict]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout[result.stdout.index("[\n") :])

    first = prepare()
    assert [split["split"] for split in first] == ["train.json", "eval.json"]
    assert not first[0]["reused"] and first[0]["bad"] == {"unreadable_image": 1} and first[0]["text_only"] == 10
    assert first[0]["within_max_bad_fraction"] and first[0]["truncated"] > 0
    folder = Path(first[0]["local"])
    mtimes = {path: path.stat().st_mtime_ns for path in folder.iterdir()}
    second = prepare()
    assert [split["reused"] for split in second] == [True, True] and second[0]["key"] == first[0]["key"]
    assert {path: path.stat().st_mtime_ns for path in folder.iterdir()} == mtimes
    bad = CliRunner().invoke(app, [*args, "--set", f"data.root={tmp_path / 'absent'}"])
    assert bad.exit_code == 1 and "data file not found" in bad.output
