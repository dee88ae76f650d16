"""Training data kept as webdataset tar shards (img2dataset's layout), written by webdataset's own
ShardWriter: prepared once into a token store with where every image lies, images read by range (a seek
locally, a ranged GET on S3), damaged members skipped and counted, the data pin following the shards'
content, and a 2-rank pretrain on shards killed and resumed exactly."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from cosctl.common.errors import CheckpointError, DataError
from cosctl.data import tokenstore
from cosctl.data.prepare import load_split, prepare_split
from cosctl.data.prepare_parts import prepare_shard_part
from cosctl.data.shards import parse_ref
from cosctl.data.split import SplitSource, StoreLocation, split_key
from cosctl.data.tokenstore import TokenStore
from cosctl.spec.data import DEFAULT_CAPTION_PROMPT, DataSpec
from cosctl.spec.paths import check_paths
from cosctl.spec.specs import SpecError, load_spec
from cosctl.storage import StoreSettings
from cosctl.train.loader import StepLoader
from tests.conftest_s3 import create_bucket, use_credentials
from tests.faultproxy import FaultProxy
from tests.harness import RECIPES, cosctl, kill_when, ok, run, steps, tiny_spec, train_command

IMAGE_SIZE = 64
NUM_VISUAL = 32
PER_SHARD = 16
PROMPT = "<image>\nDescribe the image briefly."
OVERRIDDEN_CAPTION = "a caption that the sample's conversations override"


def jpeg(path: Path, cut: float = 1.0) -> bytes:
    """The image as a JPEG, as img2dataset stores it; `cut` < 1 keeps that share of its bytes."""
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    return data[: int(len(data) * cut)]


def write_shards(data: Path, out: Path, *, damaged: frozenset[int] = frozenset(), pattern="shards/%05d.tar") -> list:
    """`data`'s train.json as webdataset shards of PER_SHARD samples under `out`, written by webdataset's
    ShardWriter, plus the same samples as LLaVA JSON with loose JPEGs (`as_llava.json`, `jpg/`): caption
    samples are KEY.jpg + KEY.txt + img2dataset's KEY.json metadata, the others carry their
    conversations in KEY.json (and a .txt they override). Samples at `damaged` get a cut-off JPEG."""
    records = json.loads((data / "train.json").read_text())
    (out / pattern).parent.mkdir(parents=True, exist_ok=True)
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    as_llava = []
    with wds.ShardWriter(str(out / pattern), maxcount=PER_SHARD, verbose=0) as sink:
        for position, record in enumerate(records):
            image = jpeg(data / record["image"], 0.6 if position in damaged else 1.0)
            answer = record["conversations"][1]["value"]
            sample = {"__key__": record["id"], "jpg": image}
            if record["task"] == "caption":
                sample["txt"] = answer
                sample["json"] = {"key": record["id"], "status": "success", "caption": answer, "width": IMAGE_SIZE}
                turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": answer}]
            else:
                turns = record["conversations"]
                sample["txt"] = OVERRIDDEN_CAPTION
                sample["json"] = {"conversations": turns, "task": record["task"]}
            sink.write(sample)
            (out / "jpg" / f"{record['id']}.jpg").write_bytes(image)
            as_llava.append({"id": record["id"], "image": f"jpg/{record['id']}.jpg", "conversations": turns})
    (out / "as_llava.json").write_text(json.dumps(as_llava))
    shutil.copytree(data / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return records


def recaption(shard: Path) -> None:
    """Rewrite the shard in place with its first caption's first letter in the other case."""
    with tarfile.open(shard) as tar:
        at = next(
            member.offset_data
            for member in tar.getmembers()
            if member.name.endswith(".txt") and tar.extractfile(member).read() != OVERRIDDEN_CAPTION.encode()
        )
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x20
    shard.write_bytes(bytes(data))


def shard_names(root: Path) -> tuple[str, ...]:
    return tuple(sorted(f"shards/{path.name}" for path in (root / "shards").glob("*.tar")))


