"""`cosctl demo`: the whole tiny pipeline on CPU, exactly as the README runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cos_model import CosForConditionalGeneration
from cosctl.demo import swap_gap
from tests.harness import cosctl, ok


@pytest.mark.slow
def test_demo_runs_the_pipeline_and_every_stage_learns(tmp_path):
    """Demo: 32-token pretrain -> 528-token inflate -> LoRA finetune, loss falling clearly in both
    training stages, the model using the image (the held-out loss rises clearly when each record gets
    another's image), artefacts loadable, summary.json complete, every stage reporting, and closing
    tables: eval loss beside swapped-image eval loss, generated answers' scores beside the image-free
    baseline."""
    result = ok(cosctl("demo", "--out", str(tmp_path / "demo"), tmp=tmp_path))
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
    assert (tmp_path / "demo" / "eval" / "finetune" / "predictions.jsonl").is_file()
    assert "held-out scores" in result.stdout and "image-free baseline" in result.stdout
    assert "cosctl report" in result.stdout and "cosctl export" in result.stdout


def test_the_closing_tables_show_gaps_and_scores_beside_the_image_free_baseline(tmp_path):
    """The end of the demo: per trained stage the eval loss, swapped loss and their gap; then each task's
    metrics for both stages beside the image-free baseline's (accuracies in percent)."""
    from rich.console import Console

    from cosctl.demo import print_summary

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
