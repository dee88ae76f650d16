"""lmms-eval's `--model cosctl` (`cosctl.evaluate.lmms`): the real lmms-eval package runs a published
run output on a task YAML of our own over LLaVA-format records (HF `datasets` reading the local JSON, hub
offline), through `cosctl eval --harness lmms-eval` and through lmms-eval's own CLI (the entry point),
and its per-sample outputs and exact-match aggregate equal `cosctl eval`'s on the same records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosctl.cli.app import app
from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.evaluate.records import build_prompt
from tests.extras import require
from tests.harness import env
from tests.test_evaluate import publish_adapter, publish_model

require("lmms_eval", "lmms")

from cosctl.common.errors import UserError  # noqa: E402
from cosctl.evaluate.lmms import CosLMM, cut_at_stops, harness_record  # noqa: E402

runner = CliRunner()
BATCH_SIZE = 3
MAX_NEW_TOKENS = 6
TASK = "cos_records"

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {records}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: []
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
"""

TASK_UTILS = """from pathlib import Path

from PIL import Image

ROOT = Path({root!r})


def doc_to_visual(doc):
    return [Image.open(ROOT / doc["image"])] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["conversations"][0]["value"]


def doc_to_target(doc):
    return doc["conversations"][-1]["value"]
"""


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: datasets and hub calls offline, their caches in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def eval_records(data: Path) -> list[dict]:
    """Eight synthetic records without `task` (so both sides score exact match), one of them text-only."""
    records = [{k: v for k, v in r.items() if k != "task"} for r in json.loads((data / "train.json").read_text())[:8]]
    records[3] = {
        "id": "text-only",
        "conversations": [{"from": "human", "value": "Say hi"}, records[3]["conversations"][1]],
    }
    return records