def shard_source(root, *, shards: tuple[str, ...] | None = None, **kwargs) -> SplitSource:
    cache = kwargs.pop("cache_dir", None)
    return SplitSource(
        root=str(root),
        name="train.json",
        max_text_tokens=kwargs.pop("max_text_tokens", 96),
        image_check=kwargs.pop("image_check", "decode"),
        cache_dir=Path(cache) if cache else None,
        shards=shards or shard_names(Path(str(root))),
        caption_prompt=PROMPT,
        **kwargs,
    )


def load(source: SplitSource, tokenizer, max_bad_fraction: float = 0.0, workers: int = 0):
    return load_split(
        source, tokenizer, num_visual_tokens=NUM_VISUAL, max_bad_fraction=max_bad_fraction, workers=workers
    )


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, synth_dir) -> Path:
    """The synthetic set's 43 training samples as 3 shards (and as LLaVA JSON with loose JPEGs)."""
    out = tmp_path_factory.mktemp("wds")
    write_shards(synth_dir, out)
    return out


# --- the spec -------------------------------------------------------------------------------------


def test_data_format_webdataset_is_checked_where_it_is_written(tmp_path):
    """llava stays the default; webdataset needs data.shards (brace patterns expand as webdataset's do),
    shards need webdataset, and the pre-flight names a local shard that does not exist."""
    assert DataSpec(root="data").format == "llava"
    spec = DataSpec(root=str(tmp_path), format="webdataset", shards="shards/{00008..00011}.tar")
    assert spec.shard_names() == [f"shards/{n:05d}.tar" for n in range(8, 12)]
    assert spec.caption_prompt == DEFAULT_CAPTION_PROMPT
    listed = DataSpec(root="d", format="webdataset", shards=["a/{0,1}.tar", "s3://bucket/b.tar"])
    assert listed.shard_names() == ["a/0.tar", "a/1.tar", "s3://bucket/b.tar"]
    recipe = RECIPES / "tiny" / "pretrain.yaml"
    for overrides, message in (
        (["data.format=webdataset"], "data.shards: required with format: webdataset"),
        (["data.shards=x.tar"], "data.shards: only read with format: webdataset"),
        (["data.format=webdataset", "data.shards=s/{3..1}.tar"], "runs backwards"),
        (["data.format=webdataset", "data.shards=s/{1..3.tar"], "unbalanced"),
        (["data.format=webdataset", "data.shards=x.tar", "data.train=other.json"], "data.train: LLaVA JSON only"),
        (["data.caption_prompt=Describe."], "exactly one <image>"),
    ):
        with pytest.raises(SpecError, match=message):
            load_spec(recipe, overrides)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00008.tar").write_bytes(b"")
    assert [p for p in check_paths(load_spec(recipe, _on(tmp_path))) if "shards" in p] == [
        f"data.shards: {tmp_path / 'shards' / '00009.tar'} does not exist (and 2 more)"
    ]


def _on(root: Path) -> list[str]:
    return [f"data.root={root}", "data.format=webdataset", "data.shards=shards/{00008..00011}.tar"]


# --- preparing and reading ------------------------------------------------------------------------


def test_shards_give_the_samples_and_pixels_of_the_same_data_as_llava_json(shard_dir, tokenizer, tmp_path):
    """Prepared from shards, the store holds record
    for record the ids, labels and images that the same samples as LLaVA JSON with loose JPEGs give:
    a .txt caption answers data.caption_prompt, a .json's conversations win over the .txt; every image
    read by its range of the shard is the JPEG's pixels."""
    records = load(shard_source(shard_dir), tokenizer)
    as_json = load_split(
        SplitSource(root=str(shard_dir), name="as_llava.json", max_text_tokens=96, image_check="decode"),
        tokenizer,
        num_visual_tokens=NUM_VISUAL,
        max_bad_fraction=0.0,
    )
    assert len(records) == len(as_json) == 43 and records.store.report.num_ok == 43
    assert records.store.folder.parent == shard_dir / "prepared" and records.store.folder.name.startswith("shards-")
    assert [shard["num_samples"] for shard in records.store.meta["shards"]] == [16, 16, 11]
    names = [records.image(index) for index in range(len(records))]
    assert parse_ref(names[17]).shard == "shards/00001.tar" and parse_ref(names[17]).member.endswith(".jpg")
    pixels = records.images.load_many(names, IMAGE_SIZE)
    for index in range(len(records)):
        mine, theirs = records.sample(index), as_json.sample(index)
        assert mine.record_id == theirs.record_id
        assert np.array_equal(mine.input_ids, theirs.input_ids) and np.array_equal(mine.labels, theirs.labels)
        assert torch.equal(pixels[index], as_json.images.load(theirs.image, IMAGE_SIZE))
    captions = [records.store.task(index) for index in range(len(records))]
    assert "caption" in captions and "vqa" in captions


