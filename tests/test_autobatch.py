"""cosctl.train.autobatch: the `tokens_per_micro_batch: auto` fit, its synthetic batches, and a probed run
that trains exactly like one given the probed budget."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.train.autobatch import (
    MemoryMeter,
    _extrapolate_and_confirm,
    optimizer_state_gib,
    solve_num_samples,
    synthetic_micro_batch,
)
from tests.harness import run, steps, train_command
from tests.tiny import tiny_config


def test_fit_fills_the_capacity_exactly():
    """2 GiB fixed + 0.5 GiB per sample fills 10 GiB with 16 samples."""
    fixed, per_sample, num = solve_num_samples({1: 2.5, 2: 3.0}, capacity=10.0, max_samples=1000)
    assert (fixed, per_sample, num) == (2.0, 0.5, 16)


def test_fit_respects_the_cap_and_never_goes_below_one_sample():
    """The cap wins over memory; a model that barely fits still gets one sample."""
    assert solve_num_samples({1: 2.5, 2: 3.0}, capacity=10.0, max_samples=5)[2] == 5
    assert solve_num_samples({1: 9.5, 2: 10.5}, capacity=10.0, max_samples=1000)[2] == 1


def test_flat_reading_is_held_by_the_slope_floor_and_the_cap():
    """Equal peaks (CPU allocators can hide growth) neither divide by zero nor ask for billions of
    samples: the slope floor bounds the count, and the cap bounds it further."""
    assert solve_num_samples({1: 1.0, 4: 1.0}, capacity=4.0, max_samples=10**9, min_per_sample=0.001)[2] == 3001
    assert solve_num_samples({1: 1.0, 4: 1.0}, capacity=4.0, max_samples=64)[2] == 64


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
    result = run(
        train_command(
            tiny_data,
            auto_dir,
            tmp_path / "out-auto",
            4,
            4,
            "batch.tokens_per_micro_batch=auto",
            "batch.max_tokens_per_micro_batch=1536",
        ),
        tmp_path,
    )
    assert "tokens_per_micro_batch auto -> " in result.stdout
    budget = json.loads((auto_dir / "summary.json").read_text())["tokens_per_micro_batch"]
    assert 0 < budget <= 1536
    fixed_dir = tmp_path / "fixed"
    run(
        train_command(tiny_data, fixed_dir, tmp_path / "out-fixed", 4, 4, f"batch.tokens_per_micro_batch={budget}"),
        tmp_path,
    )
    auto_steps, fixed_steps = steps(auto_dir), steps(fixed_dir)
    assert [auto_steps[s]["loss"] for s in range(1, 5)] == [fixed_steps[s]["loss"] for s in range(1, 5)]
    assert [auto_steps[s]["samples"] for s in range(1, 5)] == [fixed_steps[s]["samples"] for s in range(1, 5)]


def _fake_memory(fixed: float, per_sample: float):
    """A `measure` for _extrapolate_and_confirm: linear peak memory; records the counts it ran."""
    asked = []

    def measure(num: int) -> float:
        asked.append(num)
        return fixed + per_sample * num

    return measure, asked


def test_extrapolation_keeps_a_margin_and_confirms_once():
    """Linear memory: passes of 1 and 4 samples, then one confirming pass at the count that fills 90%
    of the capacity (14 of the 16 that would fill it), which is kept."""
    measure, asked = _fake_memory(2.0, 0.5)
    assert _extrapolate_and_confirm({1: measure(1)}, 10.0, 1000, 0.0, measure) == 14
    assert asked == [1, 4, 14]


def test_a_confirming_pass_over_capacity_is_refitted_below_it():
    """Memory that grows faster beyond the small passes reads over the capacity at the first guess; the
    refit through that reading confirms a smaller count that fits, and nothing larger is ever run."""

    def measure(num: int) -> float:
        asked.append(num)
        return 2.0 + 0.5 * num + (0.6 * (num - 8) if num > 8 else 0.0)

    asked: list[int] = []
    num = _extrapolate_and_confirm({1: measure(1)}, 10.0, 1000, 0.0, measure)
    assert measure(num) <= 10.0 and asked[:3] == [1, 4, 14] and max(asked) == 14 and num < 14


def test_cap_below_the_probe_counts_is_kept():
    """A cap of 2 samples (a rank's share of a small step) is the answer; no pass runs more."""
    measure, asked = _fake_memory(2.0, 0.5)
    assert _extrapolate_and_confirm({1: measure(1)}, 10.0, 2, 0.0, measure) == 2
    assert max(asked) == 2


def test_optimizer_state_is_kept_free():
    """AdamW's moments (8 bytes per trainable parameter, +4 for the GPU's foreach temporaries) are
    reserved, since the probe runs before the step that creates them; frozen parameters cost nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 24))
    model[1].requires_grad_(False)
    engine = SimpleNamespace(module=model)
    assert optimizer_state_gib(engine, torch.device("cpu")) == pytest.approx(1_001_000 * 8 / 2**30)
    assert optimizer_state_gib(engine, torch.device("cuda")) == pytest.approx(1_001_000 * 12 / 2**30)


def test_one_sample_that_does_not_fit_is_one_clear_line(monkeypatch):
    """When a single sample's pass already reads over the usable memory, the probe ends with one line
    naming the setting and what to change, before any larger pass."""
    from cosctl.train import autobatch

    monkeypatch.setattr(autobatch, "_peak_of_pass", lambda *args: 100.0)
    monkeypatch.setattr(autobatch, "_release", lambda *args: None)
    monkeypatch.setattr(autobatch.MemoryMeter, "capacity_gib", lambda self, fraction: 8.0)
    engine = SimpleNamespace(module=torch.nn.Linear(4, 4))
    with pytest.raises(autobatch.ProbeError, match=r"auto: one sample of \d+ tokens needs 100.00 GiB, more than"):
        autobatch.probe_micro_batch(
            engine, tiny_config(), 20, memory_fraction=0.85, max_tokens=None, max_samples=64, device=torch.device("cpu")
        )
