"""Optimizer steps of a fixed number of samples, split into token-budget micro-batches (docs/design.md §5)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.data.records import DataError, load_examples
from cosctl.plan.resolve import samples_per_micro_batch
from cosctl.train.batching import (
    MicroBatch,
    deal_to_ranks,
    epoch_order,
    eval_micro_batches,
    fill_micro_batches,
    legacy_epoch_order,
    split_step,
)
from cosctl.train.loader import StepLoader

IMAGE_SIZE = 64


def examples_at(synth_dir, tokenizer, num_visual_tokens: int = 32):
    examples, _ = load_examples(synth_dir / "train.json", synth_dir, tokenizer, num_visual_tokens, 128, 0.0)
    return examples


def make_loader(synth_dir, examples, *, rank=0, world_size=1, num_workers=0, budget=512, samples_per_step=8):
    return StepLoader(
        examples,
        image_root=synth_dir,
        image_size=IMAGE_SIZE,
        pad_token_id=3,
        tokens_per_micro_batch=budget,
        samples_per_step=samples_per_step,
        seed=7,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )


def random_lengths(n: int, seed: int = 0, low: int = 20, high: int = 200) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_a_step_is_every_sample_once_within_budget_with_equal_passes_per_rank(world_size):
    """split_step gives each sample of the step to exactly one trained micro-batch, keeps every
    micro-batch within the budget, and every rank runs the same number of micro-batches."""
    lengths = random_lengths(200)
    chosen = list(range(0, 200, 3))
    plans = split_step(chosen, lengths, world_size, 512)
    trained = [i for plan in plans for micro in plan if not micro.filler for i in micro.indices]
    assert sorted(trained) == chosen
    assert len({len(plan) for plan in plans}) == 1
    for plan in plans:
        for micro in plan:
            assert max(lengths[i] for i in micro.indices) * len(micro.indices) <= 512


def test_ranks_that_cannot_split_further_run_a_label_free_filler():
    """Two samples on three ranks: the third rank runs a filler micro-batch, so its collectives match."""
    plans = split_step([0, 1], [50, 60, 70], 3, 512)
    assert [len(plan) for plan in plans] == [1, 1, 1]
    assert sorted(micro.filler for plan in plans for micro in plan) == [False, False, True]


def test_dealing_balances_tokens_over_ranks():
    """Longest first to the least-loaded rank: token loads differ by at most the longest sample."""
    lengths = random_lengths(64, seed=3)
    shares = deal_to_ranks(range(64), lengths, 4)
    loads = [sum(lengths[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(lengths)


def test_fill_refuses_an_example_longer_than_the_budget_naming_the_settings():
    """An example over budget is an error naming its length and both settings that could fix it."""
    with pytest.raises(DataError, match="example 1 has 600 tokens.*tokens_per_micro_batch.*max_text_tokens"):
        fill_micro_batches([0, 1], [100, 600], 512)


def test_samples_per_micro_batch():
    """At one budget, a 32-visual-token sample fits >= 4x as often as a 528-token one."""
    assert samples_per_micro_batch(32, 40, 4096) >= 4 * samples_per_micro_batch(528, 40, 4096)
    assert samples_per_micro_batch(528, 40, 4096) == 7


def trained_ids(loader: StepLoader, examples, steps: int) -> list[list[str]]:
    """Record ids per step, over every rank of `loader`'s world, for the next `steps` steps."""
    out = []
    for _ in range(steps):
        plans = loader.step_micro_batches(loader.epoch, loader.step)
        out.append(sorted(examples[i].record_id for plan in plans for m in plan if not m.filler for i in m.indices))
        loader.step += 1
        if loader.step >= loader.steps_per_epoch:
            loader.epoch, loader.step = loader.epoch + 1, 0
    return out