@pytest.mark.slow
def test_child_and_worker_processes_prepare_the_same_shard_store(shard_dir, tokenizer, tmp_path):
    """Preparing shards in a spawned child, and there with two worker processes (a shard each), writes
    the arrays and shard records (sha256, samples) that preparing in the calling process writes."""
    inline = prepare_split(shard_source(shard_dir, prepared=str(tmp_path / "inline")), tokenizer)
    for options in ({"workers": 0, "child_min_bytes": 0}, {"workers": 2}):
        other = prepare_split(shard_source(shard_dir, prepared=str(tmp_path / str(options))), tokenizer, **options)
        for name in tokenstore.ARRAYS:
            assert np.array_equal(getattr(inline, name), getattr(other, name)), (options, name)
        assert other.meta["shards"] == inline.meta["shards"] and other.key == inline.key


def test_more_ranks_than_shards_prepare_the_same_store(shard_dir, tokenizer, tmp_path):
    """Four ranks over three shards (one rank without a shard) write parts that merge into the store a
    single rank prepares."""
    single = prepare_split(shard_source(shard_dir), tokenizer)
    source = shard_source(shard_dir, prepared=str(tmp_path))
    key, _, shards = split_key(source, tokenizer)
    location = StoreLocation(source, key, "test")
    for rank in range(4):
        prepare_shard_part(source, tokenizer, location, shards, 0, rank, 4)
    location.merge_parts(4)
    merged = TokenStore(location.local)
    for name in tokenstore.ARRAYS:
        assert np.array_equal(getattr(single, name), getattr(merged, name)), name
    assert merged.meta["shards"] == single.meta["shards"] and merged.meta["report"] == single.meta["report"]


def test_a_truncated_jpeg_in_a_shard_is_skipped_and_counted(synth_dir, tokenizer, tmp_path):
    """A JPEG member cut short: decode-checking preparation drops its sample as unreadable_image and
    data.max_bad_fraction decides (0 refuses, naming the shards); unchecked (image_check: none) it is
    kept, and the loader skips it when it fails, counting it once in the run's skip list."""
    write_shards(synth_dir, tmp_path, damaged=frozenset({5}))
    with pytest.raises(DataError, match=r"00000\.tar .. 00002\.tar \(3 shards\).*unreadable_image=1.*max_bad_frac"):
        load(shard_source(tmp_path), tokenizer, max_bad_fraction=0.0)
    kept = load(shard_source(tmp_path), tokenizer, max_bad_fraction=0.05)
    assert len(kept) == 42 and kept.store.report.bad == {"unreadable_image": 1}
    assert kept.store.report.bad_ids == ["synth-000005"]
    unchecked = load(shard_source(tmp_path, image_check="none"), tokenizer, max_bad_fraction=0.05)
    assert len(unchecked) == 43
    loader = StepLoader(
        unchecked,
        image_size=IMAGE_SIZE,
        pad_token_id=3,
        tokens_per_micro_batch=4096,
        samples_per_step=43,  # one step reads every sample
        seed=0,
        rank=0,
        world_size=1,
        max_bad_fraction=0.05,
    )
    damaged = next(i for i in range(len(unchecked)) if unchecked.record_id(i) == "synth-000005")
    for _ in range(2):
        loader.next_step()
        assert loader.bad_samples == {damaged} and loader.state_dict()["bad_samples"] == [damaged]


