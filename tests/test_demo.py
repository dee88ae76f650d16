"""`cosctl demo`: the whole tiny pipeline on CPU, exactly as the README runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cos_model import CosForConditionalGeneration
from cosctl.artefacts.published import save_model
from cosctl.checkpoint.layout import publish
from cosctl.data.conversation import image_token_id
from cosctl.demo.pipeline import TRAINED_STAGES, cosctl_command, print_summary, run_folder, score_stages, swap_gap
from cosctl.report.write import write_report
from cosctl.storage import open_store
from tests.harness import cosctl, ok
from tests.tiny import tiny_config, tiny_model


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_every_stage_learns(tmp_path):
    """Demo: 32-token pretrain -> 528-token inflate -> LoRA finetune, loss falling clearly in both
    training stages, the model using the image (the held-out loss rises clearly when each record gets
    another's image), artefacts loadable, summary.json complete, every stage reporting, and closing
    tables: eval loss beside swapped-image eval loss, generated answers' scores beside the image-free
    baseline."""
    result = ok(cosctl("demo", "--out", str(tmp_path / "demo"), tmp=tmp_path, timeout=2400))
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    pre, inf, fin = summary["pretrain"], summary["inflate"], summary["finetune"]
    assert (pre["visual_tokens"], inf["visual_tokens"], fin["visual_tokens"]) == (32, 528, 528)
    assert (pre["image_size"], fin["image_size"]) == (64, 128)
    assert pre["final_loss"] < 0.6 * pre["first_loss"]
    assert pre["final_eval_loss"] < 0.6 * pre["first_eval_loss"]
    assert fin["final_loss"] < 0.9 * fin["first_loss"]
    assert fin["final_eval_loss"] < 0.9 * fin["first_eval_loss"]
    # the 32-token stage moves many more samples per second than the 528-token stage
    assert pre["samples_per_s"] > 3 * fin["samples_per_s"]
    model = CosForConditionalGeneration.from_pretrained(inf["artefact"])
    assert model.config.num_visual_tokens == 528
    assert (Path(fin["artefact"]) / "adapter_model.safetensors").exists()
    # every stage says what it did, and the end is a table and where to look next, not a JSON dump
    for line in ("[data] 1080 train + 120 eval", "[inflate] 32 -> 528 visual tokens, 64 -> 128 px"):
        assert line in result.stdout
    rows = {
        line.split()[0]: line for line in result.stdout.splitlines() if line.split()[:1] in (["pretrain"], ["finetune"])
    }
    for name, stage in (("pretrain", pre), ("finetune", fin)):
        assert stage["final_eval_loss_swapped_images"] > 0
        assert f"{stage['final_eval_loss']:.3f}" in rows[name]
        assert f"{stage['final_eval_loss_swapped_images']:.3f}" in rows[name]
    # the model looks: a model that does not sits within ~0.001 of zero (docs/design.md §10)
    assert swap_gap(pre) > 0.02 and swap_gap(fin) > 0.01
    scores = summary["scores"]
    for tasks in (scores["stages"]["pretrain"], scores["stages"]["finetune"], scores["baseline"]):
        assert set(tasks) == {"caption", "vqa", "ocr", "refexp"}
    assert scores["stages"]["finetune"]["vqa"]["num"] == summary["data"]["tasks"]["eval"]["vqa"]
    assert (tmp_path / "demo" / "work" / "finetune" / "predictions.jsonl").is_file()
    assert "held-out scores" in result.stdout and "image-free baseline" in result.stdout
    assert "cosctl report" in result.stdout and "cosctl export" in result.stdout
    # `cosctl report` of the run folders the demo names shows both stages' evals
    report = write_report([run_folder(tmp_path / "demo", stage) for stage in TRAINED_STAGES], tmp_path / "report")
    assert str(tmp_path / "report" / "eval_final.png") in report["figures"]
    assert (tmp_path / "report" / "report.md").read_text().count("`cosctl eval` of") == 2


def test_the_closing_tables_show_gaps_and_scores_beside_the_image_free_baseline(tmp_path):
    """The end of the demo: per trained stage the eval loss, swapped loss and their gap; then each task's
    metrics for both stages beside the image-free baseline's (accuracies in percent)."""
    stage = {
        "visual_tokens": 32,
        "image_size": 64,
        "steps": 300,
        "first_loss": 6.0,
        "final_loss": 1.0,
        "final_eval_loss": 1.027,
        "final_eval_loss_swapped_images": 1.093,
        "samples_per_s": 70.0,
    }
    vqa = {"num": 47, "accuracy": 0.277}
    summary = {
        "pretrain": stage,
        "finetune": stage | {"visual_tokens": 528, "final_eval_loss_swapped_images": 1.055},
        "scores": {
            "stages": {"pretrain": {"vqa": vqa}, "finetune": {"vqa": vqa | {"accuracy": 0.3}}},
            "baseline": {"vqa": vqa | {"accuracy": 0.234}},
        },
        "data": {"root": str(tmp_path / "data")},
        "total_time_s": 200.0,
    }
    console = Console(width=140, record=True)
    print_summary(summary, tmp_path, console=console)
    lines = console.export_text().splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split()}
    assert rows["pretrain"][-3:-1] == ["1.093", "0.0660"] and rows["finetune"][-2] == "0.0280"
    assert rows["vqa"][-4:] == ["%", "27.7", "30.0", "23.4"]


