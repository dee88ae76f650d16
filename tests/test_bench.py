"""bench/ (the stage-speed rows and their layouts, a tiny end-to-end product run and the engine alone
beside it, the communication model) and the step-time prediction of `cosctl plan`."""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cosctl.plan.flops import ASSUMED_MFU
from cosctl.plan.summary import build_plan, format_plan
from cosctl.spec.specs import load_spec, parse_spec
from cosctl.stages.pretrain import pretrain_config
from tests.harness import REPO

BENCH = REPO / "bench"
STAGE_SPEED, ENGINE_STEP = BENCH / "stage_speed.py", BENCH / "engine_step.py"


def _bench(name: str):
    """A module of bench/ (scripts, not a package: they import each other from their own folder)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _cpu_env(tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "OMP_NUM_THREADS": "1",
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "COSCTL_PEAK_TFLOPS"):
        env.pop(key, None)
    return env


@pytest.mark.parametrize("shape", ["tiny", "1b", "7b"])
def test_every_row_layout_gives_its_token_count(shape):
    """Each supported row builds a spec whose chain emits exactly the requested visual tokens."""
    rows = _bench("rows")
    args = _bench("stage_speed").parse_args(["--shape", shape])
    patch = rows.SHAPES[shape].vision["patch_size"]
    for tokens in rows.SUPPORTED_TOKENS:
        spec = rows.row_spec(rows.SHAPES[shape], tokens, args)
        config = pretrain_config(spec, vocab_size=32000, image_token_id=0)
        assert config.num_visual_tokens == tokens
        expected_grid = {32: 16, 576: 24}.get(tokens, 32)
        assert spec.model.image_size == expected_grid * patch


@pytest.mark.parametrize("shape", ["tiny", "1b", "7b"])
def test_every_resolution_row_gives_its_tokens_at_its_resolution(shape):
    """TOKENS/RESOLUTION rows: the same token count at 224 (16x16 patches, windows halved) and at 448
    (32x32, the inflation presets, as `inflate_config` makes them from the 32-token chain); the default
    rows are 32/224, 336/224, 336/448 and 528/448."""
    from cos_model import inflate_config

    rows = _bench("rows")
    args = _bench("stage_speed").parse_args(["--shape", shape])
    patch = rows.SHAPES[shape].vision["patch_size"]
    assert args.rows == [(32, 16), (336, 16), (336, 32), (528, 32)]
    base = pretrain_config(rows.row_spec(rows.SHAPES[shape], 32, args), vocab_size=32000, image_token_id=0)
    for tokens, resolution in rows.SUPPORTED_ROWS:
        grid = rows.RESOLUTION_GRIDS[resolution]
        spec = rows.row_spec(rows.SHAPES[shape], tokens, args, grid)
        config = pretrain_config(spec, vocab_size=32000, image_token_id=0)
        assert (config.num_visual_tokens, config.grid_size, config.image_size) == (tokens, grid, grid * patch)
        if tokens in rows.INFLATE_PRESETS and grid == 32:
            inflated = inflate_config(base, rows.INFLATE_PRESETS[tokens])
            assert (config.image_size, config.scales) == (inflated.image_size, inflated.scales)


@pytest.mark.parametrize("script", ["stage_speed", "engine_step"])
def test_rows_and_tokens_options(script):
    """--tokens keeps each count at its default resolution; a row without a layout is an argument error
    (the same options in both scripts that time the rows)."""
    parse_args = _bench(script).parse_args
    assert parse_args(["--tokens", "32,336,576"]).rows == [(32, 16), (336, 32), (576, 24)]
    assert parse_args(["--rows", "528/224,80"]).rows == [(528, 16), (80, 32)]
    for bad in (["--rows", "32/448"], ["--rows", "336/300"], ["--rows", "x/224"], ["--rows", "32", "--tokens", "32"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_shape_defaults_follow_the_paper_settings():
    """1b trains the LLM, 7b freezes it (bridge only) with the paper's 64-sample micro-batch at 32 tokens."""
    rows, bench = _bench("rows"), _bench("stage_speed")
    one_b, seven_b = bench.parse_args(["--shape", "1b"]), bench.parse_args(["--shape", "7b"])
    assert one_b.llm_trainable and not seven_b.llm_trainable
    assert "language_model" not in rows.row_spec(rows.SHAPES["7b"], 32, seven_b).model.trainable
    assert seven_b.tokens_per_micro_batch // (32 + seven_b.text_tokens) == 64
    assert not bench.parse_args(["--shape", "1b", "--llm-frozen"]).llm_trainable


