"""`cosctl report`: two run folders written the way a training run writes them (metrics.jsonl through
`MetricsSink`, summary.json, the resolved spec with the final checkpoint), one of them resumed and
evaluated by `cosctl eval`, give the PNGs and a report.md with the expected figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cosctl.cli.app import app
from cosctl.common.errors import DataError
from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.report.plots import loss_figure
from cosctl.report.runs import RunFolder, read_metrics, run_names
from cosctl.report.write import write_report
from cosctl.spec.specs import load_spec, spec_to_dict
from cosctl.train.metrics import MetricsSink
from tests.harness import RECIPES
from tests.test_evaluate import publish_model

runner = CliRunner()


def step_record(step: int, loss: float, lr: float, seconds: float) -> dict:
    """A training step's record, with the keys `cosctl.train.meter.StepMeter.record` writes."""
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": 1.0 / step,
        "samples": 16,
        "tokens": 2400,
        "label_tokens": 300,
        "micro_batches": 2,
        "step_time_s": seconds,
        "samples_per_s": 16 / seconds,
        "tokens_per_s": 2400 / seconds,
        "tflops": 0.01,
        "mfu": None,
    }


def a_loss(step: int, attempt: int = 0) -> float:
    return 8.0 * math.exp(-step / 6) + 0.05 + 0.001 * attempt  # 7 -> ~0.05: more than two decades


def write_attempt(run_dir: Path, steps: range, num_steps: int, lr: float, attempt: int, gen_eval: bool) -> None:
    sink = MetricsSink(run_dir, num_steps, steps.start - 1, "pretrain")
    if steps.start == 1:
        sink.log({"step": 0, "eval_loss": a_loss(0)})
    for step in steps:
        record = step_record(
            step,
            a_loss(step, attempt) * (lr / 1e-3) ** -0.1,
            lr * (1 - step / (num_steps + 1)),
            2.0 if step == steps.start else 0.5,
        )
        if step % 10 == 0:
            record["eval_loss"] = a_loss(step) + 0.1
        sink.log(record)
        if gen_eval and step % 10 == 0:
            sink.log({"step": step, "eval/vqa/accuracy": step / 100, "eval/caption/cider": step / 50})
    sink.close()


def summary(run_dir: Path, output: Path, steps: int, lr: float) -> None:
    """summary.json as `run_training` writes it, and the resolved spec at its final checkpoint."""
    checkpoint = output / "checkpoints" / f"step_{steps:08d}"
    checkpoint.mkdir(parents=True)
    spec = load_spec(
        RECIPES / "tiny" / "pretrain.yaml",
        [f"optim.lr={lr}", f"optim.num_steps={steps}", "data.root=data/tiny", f"run.output={output}"],
    )
    (checkpoint / "spec.json").write_text(json.dumps(spec_to_dict(spec), indent=1))
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "stage": "pretrain",
                "visual_tokens": 32,
                "image_size": 64,
                "steps": steps,
                "first_loss": 5.0,
                "final_loss": 0.1,
                "loss_window": 5,
                "first_eval_loss": 8.05,
                "final_eval_loss": 0.2,
                "samples_per_s": 32.0,
                "train_time_s": 0.5 * steps,
                "trainable_params": {"resampler": 1000, "projector": 200},
                "world_size": 2,
                "tokens_per_micro_batch": 1024,
                "budget_origin": "spec",
                "checkpoint": str(checkpoint),
                "artefact": str(output / "model"),
            },
            indent=1,
        )
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `a`: 40 steps, stopped after 25 and resumed from its step-20 checkpoint, generation eval every
    10 steps, then `cosctl eval` into its folder. Run `b`: 30 steps at half the learning rate."""
    from cosctl.evaluate.command import run_eval

    root = tmp_path_factory.mktemp("report")
    a, b = root / "lr1e-3" / "pretrain", root / "lr5e-4" / "pretrain"
    write_attempt(a, range(1, 26), 40, 1e-3, attempt=0, gen_eval=True)
    write_attempt(a, range(21, 41), 40, 1e-3, attempt=1, gen_eval=True)
    summary(a, root / "out-a", 40, 1e-3)
    write_attempt(b, range(1, 31), 30, 5e-4, attempt=0, gen_eval=False)
    summary(b, root / "out-b", 30, 5e-4)
    synthesize(root / "data", num_samples=12, seed=0, image_size=64)
    publish_model(root / "model", load_tokenizer(root / "data" / "tokenizer"))
    run_eval(str(root / "model"), root / "data" / "train.json", images=None, out=a, max_new_tokens=4, batch_size=4)
    return root, a, b


def test_resumed_steps_keep_their_last_values(runs):
    """Steps logged twice count once, with the resumed run's values; generation-eval records merge into
    their step; training time sums the kept steps' times."""
    _, a, _ = runs
    steps, redone, bad = read_metrics(a / "metrics.jsonl")
    assert (redone, bad) == (5, 0)
    assert [s["step"] for s in steps] == list(range(41))
    assert steps[22]["loss"] == pytest.approx(a_loss(22, attempt=1))
    assert steps[20]["eval/vqa/accuracy"] == 0.2 and steps[20]["loss"] == pytest.approx(a_loss(20, attempt=0))
    run = RunFolder("a", a, steps)
    assert run.train_time_s == pytest.approx(2.0 + 24 * 0.5 + 2.0 + 19 * 0.5 - 5 * 0.5)
    xs, ys = run.series("eval_loss", "time")
    assert xs[0] == 0.0 and len(ys) == 5


