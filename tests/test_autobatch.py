"""cosctl.autobatch: the `tokens_per_micro_batch: auto` fit, its synthetic batches, and a probed run
that trains exactly like one given the probed budget."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.autobatch import MemoryMeter, _fit_and_check, optimizer_state_gib, solve_num_samples, synthetic_micro_batch
from tests.harness import run, steps, train_command
from tests.tiny import tiny_config


def test_fit_fills_the_capacity_exactly():
    """2 GiB fixed + 0.5 GiB per sample fills 10 GiB with 16 samples."""
    fixed, per_sample, num = solve_num_samples({1: 2.5, 2: 3.0}, capacity=10.0, max_samples=None)
    assert (fixed, per_sample, num) == (2.0, 0.5, 16)


def test_fit_respects_the_cap_and_never_goes_below_one_sample():
    """The spec's maximum wins over memory; a model that barely fits still gets one sample."""
    assert solve_num_samples({1: 2.5, 2: 3.0}, capacity=10.0, max_samples=5)[2] == 5
    assert solve_num_samples({1: 9.5, 2: 10.5}, capacity=10.0, max_samples=None)[2] == 1


def test_flat_reading_does_not_divide_by_zero():
    """Equal peaks (CPU allocators can hide growth) give the cap, not a crash."""
    assert solve_num_samples({1: 1.0, 2: 1.0}, capacity=4.0, max_samples=64)[2] == 64


def test_synthetic_batch_has_the_stage_layout():
    """One image's visual slots per sample, text around them, loss only on the second half of the text."""
    config = tiny_config()
    batch = synthetic_micro_batch(config, num_samples=3, num_text_tokens=10)
    assert batch["input_ids"].shape == (3, config.num_visual_tokens + 10)
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 3 * config.num_visual_tokens
    assert batch["pixel_values"].shape == (3, 3, config.image_size, config.image_size)
    assert ((batch["labels"] != IGNORE_INDEX).sum(dim=1) == 5).all()


def test_synthetic_text_never_contains_the_image_token():
    """With <image> inside the vocabulary (as a real tokenizer has it), random text avoids its id, so
    the image-token count always matches the images."""
    config = tiny_config()
    config.image_token_id = 7
    batch = synthetic_micro_batch(config, num_samples=64, num_text_tokens=64)
    assert int((batch["input_ids"] == 7).sum()) == 64 * config.num_visual_tokens


def test_cpu_meter_reads_a_growing_peak():
    """The CPU meter's peak grows by about what the process allocated after a reset."""
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.peak_gib()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert meter.peak_gib() - before > 0.05
    assert meter.capacity_gib(0.5) > 0
    del block


@pytest.mark.slow
@pytest.mark.multiproc
def test_auto_budget_trains_like_the_probed_number(tiny_data, tmp_path):
    """2 ranks with `auto` (capped) print the probe, record the budget, and give the same losses as a run
    given that budget: the probe's forward/backward passes leave nothing behind."""
    auto_dir = tmp_path / "auto"
    result = run(train_command(tiny_data, auto_dir, tmp_path / "out-auto", 4, 4, "batch.tokens_per_micro_batch=auto",
                               "batch.max_tokens_per_micro_batch=1536"), tmp_path)
    assert "tokens_per_micro_batch auto -> " in result.stdout
    budget = json.loads((auto_dir / "summary.json").read_text())["tokens_per_micro_batch"]
    assert 0 < budget <= 1536
    fixed_dir = tmp_path / "fixed"
    run(train_command(tiny_data, fixed_dir, tmp_path / "out-fixed", 4, 4, f"batch.tokens_per_micro_batch={budget}"),
        tmp_path)
    auto_steps, fixed_steps = steps(auto_dir), steps(fixed_dir)
    assert [auto_steps[s]["loss"] for s in range(1, 5)] == [fixed_steps[s]["loss"] for s in range(1, 5)]
    assert [auto_steps[s]["samples"] for s in range(1, 5)] == [fixed_steps[s]["samples"] for s in range(1, 5)]


def _fake_memory(fixed: float, per_sample: float, oom_above: float | None = None):
    """A `measure` for _fit_and_check: linear peak memory, None (out of memory) above `oom_above` GiB;
    records the counts it was asked for."""
    asked = []

    def measure(num: int) -> float | None:
        asked.append(num)
        peak = fixed + per_sample * num
        return None if oom_above is not None and peak > oom_above else peak

    return measure, asked


def test_check_pass_accepts_a_count_that_fits():
    """With linear memory the first fit is right: one check pass at the solved count, and it is kept."""
    measure, asked = _fake_memory(2.0, 0.5)
    assert _fit_and_check({1: measure(1)}, 10.0, None, measure) == 16
    assert asked == [1, 4, 16]


def test_overshoot_is_refitted_through_the_farther_point():
    """Memory that grows faster beyond the probe points (here: a jump after 8 samples) overshoots the
    first guess; the refit through the measured point lands on a count that fits."""
    def measure(num: int) -> float:
        return 2.0 + 0.5 * num + (0.4 * (num - 8) if num > 8 else 0.0)

    num = _fit_and_check({1: measure(1)}, 10.0, None, measure)
    assert measure(num) <= 10.0 and num >= 10


def test_out_of_memory_check_falls_back_below_it():
    """A pass that runs out of memory bounds the count; the tries after it bisect below the bound, and
    the answer is one that was measured to fit."""
    measure, asked = _fake_memory(2.0, 0.5, oom_above=8.0)  # real limit 12 samples, capacity says 16
    num = _fit_and_check({1: measure(1)}, 10.0, None, measure)
    assert asked[:4] == [1, 4, 16, 10] and all(n < 16 for n in asked[4:])
    assert 10 <= num <= 12 and num in asked


def test_undershoot_is_refitted_upwards():
    """A first line that is too steep (memory at 4 samples inflated by a one-off buffer) undershoots;
    refitting through the measured, farther point moves up to a count near the capacity."""
    def measure(num: int) -> float:
        return 2.0 + 0.1 * num + (1.0 if num == 4 else 0.0)

    num = _fit_and_check({1: measure(1)}, 10.0, None, measure)
    assert 76 <= num <= 80 and measure(num) <= 10.0


def test_cap_below_the_probe_counts_is_kept():
    """A spec cap of 2 samples is the answer even though 4 were measured to fit."""
    measure, _ = _fake_memory(2.0, 0.5)
    assert _fit_and_check({1: measure(1)}, 10.0, 2, measure) == 2


def test_optimizer_state_is_kept_free():
    """AdamW's moments (8 bytes per trainable parameter, +4 for the GPU's foreach temporaries) are
    reserved, since the probe runs before the step that creates them; frozen parameters cost nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 24))
    model[1].requires_grad_(False)
    engine = SimpleNamespace(module=model)
    assert optimizer_state_gib(engine, torch.device("cpu")) == pytest.approx(1_001_000 * 8 / 2**30)
    assert optimizer_state_gib(engine, torch.device("cuda")) == pytest.approx(1_001_000 * 12 / 2**30)
