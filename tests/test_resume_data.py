"""A resume and its data (one rank, in this process): the checkpoint pins the data it was trained on
(a resume on edited data is refused, or continues from a new data order with --new-data; checkpoints
from before pins still resume), and an image damaged between two segments is skipped once
data.max_bad_fraction is raised on resume, recorded in the checkpoint's skip list."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cosctl.checkpoint.layout import list_committed
from cosctl.common.errors import CheckpointError, DataError
from cosctl.storage import LocalStore
from cosctl.train.batching import epoch_order
from tests.harness import tiny_spec

SAMPLES_PER_STEP = 16  # the tiny recipe's


def copy_data(source: Path, target: Path) -> Path:
    """The synthetic set copied (without its prepared stores), to be edited by a test."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("prepared"))
    return target


def rewrite_in_checkpoint(checkpoint: Path, relative: str, edit) -> None:
    """Rewrite a committed checkpoint's JSON file with `edit(obj)`, giving the manifest its true hash."""
    path = checkpoint / relative
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["files"][relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def loader_state(out: Path, step: int, rank: int = 0) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step:08d}" / f"rank_{rank:05d}.json").read_text())["loader"]


def test_a_resume_on_edited_data_is_refused_unless_new_data_says_so(tiny_data, tmp_path, in_process, capsys):
    """Two steps, then one record removed from train.json: the resume is refused in one line naming the
    checkpoint, both record counts and --new-data; with --new-data it continues the weights from the
    start of a new data order (epoch 0, step 0 of the new records), and a later resume of that line
    continues its position (--new-data changes nothing when the data match)."""
    data = copy_data(tiny_data, tmp_path / "data")
    out = tmp_path / "out"
    in_process(tiny_spec(data, out, 2), tmp_path / "work")
    records = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(records[1:]))
    with pytest.raises(CheckpointError) as refused:
        in_process(tiny_spec(data, out, 3), tmp_path / "work")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"step_00000002 was trained on other data ({len(records)} records, data key "
    )
    assert f"now {len(records) - 1} records" in message and message.endswith("add --new-data")
    assert [c.step for c in list_committed(LocalStore(out))] == [1, 2]
    capsys.readouterr()
    assert in_process(tiny_spec(data, out, 3), tmp_path / "work", new_data=True)["steps"] == 3
    logged = capsys.readouterr().out
    assert "resuming from" in logged and "at step 2" in logged
    assert "continuing its weights from the start of a new data order (--new-data)" in logged
    state = loader_state(out, 3)
    assert (state["epoch"], state["step"], state["data"]["records"]) == (0, 1, len(records) - 1)
    in_process(tiny_spec(data, out, 4), tmp_path / "work", new_data=True)
    assert (loader_state(out, 4)["epoch"], loader_state(out, 4)["step"]) == (0, 2)


def test_a_checkpoint_from_before_data_pins_resumes_and_says_so_once(tiny_data, tmp_path, in_process, capsys):
    """A checkpoint whose loader position has no data pin (written before pins) resumes as before,
    with one log line saying its data are not checked."""
    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 2), tmp_path / "work")
    rewrite_in_checkpoint(
        out / "checkpoints" / "step_00000002", "rank_00000.json", lambda state: state["loader"].pop("data")
    )
    capsys.readouterr()
    assert in_process(tiny_spec(tiny_data, out, 3), tmp_path / "work")["steps"] == 3
    assert capsys.readouterr().out.count("predates data pins in checkpoints: its training data are not checked") == 1


def damage_an_image_of_step(data: Path, step: int, seed: int = 0) -> tuple[int, str, str]:
    """Cut short the image of the first image sample of (0-based) `step` of epoch 0; (its index in the
    prepared store, its record id, its image path). Every synthetic record is kept, in file order."""
    records = json.loads((data / "train.json").read_text())
    chosen = epoch_order(len(records), seed, 0)[step * SAMPLES_PER_STEP : (step + 1) * SAMPLES_PER_STEP]
    index = next(int(i) for i in chosen if records[int(i)].get("image"))
    image = data / records[index]["image"]
    image.write_bytes(image.read_bytes()[:40])
    return index, records[index]["id"], str(image)


def test_an_image_damaged_between_segments_is_skipped_once_max_bad_fraction_is_raised(
    tiny_data, tmp_path, in_process, capsys
):
    """After two steps an image of step 3 is damaged: resuming stops naming the image and
    data.max_bad_fraction; resuming with it raised (a change a resume accepts) trains on, the sample
    skipped, counted in the metrics, logged, and listed in the checkpoint's skip list."""
    data = copy_data(tiny_data, tmp_path / "data")
    out = tmp_path / "out"
    in_process(tiny_spec(data, out, 2), tmp_path / "work")
    index, record_id, image = damage_an_image_of_step(data, 2)
    with pytest.raises(DataError) as refused:
        in_process(tiny_spec(data, out, 3), tmp_path / "work")
    assert image in str(refused.value) and "raise data.max_bad_fraction" in str(refused.value)
    capsys.readouterr()
    summary = in_process(tiny_spec(data, out, 4, "data.max_bad_fraction=0.05"), tmp_path / "work")
    assert summary["steps"] == 4 and summary["skipped_samples"] == 1
    logged = capsys.readouterr()
    assert "data.max_bad_fraction: 0.0 -> 0.05" in logged.out
    assert f"sample {record_id} is skipped for the rest of the run (1 of 4 allowed" in logged.err
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_samples"] for r in records if "loss" in r and "skipped_samples" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}
    assert loader_state(out, 3)["bad_samples"] == loader_state(out, 4)["bad_samples"] == [index]