def test_report_of_two_runs_writes_the_plots_and_the_figures(runs, tmp_path):
    """`cosctl report A B --out DIR`: five PNGs and report.md with each run's settings, times, final
    figures, the eval table and links to the plots."""
    _, a, b = runs
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    names = ["loss.png", "throughput.png", "lr.png", "eval_metrics.png", "eval_final.png"]
    for name in names:
        with Image.open(tmp_path / "report" / name) as image:
            assert image.format == "PNG" and image.width >= 800
    report = (tmp_path / "report" / "report.md").read_text()
    for name in names:
        assert f"]({name})" in report
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in report.splitlines()
        if line.startswith("| ")
    }
    assert rows[""] == ["lr1e-3/pretrain", "lr5e-4/pretrain"]  # told apart by their parent folders
    assert rows["steps logged"] == ["1-40", "1-30"] and rows["steps redone (resumes)"] == ["5", "0"]
    assert rows["final train loss"][0] == f"{a_loss(40, attempt=1):.4g}"
    assert rows["final eval loss"] == [f"{a_loss(40) + 0.1:.4g}", f"{a_loss(30) + 0.1:.4g}"]
    assert rows["training time"] == ["23.0 s", "16.5 s"]
    assert rows["final eval/vqa/accuracy"] == ["0.4", "-"]
    assert rows["optim.lr"] == ["0.001", "0.0005"] and rows["optim.num_steps"] == ["40", "30"]
    assert rows["world size"] == ["2", "2"] and rows["trainable parameters"] == ["1,200", "1,200"]
    metrics = json.loads((a / "metrics.json").read_text())
    assert f"`cosctl eval` of {metrics['model']}" in report
    assert "image-free baseline" in report and "Exact-match fallback (unknown tasks): none." in report
    assert "wrote" in result.output and "5 plot(s)" in result.output


def test_a_loss_spanning_decades_is_drawn_on_a_log_axis(runs):
    """Loss from ~7 down to ~0.05 gets log y axes with titles, labels and a legend entry per curve."""
    _, a, b = runs
    import matplotlib.pyplot as plt

    loaded = []
    for path in (a, b):
        steps, _, _ = read_metrics(path / "metrics.jsonl")
        loaded.append(RunFolder(path.parent.name, path, steps))
    fig = loss_figure(loaded)
    try:
        for ax in fig.axes:
            assert ax.get_yscale() == "log" and ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [
                "lr1e-3 train",
                "lr1e-3 eval",
                "lr5e-4 train",
                "lr5e-4 eval",
            ]
        assert "training time (s" in fig.axes[1].get_xlabel()
    finally:
        plt.close(fig)


def test_run_names_are_short_and_unique(tmp_path):
    """Folder names, with parents only where names repeat."""
    assert run_names([tmp_path / "x" / "pretrain", tmp_path / "y" / "finetune"]) == ["pretrain", "finetune"]
    assert run_names([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]


def test_a_folder_that_is_no_run_is_one_error_line(tmp_path):
    """A folder without metrics is refused in one line naming it; so is a missing one."""
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        result = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "r")])
        assert result.exit_code == 1
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {folder}")
    with pytest.raises(DataError, match="no run folders"):
        write_report([], tmp_path / "r")