def test_32_and_336_token_stages_take_the_same_steps_over_the_same_samples(synth_dir, tokenizer):
    """The same spec at 32 and at 336 visual tokens: the same steps per epoch and the same samples in
    every step; only the split into micro-batches differs (more passes for the longer samples)."""
    short, long = examples_at(synth_dir, tokenizer, 32), examples_at(synth_dir, tokenizer, 336)
    loaders = [make_loader(synth_dir, examples, world_size=2, budget=1024) for examples in (short, long)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == len(short) // 8 >= 4
    assert trained_ids(loaders[0], short, 8) == trained_ids(loaders[1], long, 8)
    passes = [len(loader.step_micro_batches(0, 0)[0]) for loader in loaders]
    assert passes[0] < passes[1]


def test_another_world_size_sees_the_same_samples_per_step(synth_dir, tokenizer):
    """Steps are cut before ranks: 1, 2 or 3 ranks read the same samples in every step."""
    examples = examples_at(synth_dir, tokenizer)
    streams = [trained_ids(make_loader(synth_dir, examples, world_size=w), examples, 7) for w in (1, 2, 3)]
    assert streams[0] == streams[1] == streams[2]


def test_epochs_shuffle_differently_and_reproducibly():
    """Each epoch's order is a permutation, fixed by (seed, epoch); so is the older list shuffle."""
    for draw in (lambda *a: epoch_order(*a).tolist(), legacy_epoch_order):
        assert sorted(draw(50, 1, 0)) == list(range(50))
        assert draw(50, 1, 0) == draw(50, 1, 0) != draw(50, 1, 1)


def test_a_checkpoint_without_an_order_resumes_in_the_list_shuffle_order(synth_dir, tokenizer):
    """A loader state written before the order was a numpy permutation continues with the old order."""
    examples = examples_at(synth_dir, tokenizer)
    loader = make_loader(synth_dir, examples)
    state = {k: v for k, v in loader.state_dict().items() if k not in ("order", "bad_samples")}
    loader.load_state_dict(state)
    chosen = {i for plan in loader.step_micro_batches(0, 0) for m in plan for i in m.indices}
    assert chosen == set(legacy_epoch_order(len(examples), 7, 0)[:8])
    assert loader.state_dict()["order"] == "legacy"


def assert_same_steps(first: list[list[dict]], second: list[list[dict]]) -> None:
    assert len(first) == len(second)
    for step_a, step_b in zip(first, second, strict=True):
        assert len(step_a) == len(step_b)
        for one, other in zip(step_a, step_b, strict=True):
            assert one.keys() == other.keys() and one["num_samples"] == other["num_samples"]
            assert all(torch.equal(one[key], other[key]) for key in one if key != "num_samples")


def test_next_step_gives_this_ranks_share_collated(synth_dir, tokenizer):
    """Two ranks read disjoint samples of a step, and a step's micro-batches are its collated share."""
    examples = examples_at(synth_dir, tokenizer)
    loaders = [make_loader(synth_dir, examples, rank=r, world_size=2) for r in range(2)]
    plans = loaders[0].step_micro_batches(0, 0)
    steps = [loader.next_step() for loader in loaders]
    assert sum(b["num_samples"] for step in steps for b in step) == 8
    for rank, step in enumerate(steps):
        assert [b["num_samples"] for b in step] == [0 if m.filler else len(m.indices) for m in plans[rank]]
        assert all(b["pixel_values"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) for b in step)


@pytest.mark.parametrize("position", ["mid_epoch", "end_of_epoch"])
def test_restored_loader_yields_the_same_steps_across_epochs(synth_dir, tokenizer, position):
    """A loader restored from state_dict() continues with exactly the original's steps, into epoch 2."""
    examples = examples_at(synth_dir, tokenizer)
    original = make_loader(synth_dir, examples, rank=1, world_size=2)
    for _ in range(1 if position == "mid_epoch" else original.steps_per_epoch):
        original.next_step()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_step() for _ in range(original.steps_per_epoch + 1)]
    restored = make_loader(synth_dir, examples, rank=1, world_size=2)
    restored.load_state_dict(state)
    assert_same_steps([restored.next_step() for _ in range(restored.steps_per_epoch + 1)], expected)


def test_worker_processes_give_the_same_stream(synth_dir, tokenizer):
    """Loading with DataLoader workers yields the same steps, across an epoch, as loading inline."""
    examples = examples_at(synth_dir, tokenizer)
    inline, workers = (make_loader(synth_dir, examples, num_workers=n, budget=1024) for n in (0, 2))
    count = inline.steps_per_epoch + 1
    assert_same_steps([workers.next_step() for _ in range(count)], [inline.next_step() for _ in range(count)])


def test_restored_loader_adopts_the_saved_budget(synth_dir, tokenizer):
    """A position saved under another token budget restores that budget too (a step's micro-batches
    depend on it), so the stream continues with the original's batches."""
    examples = examples_at(synth_dir, tokenizer)
    original = make_loader(synth_dir, examples, budget=1024)
    original.next_step()
    state = json.loads(json.dumps(original.state_dict()))
    expected = [original.next_step() for _ in range(2)]
    restored = make_loader(synth_dir, examples, budget=512)
    restored.load_state_dict(state)
    assert restored.tokens_per_micro_batch == 1024
    assert_same_steps([restored.next_step() for _ in range(2)], expected)


def test_loader_refuses_bad_settings_and_states(synth_dir, tokenizer):
    """Fewer samples per step than ranks, fewer examples than one step, a position from the older
    token-budget batching, another samples_per_step or a position outside the epoch: a DataError each."""
    examples = examples_at(synth_dir, tokenizer)
    with pytest.raises(DataError, match="samples_per_step=2 is smaller than the 4 ranks"):
        make_loader(synth_dir, examples, world_size=4, samples_per_step=2)
    with pytest.raises(DataError, match="fewer than batch.samples_per_step=64"):
        make_loader(synth_dir, examples, samples_per_step=64)
    loader = make_loader(synth_dir, examples)
    with pytest.raises(DataError, match="predates batch.samples_per_step"):
        loader.load_state_dict({"epoch": 0, "index": 3, "tokens_per_micro_batch": 512})
    with pytest.raises(DataError, match="trained with batch.samples_per_step=4"):
        loader.load_state_dict({**loader.state_dict(), "samples_per_step": 4})
    with pytest.raises(DataError, match=f"outside the {len(examples) // 8} steps"):
        loader.load_state_dict({**loader.state_dict(), "step": 99})


def test_filler_micro_batches_train_nothing(synth_dir, tokenizer):
    """A filler micro-batch loads a real sample (so every module runs) with every label ignored."""
    examples = examples_at(synth_dir, tokenizer)
    loader = make_loader(synth_dir, examples)
    batch = loader.dataset[MicroBatch((0,), filler=True)]
    assert batch["num_samples"] == 0 and bool((batch["labels"] == IGNORE_INDEX).all())


def test_eval_micro_batches_are_the_first_in_file_order():
    """Held-out micro-batches: file order, within the budget, at most the number asked for."""

    class Ex:
        def __init__(self, n):
            self.num_tokens = n

    batches = eval_micro_batches([Ex(100)] * 10, 300, 2)
    assert [m.indices for m in batches] == [(0, 1, 2), (3, 4, 5)]