@pytest.mark.parametrize(
    ("started", "on_path", "expected"),
    [
        (".venv/bin/cosctl", False, ".venv/bin/cosctl"),  # the README's quick start: the venv not activated
        (".venv/bin/cosctl", True, "cosctl"),  # activated: the shell finds this cosctl
        ("MAIN", False, "PYTHON -m cosctl"),
    ],
    ids=["venv-not-activated", "activated", "python-m"],
)
def test_the_closing_commands_run_as_printed(tmp_path, monkeypatch, started, on_path, expected):
    """The demo's "where to look next" commands start the way the demo was started: `.venv/bin/cosctl` when
    that is what ran (a bare `cosctl` would not be found), `cosctl` when the shell finds that same script,
    `python -m cosctl` under python -m."""
    import cosctl.__main__ as main_module

    monkeypatch.chdir(tmp_path)
    script = tmp_path / ".venv" / "bin" / "cosctl"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent) if on_path else str(tmp_path / "empty"))
    monkeypatch.setattr("sys.argv", [main_module.__file__ if started == "MAIN" else started, "demo"])
    command = expected.replace("PYTHON", sys.executable)  # outside the working directory: shown absolute
    assert cosctl_command() == command
    console = Console(width=400, record=True)
    summary = {
        name: {"visual_tokens": 32, "image_size": 64, "steps": 1, "first_loss": 2.0, "final_loss": 1.0}
        | {"final_eval_loss": 1.0, "final_eval_loss_swapped_images": 1.1, "samples_per_s": 1.0}
        for name in TRAINED_STAGES
    }
    summary |= {"scores": {"stages": {n: {} for n in TRAINED_STAGES}, "baseline": {}}, "data": {"root": "d"}}
    print_summary(summary | {"total_time_s": 1.0}, tmp_path / "out", console=console)
    lines = [line.split(maxsplit=1) for line in console.export_text().splitlines() if line.startswith("  ")]
    printed = {words[0]: words[1] for words in lines if len(words) == 2}
    for label, verb in (("plots", "report"), ("scores", "eval"), ("export", "export")):
        assert printed[label].startswith(f"{command} {verb} "), printed[label]


def test_report_of_the_demo_runs_shows_their_evals(tmp_path, synth_dir, tokenizer):
    """The demo scores a stage into that stage's run folder, so `cosctl report` of the run folders it
    prints draws the eval plot and the eval table."""
    config = tiny_config()
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = image_token_id(tokenizer)
    save_model(tiny_model(config), tokenizer, tmp_path / "staging")
    publish(open_store(str(tmp_path / "pretrain")), tmp_path / "staging", "model")
    out = tmp_path / "demo"
    scores = score_stages({"pretrain": str(tmp_path / "pretrain")}, synth_dir, out)
    assert set(scores["stages"]["pretrain"]) == set(scores["baseline"])
    report = write_report([run_folder(out, "pretrain")], tmp_path / "report")
    assert str(tmp_path / "report" / "eval_final.png") in report["figures"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Eval results" in text and f"`cosctl eval` of {tmp_path / 'pretrain'}" in text
