"""`cosctl demo --compare`: Chain-of-Sight against 336 tokens throughout, on the same data and steps."""

from __future__ import annotations

import json

import pytest

from cosctl.demo import compare
from cosctl.demo import pipeline as demo
from tests.harness import assert_plan_equals_run


def _arm(tokens: tuple[int, int], px: tuple[int, int], seconds: tuple[float, float], vqa: float) -> dict:
    stages = {
        stage: {
            "visual_tokens": tokens[i],
            "image_size": px[i],
            "train_time_s": seconds[i],
            "samples_per_s": 16.0,
            "final_eval_loss": 1.0,
            "final_eval_loss_swapped_images": 1.05,
        }
        for i, stage in enumerate(("pretrain", "finetune"))
    }
    return stages | {"scores": {"finetune": {"vqa": {"num": 10, "accuracy": vqa}}}}


def test_comparison_rows_put_the_arms_side_by_side():
    """The table has each stage's tokens/px, wall-clock and swap gap for both arms, then every finetune
    metric for both arms beside the image-free baseline's."""
    rows = compare.comparison_rows(
        {
            "cos": _arm((32, 528), (64, 128), (60.0, 100.0), 0.5),
            "tokens336": _arm((336, 336), (128, 128), (300.0, 80.0), 0.4),
            "image_free_baseline": {"vqa": {"num": 10, "accuracy": 0.25}},
        }
    )
    table = {row[0]: row[1:] for row in rows}
    assert table["pretrain: visual tokens / px"] == ("32 / 64", "336 / 128", "")
    assert table["finetune: visual tokens / px"] == ("528 / 128", "336 / 128", "")
    assert table["pretrain: wall-clock s"][:2] == ("60", "300")
    assert table["finetune: swap gap"][:2] == ("0.0500", "0.0500")
    assert table["vqa accuracy %"] == ("50.0", "40.0", "25.0")


@pytest.mark.slow
def test_compare_trains_both_arms_on_the_same_data_and_steps(tmp_path, monkeypatch):
    """A few steps of each arm: the 336-token arm pre-trains at 336 tokens / 128 px and fine-tunes at 336, on
    the data the Chain-of-Sight arm made, with the same steps and samples per step; both are scored and
    reported together."""
    real_load_spec = demo.load_spec

    def few_steps(path, overrides):
        if path.name != "inflate.yaml":
            overrides = [*overrides, "optim.num_steps=2", "checkpoint.every_steps=2", "eval.every_steps=2"]
        return real_load_spec(path, overrides)

    monkeypatch.setattr(demo, "load_spec", few_steps)
    result = compare.run_compare(tmp_path / "cmp", num_samples=60)
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["total_time_s"] == result["total_time_s"]
    cos, base = result["cos"], result["tokens336"]
    assert (cos["pretrain"]["visual_tokens"], cos["finetune"]["visual_tokens"]) == (32, 528)
    assert (base["pretrain"]["visual_tokens"], base["finetune"]["visual_tokens"]) == (336, 336)
    assert (base["pretrain"]["image_size"], base["finetune"]["image_size"]) == (128, 128)
    assert all(arm[stage]["steps"] == 2 for arm in (cos, base) for stage in ("pretrain", "finetune"))
    checkpoint = tmp_path / "cmp" / "tokens336" / "runs" / "pretrain" / "checkpoints" / "step_00000002"
    spec = json.loads((checkpoint / "spec.json").read_text())
    assert spec["data"]["root"] == result["data"]["root"] == str(tmp_path / "cmp" / "cos" / "data")
    assert spec["batch"]["samples_per_step"] == 16
    held_out = {task for task, count in result["data"]["tasks"]["eval"].items() if count}
    assert set(base["scores"]["finetune"]) == set(result["image_free_baseline"]) == held_out
    report = (tmp_path / "cmp" / "report" / "report.md").read_text()
    assert "cos/work/pretrain" in report and "tokens336/work/finetune" in report
    assert (tmp_path / "cmp" / "report" / "loss.png").is_file()
    # The tiny-compare recipe's plan (one rank, as the demo runs it) is what its run resolved.
    arm = tmp_path / "cmp" / "tokens336"
    assert_plan_equals_run(arm / "work" / "pretrain", arm / "runs" / "pretrain", 1, tmp_path)