def test_set_and_auto_reach_every_row_spec():
    """--set overrides and an auto budget land in each row's spec; a bad budget is an argument error,
    and so is an auto budget for the engine alone without a product run to take the micro-batch from."""
    rows, bench = _bench("rows"), _bench("stage_speed")
    args = bench.parse_args(["--shape", "1b", "--set", "deepspeed.template=zero2", "--tokens-per-micro-batch", "auto"])
    spec = rows.row_spec(rows.SHAPES["1b"], 528, args)
    assert spec.deepspeed.template == "zero2" and spec.batch.tokens_per_micro_batch == "auto"
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens-per-micro-batch", "lots"])
    engine_step = _bench("engine_step")
    with pytest.raises(SystemExit):
        engine_step.parse_args(["--tokens-per-micro-batch", "auto"])
    assert engine_step.parse_args(["--tokens-per-micro-batch", "auto", "--match", "product.json"]).match


def test_product_rows_write_a_pretrain_spec_that_times_one_micro_batch_per_rank(tmp_path):
    """A product row's spec: the row's model section with the synthetic set's tokenizer and data, a step
    of what the budget holds at --text-tokens on each rank (256 per rank with auto), steps past the
    timed ones so the run is stopped before its final save, no periodic save, no eval, --set last; the
    product is the only timing path."""
    rows, bench = _bench("rows"), _bench("stage_speed")
    shape = rows.SHAPES["tiny"]
    args = bench.parse_args(["--nproc", "2", "--warmup", "1", "--steps", "2", "--set", "data.num_workers=2"])
    spec = parse_spec(bench.product_spec(shape, 32, 16, args, tmp_path, "DATA", "TOK", 7))
    assert (spec.model.tokenizer, spec.data.root, spec.data.eval, spec.data.num_workers) == ("TOK", "DATA", None, 2)
    assert [s.to_dict() for s in spec.model.scales] == rows.layout(shape, 32, 16)[1]
    assert spec.batch.samples_per_step == 7 and spec.optim.num_steps == 1 + 2 + _bench("common").STOP_MARGIN
    assert spec.checkpoint.every_steps is None and spec.checkpoint.every_minutes is None
    assert spec.eval.every_steps is None and spec.eval.generate_every_steps is None
    assert spec.run.output == str(tmp_path / "output")
    assert bench.default_samples_per_step(args, spec, 32) == 2 * (2048 // (32 + 64))
    auto = bench.parse_args(["--tokens-per-micro-batch", "auto"])
    auto_spec = parse_spec(bench.product_spec(shape, 32, 16, auto, tmp_path, "DATA", "TOK", 1))
    assert bench.default_samples_per_step(auto, auto_spec, 16) == bench.AUTO_SAMPLES_PER_RANK
    finished = bench.parse_args(["--run-to-end", "--warmup", "1", "--steps", "2"])
    assert parse_spec(bench.product_spec(shape, 32, 16, finished, tmp_path, "DATA", "TOK", 1)).optim.num_steps == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--path", "direct"])


def test_timed_figures_are_the_medians_of_the_products_step_records():
    """The figures of a product row: medians over steps warmup+1 .. warmup+steps of metrics.jsonl's
    records (data time included), the largest peak memory, the model FLOPs per sample the product
    counted; the loop time is the spacing of consecutive records; missing steps are an error."""
    common = _bench("common")
    records = [
        {
            "step": s,
            "time": 100.0 + 2 * s,
            "loss": 5.0 - s,
            "step_time_s": t,
            "data_time_s": t / 10,
            "peak_mem_gib": 1.0 + s,
            "samples": 8,
            "tokens": 400,
            "micro_batches": 1,
            "samples_per_s": 8 / t,
            "tokens_per_s": 400 / t,
            "tflops": 1 / t,
            "mfu": 0.1 / t,
            "hfu": 0.2 / t,
        }
        for s, t in [(1, 9.0), (2, 1.0), (3, 3.0), (4, 2.0)]
    ]
    figures = common.timed_figures(records, warmup=1, steps=3)
    assert figures["s_per_step"] == 2.0 and figures["step_times_s"] == [1.0, 3.0, 2.0]
    assert figures["samples_per_s"] == 4.0 and figures["mfu"] == pytest.approx(0.05)
    assert figures["data_s_per_step"] == pytest.approx(0.2) and figures["peak_mem_gib"] == 5.0
    assert figures["flops_per_sample"] == pytest.approx(1e12 / 8)
    assert figures["loop_s_per_step"] == 2.0 and figures["samples_per_step"] == 8
    assert (figures["first_loss"], figures["last_loss"]) == (4.0, 1.0)
    with pytest.raises(ValueError, match="lacks steps"):
        common.timed_figures(records, warmup=2, steps=3)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_product_data_pads_the_tokenizer_to_the_shapes_vocabulary(tmp_path):
    """The synthetic set is made once per resolution (again only when too small); a tokenizer smaller
    than the LLM's vocabulary is padded with unused added tokens, and every record encodes as before."""
    bench = _bench("stage_speed")
    from cosctl.data.records import load_examples, load_tokenizer

    data = bench.prepare_data(tmp_path, 64, 40, 1000)
    assert data.num_train >= 40 and data.vocab_size == 1000 and data.tokenizer_vocab_size < 1000
    assert len(load_tokenizer(data.tokenizer)) == 1000
    stamp = (data.root / "train.json").stat().st_mtime_ns
    assert bench.prepare_data(tmp_path, 64, 30, 1000) == data
    assert (data.root / "train.json").stat().st_mtime_ns == stamp
    padded, plain = load_tokenizer(data.tokenizer), load_tokenizer(data.root / "tokenizer")
    ids = [
        [e.input_ids for e in load_examples(data.root / "train.json", data.root, tok, 32, 256, 0.0)[0]]
        for tok in (padded, plain)
    ]
    assert ids[0] == ids[1]
    assert bench.prepare_data(tmp_path, 64, 30, 100).tokenizer == data.root / "tokenizer"


def test_plan_predicts_step_time_from_the_flop_model(tmp_path, monkeypatch):
    """With a device peak, plan's predicted step time is FLOPs per step over peak x the assumed MFU."""
    spec = load_spec(REPO / "recipes/tiny/pretrain.yaml", [f"run.output={tmp_path}"])
    monkeypatch.delenv("COSCTL_PEAK_TFLOPS", raising=False)
    unknown = build_plan(spec)
    assert unknown["predicted_step_s"] is None and unknown["predicted_samples_per_s"] is None
    monkeypatch.setenv("COSCTL_PEAK_TFLOPS", "2.0")
    plan = build_plan(spec)
    assert plan["predicted_step_s"] == pytest.approx(plan["flops_per_step"] / (2.0e12 * ASSUMED_MFU))
    assert plan["predicted_samples_per_s"] == pytest.approx(plan["samples_per_step"] / plan["predicted_step_s"])


def test_plan_with_an_auto_budget_still_predicts_the_step(tmp_path, monkeypatch):
    """With `auto` the micro-batch is unknown before the probe, but a step is the spec's samples per
    step whatever the split: plan predicts the same step time and samples/s as with a fixed budget."""
    monkeypatch.setenv("COSCTL_PEAK_TFLOPS", "2.0")
    fixed = build_plan(load_spec(REPO / "recipes/tiny/pretrain.yaml", [f"run.output={tmp_path}"]))
    auto = build_plan(
        load_spec(REPO / "recipes/tiny/pretrain.yaml", [f"run.output={tmp_path}", "batch.tokens_per_micro_batch=auto"])
    )
    assert auto["samples_per_micro_batch"] is None and auto["micro_batches_per_step"] is None
    assert auto["predicted_step_s"] == pytest.approx(fixed["predicted_step_s"])
    assert auto["predicted_samples_per_s"] == pytest.approx(fixed["predicted_samples_per_s"])
    assert "auto: probed on the device at start" in format_plan(auto)


def _run(script: Path, args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        env=_cpu_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_engine_step_run_writes_both_rows(tmp_path):
    """The engine alone (bench/engine_step.py), a tiny CPU run at 32 and 528 tokens, writes one JSON row
    each, with resolution, MFU and HFU; 32 tokens pack more samples."""
    out = tmp_path / "engine.json"
    args = ["--shape", "tiny", "--rows", "32/224,528/448", "--warmup", "1", "--steps", "1"]
    result = _run(
        ENGINE_STEP, [*args, "--gradient-checkpointing", "--peak-tflops", "1", "--json", str(out)], tmp_path, 280
    )
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["complete"] and report["device"].startswith("cpu")
    rows = {row["tokens"]: row for row in report["rows"]}
    assert sorted(rows) == [32, 528]
    for row in rows.values():
        for key in (
            "micro_batch",
            "samples_per_s",
            "tokens_per_s",
            "tflops",
            "mfu",
            "hfu",
            "image_size",
            "resolution",
            "peak_mem_gib",
            "s_per_step",
            "predicted_s_per_step",
        ):
            assert row[key] is not None, key
        assert row["samples_per_s"] > 0 and row["peak_mem_gib"] > 0
        # With gradient checkpointing the device also recomputes the LLM forward: HFU counts it, MFU does not.
        assert row["hardware_flops_per_sample"] > row["flops_per_sample"] and row["hfu"] > row["mfu"]
    assert rows[32]["micro_batch"] > rows[528]["micro_batch"]
    assert (rows[32]["image_size"], rows[528]["image_size"]) == (64, 128)
    assert "ratio_32_vs_336" in report and "| 528 | 128 |" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_product_rows_come_from_the_products_own_metrics(tmp_path):
    """stage_speed on CPU: each row is a `cosctl pretrain` run, and its figures are the medians of the
    timed steps of that run's own metrics.jsonl (MFU and HFU from the peak passed on, data time, peak
    memory); the run is stopped after the last timed step and saves nothing. The engine alone
    (engine_step --match) is then sized as each product row, so both count the same FLOPs per sample."""
    out, work = tmp_path / "speed.json", tmp_path / "work"
    args = ["--shape", "tiny", "--rows", "32/224,528/448", "--warmup", "1", "--steps", "2", "--gradient-checkpointing"]
    result = _run(STAGE_SPEED, [*args, "--peak-tflops", "1", "--work", str(work), "--json", str(out)], tmp_path, 400)
    report = json.loads(out.read_text())
    assert report["complete"] and [row["tokens"] for row in report["rows"]] == [32, 528]
    product = {row["tokens"]: row for row in report["rows"]}
    for row in product.values():
        for key in (
            "image_size",
            "resolution",
            "mfu",
            "hfu",
            "tflops",
            "samples_per_s",
            "tokens_per_s",
            "s_per_step",
            "loop_s_per_step",
            "samples_per_step",
            "micro_batches",
            "text_tokens",
            "peak_mem_gib",
            "data_s_per_step",
            "vocab_size",
            "predicted_s_per_step",
        ):
            assert row[key] is not None, key
        records = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        timed = [record for record in records if record["step"] in (2, 3)]
        assert len(timed) == 2
        for key in ("step_time_s", "samples_per_s", "tokens_per_s", "tflops", "mfu", "hfu", "data_time_s"):
            name = {"step_time_s": "s_per_step", "data_time_s": "data_s_per_step"}.get(key, key)
            assert row[name] == pytest.approx(statistics.median(record[key] for record in timed)), key
        assert row["peak_mem_gib"] == max(record["peak_mem_gib"] for record in timed)
        # The peak reached the product: MFU is its TFLOP/s over 1; checkpointing makes HFU count more.
        assert row["mfu"] == pytest.approx(row["tflops"]) and row["hfu"] > row["mfu"]
        assert row["returncode"] == 143 and row["stopped"] and max(r["step"] for r in records) < 6
        assert not list((Path(row["run_dir"]).parent / "output").rglob("manifest.json"))  # nothing saved
        spec = yaml.safe_load(Path(row["spec"]).read_text())
        assert spec["model"]["image_size"] == row["image_size"] and "checkpoint" not in spec
        assert row["vocab_size"] == 512 and row["micro_batches"] == 1
    assert (product[32]["image_size"], product[528]["image_size"]) == (64, 128)
    assert product[32]["samples_per_step"] == 2048 // (32 + 64)
    assert product[528]["samples_per_step"] == 2048 // (528 + 64)
    assert report["ratio_32_vs_336"] is None and "| 528 | 128 |" in result.stdout

    engine_out = tmp_path / "engine.json"
    _run(ENGINE_STEP, [*args, "--peak-tflops", "1", "--match", str(out), "--json", str(engine_out)], tmp_path, 180)
    for row in json.loads(engine_out.read_text())["rows"]:
        matched = product[row["tokens"]]
        assert row["vocab_size"] == matched["vocab_size"] and row["image_size"] == matched["image_size"]
        assert row["text_tokens"] == round(matched["text_tokens"]) and row["micro_batch"] == matched["samples_per_step"]
        assert row["product_over_engine"] == pytest.approx(matched["samples_per_s"] / row["samples_per_s"])


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_the_communication_model_matches_what_deepspeed_moves(tmp_path):
    """bench/comm_volume.py on 2 CPU ranks, one micro-batch per step: the bytes ZeRO-3 and ZeRO-2 all-gather,
    reduce-scatter and all-reduce per step are what `cosctl.plan.comm` predicts (the loss, counts and gradient
    norm add a few bytes of all-reduce that the model leaves out)."""
    out = tmp_path / "comm.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "comm_volume.py"),
            "--micro-batches",
            "1",
            "--warmup",
            "2",
            "--steps",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == [
        "zero3-llm-trained",
        "zero3-llm-frozen",
        "zero2-llm-trained",
        "zero2-llm-frozen",
    ]
    for row in rows:
        measured, predicted = row["measured_bytes_per_step"], row["predicted_bytes_per_step"]
        assert set(predicted) <= set(measured), row
        for kind, want in predicted.items():
            assert want <= measured[kind] <= want + 1024, (row["variant"], kind, measured[kind], want)


def test_cos_grid_rows_are_specs_the_product_accepts():
    """Every cos_grid row's pre-training, inflation plan and fine-tuning overrides load as the recipes'
    specs, with the change the row names (whole LLM: no LoRA and the LLM in `trainable`)."""
    grid = _bench("cos_grid")
    for name, (recipe, sets) in grid.PRETRAINS.items():
        spec = load_spec(REPO / "recipes" / recipe, list(sets))
        assert spec.model.image_size == {"cos64": 64, "cos128": 128, "tokens336": 128}[name]
    for plan in grid.INFLATIONS.values():
        load_spec(REPO / "recipes/tiny/inflate.yaml", ["source=/nowhere", f"plan={plan}"])
    for row in grid.ROWS.values():
        spec = load_spec(REPO / "recipes/tiny/finetune.yaml", ["model.source=/nowhere", *row.finetune_sets()])
        assert spec.optim.num_steps == row.steps
        assert (spec.lora is None) == row.full_llm == ("language_model" in spec.model.trainable)


def test_cos_grid_table_averages_seeds_and_names_what_is_missing():
    """The grid's table gives mean ± sd over the seeds that ran, "not run" for an arm without results,
    and the image-free baseline's scores averaged over the seeds (each seed has its own data)."""
    grid = _bench("cos_grid")

    def arm(loss, cider, free_cider):
        stage = {"train_time_s": 10.0, "visual_tokens": 528, "final_eval_loss": loss}
        return {
            "pretrain": stage,
            "finetune": stage | {"final_eval_loss_swapped_images": loss + 0.05},
            "scores": {"caption": {"cider": cider}, "vqa": {"accuracy": 0.25}},
            "baseline": {"caption": {"cider": free_cider}, "vqa": {"accuracy": 0.2}},
        }

    results = {"0": {"lora": {"cos": arm(1.0, 0.5, 0.6)}}, "1": {"lora": {"cos": arm(1.2, 0.7, 0.8)}}}
    lines = grid.table({"results": results}).splitlines()
    assert lines[2].split(" | ")[1:6] == ["CoS (2 seeds)", "10", "10", "528", "1.100 ± 0.141"]
    assert "0.600 ± 0.141" in lines[2] and "25.0" in lines[2]
    assert "not run" in lines[3] and lines[4].startswith("| image-free baseline | (2 seeds)")
    assert "0.700 ± 0.141" in lines[4] and "20.0" in lines[4]