def cosctl_eval(run: Path, records: Path, out: Path) -> tuple[list[str], dict]:
    result = runner.invoke(
        app,
        [
            "eval",
            str(run),
            "--data",
            str(records),
            "--out",
            str(out),
            "--batch-size",
            str(BATCH_SIZE),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return [row["prediction"] for row in rows], json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A published tiny LoRA finetune run, eval records whose answers are `cosctl eval`'s own predictions for half of
    them (so exact match is neither 0 nor 1), `cosctl eval`'s predictions and metrics on those records,
    and an lmms-eval task folder over the same file."""
    root = tmp_path_factory.mktemp("lmms")
    synthesize(root / "data", num_samples=12, seed=0, image_size=64)
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    publish_model(root / "base", tokenizer)
    publish_adapter(root / "run", root / "base", tokenizer)  # its answers differ from record to record
    records = eval_records(root / "data")
    (root / "data" / "first.json").write_text(json.dumps(records))
    first, _ = cosctl_eval(root / "run", root / "data" / "first.json", root / "first")
    for record, prediction in list(zip(records, first, strict=True))[::2]:
        if prediction:
            record["conversations"][-1]["value"] = prediction
    (root / "data" / "eval.json").write_text(json.dumps(records))
    predictions, metrics = cosctl_eval(root / "run", root / "data" / "eval.json", root / "cosctl")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        TASK_YAML.format(task=TASK, records=root / "data" / "eval.json", max_new_tokens=MAX_NEW_TOKENS)
    )
    (tasks / "utils.py").write_text(TASK_UTILS.format(root=str(root / "data")))
    return {"root": root, "records": records, "predictions": predictions, "metrics": metrics, "tasks": tasks}


def harness_outputs(out: Path) -> tuple[list[str], dict]:
    """lmms-eval's per-sample outputs in document order and its results file, from its --output_path."""
    (samples,) = out.rglob(f"*_samples_{TASK}.jsonl")
    (results,) = out.rglob("*_results.json")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda row: row["doc_id"])
    return [row["filtered_resps"] for row in rows], json.loads(results.read_text())["results"][TASK]


def assert_agrees_with_cosctl_eval(built, out: Path) -> None:
    outputs, results = harness_outputs(out)
    exact_match = built["metrics"]["tasks"]["unknown"]["exact_match"]
    print(f"lmms-eval: {outputs} exact_match {results['exact_match,none']}; cosctl eval: exact_match {exact_match}")
    assert outputs == built["predictions"]
    assert 0 < exact_match < 1
    assert results["exact_match,none"] == pytest.approx(exact_match, abs=1e-12)


def test_a_request_gets_the_prompt_cosctl_eval_builds_for_its_record(tokenizer):
    """A harness question becomes its one-turn record's prompt: `<image>` kept where the question has
    it, put first (LLaVA-1.5's `<image>\\n{q}`) where it has an image and none, absent for text only."""
    record = {
        "id": "a",
        "image": "x.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
    }
    ids = build_prompt(record, tokenizer, 4, "").input_ids
    for question in ("<image>\nWhat colour?", "What colour?"):
        assert build_prompt(harness_record("a", question, True), tokenizer, 4, "").input_ids == ids
    text = build_prompt(harness_record("b", "What colour?", False), tokenizer, 4, "")
    assert text.image is None and tokenizer.convert_tokens_to_ids("<image>") not in text.input_ids


def test_answers_are_cut_at_the_tasks_stop_strings():
    """`until` strings end an answer where the first of them starts (lmms-eval's contract)."""
    assert cut_at_stops("yes\n\nThe image shows", ["\n\n"]) == "yes"
    assert cut_at_stops(" two ", []) == "two"
    assert cut_at_stops("a. b</s>", ["</s>", "."]) == "a"


def test_a_run_under_several_ranks_is_refused_before_loading(monkeypatch, tmp_path):
    """Under torchrun/accelerate (WORLD_SIZE > 1) the model refuses in one line, before any load."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process"):
        CosLMM(pretrained=str(tmp_path / "no-such-run"))


@pytest.mark.slow
def test_cosctl_eval_harness_lmms_eval_equals_cosctl_eval(built, offline, tmp_path):
    """`cosctl eval RUN --harness lmms-eval` on a local task over the eval records: lmms-eval's sample
    log holds `cosctl eval`'s predictions record for record and its exact match equals ours."""
    out = tmp_path / "lmms"
    result = runner.invoke(
        app,
        [
            "eval",
            str(built["root"] / "run"),
            "--harness",
            "lmms-eval",
            "--tasks",
            TASK,
            "--include-path",
            str(built["tasks"]),
            "--out",
            str(out),
            "--batch-size",
            str(BATCH_SIZE),
            "--max-new-tokens",
            "99",
        ],
    )
    assert result.exit_code == 0, result.output
    assert_agrees_with_cosctl_eval(built, out)
    assert TASK in result.output and "exact_match" in result.output  # lmms-eval's table


@pytest.mark.slow
def test_lmms_eval_cli_finds_the_model_through_its_entry_point(built, offline, tmp_path):
    """`python -m lmms_eval --model cosctl` (registered by the installed package's entry point, no
    cosctl code run first) gives the same outputs and aggregate."""
    out = tmp_path / "lmms"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "cosctl",
            "--model_args",
            f"pretrained={built['root'] / 'run'}",
            "--tasks",
            TASK,
            "--include_path",
            str(built["tasks"]),
            "--batch_size",
            str(BATCH_SIZE),
            "--output_path",
            str(out),
            "--log_samples",
        ],
        cwd=tmp_path,
        env=env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_agrees_with_cosctl_eval(built, out)


@pytest.mark.slow
def test_harness_errors_are_one_line(built, offline, tmp_path):
    """No --tasks, an unknown task, or --data beside the harness: one error line, exit 1."""
    run = str(built["root"] / "run")
    for args, expected in (
        ([], "--tasks"),
        (["--tasks", "no_such_task"], "no_such_task"),
        (["--tasks", TASK, "--data", "x.json"], "--data"),
    ):
        result = runner.invoke(app, ["eval", run, "--harness", "lmms-eval", *args, "--out", str(tmp_path)])
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last
        assert "Traceback" not in result.output