def test_a_shard_that_is_not_a_tar_is_named(shard_dir, tokenizer, tmp_path):
    """A gzip-compressed or cut-off shard stops preparation with one line naming it."""
    import gzip

    root = tmp_path / "root"
    shutil.copytree(shard_dir / "shards", root / "shards")
    first = root / "shards" / "00000.tar"
    original = first.read_bytes()
    first.write_bytes(gzip.compress(original))
    with pytest.raises(DataError, match=f"{first}: not a readable uncompressed tar shard"):
        load(shard_source(root), tokenizer)
    first.write_bytes(original[: len(original) // 2 + 100])
    with pytest.raises(DataError, match=f"{first}: not a readable uncompressed tar shard"):
        load(shard_source(root), tokenizer)


def test_the_store_key_follows_the_shards_and_the_data_pin_their_content(shard_dir, tokenizer, tmp_path):
    """The same shards in another folder: another store (prepared there) but the same pinned data key; a
    shard rewritten with the same bytes (a new mtime): a new store, the same pinned key; one sample's
    caption changed: another pinned key. The pin never reads shards: it is the store's record."""
    here = load(shard_source(shard_dir), tokenizer)
    elsewhere = tmp_path / "copy"
    shutil.copytree(shard_dir, elsewhere, ignore=shutil.ignore_patterns("prepared"))
    there = load(shard_source(elsewhere), tokenizer)
    assert there.store.key != here.store.key and there.data_pin() == here.data_pin()
    last = elsewhere / "shards" / "00002.tar"
    last.write_bytes(last.read_bytes())
    touched = load(shard_source(elsewhere), tokenizer)
    assert touched.store.key != there.store.key and touched.data_pin() == here.data_pin()
    recaption(last)
    edited = load(shard_source(elsewhere), tokenizer)
    assert edited.data_pin()["records"] == here.data_pin()["records"]
    assert edited.data_pin()["key"] != here.data_pin()["key"]


# --- shards in a bucket: prepared from one download each, images by ranged GETs ------------------------


def check_shards_on_s3(server, monkeypatch, shard_dir, tokenizer, tmp_path) -> None:
    """Shards uploaded by another client under s3://BUCKET/wds/shards, read through a proxy that logs
    every request: preparing GETs each shard once; then every image is one GET whose Range is exactly
    its member's bytes (never the shard), and its pixels are those of the local shards."""
    use_credentials(monkeypatch, server)
    bucket = create_bucket(server)
    client = server.client()
    for name in shard_names(shard_dir):
        client.upload_file(str(shard_dir / name), bucket, f"wds/{name}")
    proxy = FaultProxy(*server.host_port)
    proxy.start()
    try:
        settings = StoreSettings(endpoint_url=proxy.endpoint, region=server.region, path_style=True)
        source = shard_source(
            f"s3://{bucket}/wds",
            shards=shard_names(shard_dir),
            settings=settings,
            cache_dir=tmp_path / "cache",
            image_cache_bytes=0,
        )
        records = load(source, tokenizer)
        local = load(shard_source(shard_dir), tokenizer)
        gets = Counter(seen.target.split("?")[0] for seen in proxy.log if seen.method == "GET")
        assert {target: n for target, n in gets.items() if target.endswith(".tar")} == {
            f"/{bucket}/wds/{name}": 1 for name in shard_names(shard_dir)
        }
        assert records.store.key != local.store.key and records.data_pin() == local.data_pin()
        for name in tokenstore.ARRAYS:
            assert np.array_equal(getattr(records.store, name), getattr(local.store, name)), name
        names = [records.image(index) for index in range(len(records))]
        proxy.log.clear()
        pixels = records.images.load_many(names, IMAGE_SIZE)
        ranges = sorted((seen.target, seen.headers.get("range")) for seen in proxy.log if seen.method == "GET")
        refs = [parse_ref(name) for name in names]
        assert ranges == sorted(
            (f"/{bucket}/wds/{ref.shard}", f"bytes={ref.offset}-{ref.offset + ref.size - 1}") for ref in refs
        )
        shard_sizes = {shard["name"]: shard["size"] for shard in records.store.meta["shards"]}
        assert max(ref.size / shard_sizes[ref.shard] for ref in refs) < 0.2
        for index, name in enumerate(names):
            assert torch.equal(pixels[index], local.images.load(name, IMAGE_SIZE))
    finally:
        proxy.stop()


@pytest.mark.s3
def test_shards_on_moto_are_read_once_then_by_ranged_gets(
    moto_server, s3_env, monkeypatch, shard_dir, tokenizer, tmp_path
):
    """Shards in a moto bucket (see `check_shards_on_s3`)."""
    check_shards_on_s3(moto_server, monkeypatch, shard_dir, tokenizer, tmp_path)


@pytest.mark.s3
@pytest.mark.slow
def test_shards_on_ceph_are_read_once_then_by_ranged_gets(ceph_s3, monkeypatch, shard_dir, tokenizer, tmp_path):
    """The same against Ceph radosgw (SigV4 checked): skipped unless Ceph is installed or required."""
    check_shards_on_s3(ceph_s3, monkeypatch, shard_dir, tokenizer, tmp_path)


# --- training on shards -----------------------------------------------------------------------------


def shard_data(tiny_data: Path, target: Path) -> Path:
    """The tiny set's training samples as shards beside its tokenizer and eval.json (no train.json)."""
    target.mkdir(parents=True)
    shutil.copy(tiny_data / "eval.json", target / "eval.json")
    shutil.copytree(tiny_data / "images", target / "images")
    write_shards(tiny_data, target)
    shutil.rmtree(target / "jpg")
    (target / "as_llava.json").unlink()
    return target


ON_SHARDS = ("data.format=webdataset", "data.shards=shards/{00000..00005}.tar")


@pytest.mark.slow
def test_a_resume_on_a_rewritten_shard_is_refused_and_a_touched_one_continues(tiny_data, tmp_path, in_process):
    """Two steps on shards; a shard rewritten with the same bytes (a new mtime: prepared again): the
    resume continues; the shard rewritten with another caption: the resume is refused as other data."""
    data = shard_data(tiny_data, tmp_path / "data")
    out = tmp_path / "out"
    in_process(tiny_spec(data, out, 2, *ON_SHARDS), tmp_path / "work")
    shard = data / "shards" / "00003.tar"
    shard.write_bytes(shard.read_bytes())
    in_process(tiny_spec(data, out, 3, *ON_SHARDS), tmp_path / "work")
    assert len(list((data / "prepared").glob("shards-*"))) == 2 and steps(tmp_path / "work")[3]["loss"] > 0
    recaption(shard)
    with pytest.raises(CheckpointError, match="trained on other data"):
        in_process(tiny_spec(data, out, 4, *ON_SHARDS), tmp_path / "work")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_pretrain_on_shards_killed_and_resumed_exactly(tiny_data, tmp_path):
    """`cosctl data prepare` of a shard spec, then 8 steps straight on 2 ranks == 4 steps, kill -9,
    resume, 4 more steps: identical loss and learning rate at steps 5..8; the runs map the prepared
    store instead of reading the shards again."""
    data = shard_data(tiny_data, tmp_path / "data")
    spec = yaml.safe_load((RECIPES / "tiny" / "pretrain.yaml").read_text())
    del spec["data"]["train"]
    spec["data"].update(root=str(data), format="webdataset", shards="shards/{00000..00005}.tar")
    spec["model"]["tokenizer"] = str(data / "tokenizer")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    prepared = json.loads(ok(cosctl("data", "prepare", str(tmp_path / "spec.yaml"), tmp=tmp_path)).stdout)
    assert prepared[0]["split"].endswith("00005.tar (6 shards)") and prepared[0]["ok"] == prepared[0]["records"]
    assert not prepared[0]["reused"] and prepared[1]["split"] == "eval.json"
    full = tmp_path / "full"
    straight = run(train_command(data, full / "work", full / "out", 8, 4, *ON_SHARDS), tmp_path)
    assert "data: using prepared" in straight.stdout
    part = tmp_path / "part"
    cmd = train_command(data, part / "work", part / "out", 8, 4, *ON_SHARDS)
    latest = part / "out" / "checkpoints" / "latest"
    kill_when(cmd, tmp_path, lambda: latest.exists() and latest.read_text() == "step_00000004")
    resumed = run(cmd, tmp_path)
    assert "resuming from" in resumed.stdout and "at step 4" in resumed.stdout
    expected, got = steps(full / "work"), steps(part / "work")
    for step in range(5, 9):
        assert got[step]["loss"] == expected[step]["loss"], (step, got[step]["loss"], expected[step]["loss"])
        assert got[step]["lr"] == expected[step]["lr"]
