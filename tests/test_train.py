"""The training loop in this process: one rank, a few steps, a local store (the fast tier of the loop,
its checkpointer and its resume; the multi-rank paths run through the CLI in the slow tier)."""

from __future__ import annotations

import json

import pytest
import torch

from cos_model import IGNORE_INDEX
from cosctl.checkpoint.layout import find_latest, verify
from cosctl.storage import LocalStore
from tests.harness import cosctl, run_script_on_two_ranks, tiny_spec, train_command


def losses(run_dir) -> dict[int, tuple[float, float]]:
    """(loss, learning rate) per step, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["lr"]) for r in records if "loss" in r}


def test_two_steps_commit_checkpoints_and_publish_the_model(tiny_data, tmp_path, in_process):
    """Two steps on one rank commit a verified checkpoint per step, publish model/ with a manifest and log
    each step's data wait and peak memory."""
    out = tmp_path / "out"
    summary = in_process(tiny_spec(tiny_data, out, 2), tmp_path / "work")
    assert summary["steps"] == 2 and summary["world_size"] == 1 and summary["budget_origin"] == "spec"
    store = LocalStore(out)
    latest = find_latest(store)
    assert latest.step == 2 and verify(store, latest, tmp_path / "scratch") == []
    assert (out / "model" / "manifest.json").is_file() and (out / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(0 <= r["data_time_s"] <= r["step_time_s"] and r["peak_mem_gib"] > 0.1 for r in steps)


def test_resume_continues_exactly(tiny_data, tmp_path, in_process):
    """Resuming a 3-step run from its step-2 checkpoint trains step 3 to the same loss and learning rate
    as the straight run, with the budget taken from the checkpoint."""
    out = tmp_path / "out"
    spec = tiny_spec(tiny_data, out, 3)
    in_process(spec, tmp_path / "straight")
    resumed = in_process(spec, tmp_path / "resumed", resume=f"{out}/checkpoints/step_00000002")
    assert resumed["budget_origin"] == "checkpoint" and resumed["steps"] == 3
    assert losses(tmp_path / "resumed") == {3: losses(tmp_path / "straight")[3]}


def longest_training_sample(data) -> tuple[str, int]:
    """(record id, tokens with the 32 visual ones) of the synthetic set's longest training sample."""
    from cosctl.data.records import load_examples, load_tokenizer

    examples, _ = load_examples(data / "train.json", data, load_tokenizer(data / "tokenizer"), 32, 96, 0.0)
    longest = max(examples, key=lambda example: example.num_tokens)
    return longest.record_id, longest.num_tokens


@pytest.mark.parametrize("setting", ["batch.tokens_per_micro_batch", "batch.max_tokens_per_micro_batch"])
def test_a_budget_below_the_longest_sample_is_refused_before_the_engine_is_built(
    tiny_data, tmp_path, in_process, monkeypatch, setting
):
    """A fixed batch.tokens_per_micro_batch (or auto's cap) one token short of the longest sample stops
    the run at start, before DeepSpeed is set up, naming the sample, its tokens and the setting to
    change (not at the step that would hold it)."""
    from cosctl.common.errors import DataError
    from cosctl.train import run as run_module

    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was built before the budget was checked")

    monkeypatch.setattr(run_module, "build_engine", no_engine)
    record_id, tokens = longest_training_sample(tiny_data)
    auto = ["batch.tokens_per_micro_batch=auto"] if setting == "batch.max_tokens_per_micro_batch" else []
    spec = tiny_spec(tiny_data, tmp_path / "out", 2, *auto, f"{setting}={tokens - 1}")
    with pytest.raises(DataError) as refused:
        in_process(spec, tmp_path / "work")
    assert str(refused.value) == (
        f"train.json: the longest sample, {record_id!r}, has {tokens} tokens (visual tokens included), more than "
        f"{setting}={tokens - 1}: raise {setting} to at least {tokens} or lower data.max_text_tokens"
    )


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_budget_below_the_longest_sample_exits_1_in_one_line_on_two_ranks(tiny_data, tmp_path):
    """Through the CLI on 2 ranks, a budget below the longest sample exits 1 with one line naming the
    sample, before any rank builds its engine or trains a step."""
    record_id, tokens = longest_training_sample(tiny_data)
    cmd = train_command(tiny_data, tmp_path / "work", tmp_path / "out", 4, 2)
    cmd += ["--set", f"batch.tokens_per_micro_batch={tokens - 1}"]
    result = cosctl(*cmd[3:], tmp=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [
        f"error: train.json: the longest sample, {record_id!r}, has {tokens} tokens (visual tokens included), "
        f"more than batch.tokens_per_micro_batch={tokens - 1}: raise batch.tokens_per_micro_batch to at least "
        f"{tokens} or lower data.max_text_tokens"
    ], result.stderr[-3000:]
    assert "trainable parameters" not in result.stdout and not (tmp_path / "work" / "metrics.jsonl").exists()


def test_eval_logs_the_loss_with_swapped_images_beside_the_own_image_loss(tiny_data, tmp_path, in_process):
    """Each eval logs eval_loss and eval_loss_swapped_images (every record given the next one's image:
    a different number even for a random model, whose visual tokens depend on the image); off, only
    eval_loss."""
    spec = tiny_spec(tiny_data, tmp_path / "out", 2, "eval.every_steps=2", "eval.num_batches=1")
    summary = in_process(spec, tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 2]
    assert all(r["eval_loss_swapped_images"] != r["eval_loss"] > 0 for r in evals.values())
    assert summary["final_eval_loss_swapped_images"] == evals[2]["eval_loss_swapped_images"]
    off = tiny_spec(tiny_data, tmp_path / "out-off", 1, "eval.every_steps=1", "eval.swapped_images=false")
    assert in_process(off, tmp_path / "off")["final_eval_loss_swapped_images"] is None


# --- token-weighted loss: every label token of a step weighs the same --------------------------------


def two_uneven_micro_batches(data) -> tuple[dict, dict]:
    """Two single-sample micro-batches from the synthetic set: one answer token against a full caption."""
    from cosctl.data.records import collate, load_examples, load_image, load_tokenizer, resolve_image_path

    tokenizer = load_tokenizer(data / "tokenizer")
    examples, _ = load_examples(data / "train.json", data, tokenizer, 32, 96, 0.0)
    caption = max(examples, key=lambda e: sum(label != IGNORE_INDEX for label in e.labels))
    other = next(e for e in examples if e is not caption)

    def batch(example, keep_labels: int | None) -> dict:
        collated = collate(
            [example], [load_image(resolve_image_path(data, example.image_path), 64)], tokenizer.pad_token_id
        )
        if keep_labels is not None:  # keep only the first `keep_labels` answer tokens
            labelled = (collated["labels"] != IGNORE_INDEX).nonzero()[:, 1]
            collated["labels"][0, labelled[keep_labels:]] = IGNORE_INDEX
        return {**collated, "num_samples": 1}

    return batch(other, keep_labels=1), batch(caption, keep_labels=None)


def reference_gradient(data, spec, a: dict, b: dict) -> dict[str, torch.Tensor]:
    """The gradient of (sum of token losses of a and b) / (their label tokens), computed with plain
    PyTorch on one micro-batch holding both samples (no DeepSpeed, no accumulation)."""
    from cosctl.data.conversation import num_label_tokens
    from cosctl.data.records import load_tokenizer
    from cosctl.stages.pretrain import build_pretrain_model

    tokenizer = load_tokenizer(data / "tokenizer")
    model = build_pretrain_model(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    both = {
        "input_ids": torch.cat(
            [pad(a["input_ids"], tokenizer.pad_token_id), pad(b["input_ids"], tokenizer.pad_token_id)]
        ),
        "labels": torch.cat([pad(a["labels"], IGNORE_INDEX), pad(b["labels"], IGNORE_INDEX)]),
        "attention_mask": torch.cat([pad(a["attention_mask"], 0), pad(b["attention_mask"], 0)]),
        "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]]),
    }
    count = num_label_tokens(a["labels"]) + num_label_tokens(b["labels"])
    loss = model(**both, num_items_in_batch=torch.tensor(float(count))).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def engine_gradient(spec, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
    """The gradient the trainer's `accumulate` leaves in a ZeRO-3 engine (full tensors, gathered)."""
    from deepspeed.utils import safe_get_full_grad

    from cosctl.common.dist import init_distributed
    from cosctl.data.records import load_tokenizer
    from cosctl.stages.pretrain import build_pretrain_model
    from cosctl.train.engine import build_engine
    from cosctl.train.loop import accumulate

    dist_info = init_distributed()
    tokenizer = load_tokenizer(spec.model.tokenizer)
    model = build_pretrain_model(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    engine, _, _ = build_engine(model, spec, dist_info, micro_batch_size=1)
    accumulate(engine, micro_batches, dist_info.device)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    engine.destroy()
    return grads


def relative_difference(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    diff = sum(float((got[k] - expected[k]).double().norm() ** 2) for k in got) ** 0.5
    return diff / sum(float(expected[k].double().norm() ** 2) for k in expected) ** 0.5


def test_uneven_micro_batches_give_the_one_micro_batch_gradient(tiny_data, tmp_path, in_process):
    """One step over a 1-label micro-batch and a many-label one, accumulated on one rank, has the
    gradient of both samples in one micro-batch (every token weighs alike), to 1e-5 relative."""
    spec = tiny_spec(tiny_data, tmp_path / "out", 1)
    a, b = two_uneven_micro_batches(tiny_data)
    assert (b["labels"] != IGNORE_INDEX).sum() >= 8 * (a["labels"] != IGNORE_INDEX).sum()
    expected = reference_gradient(tiny_data, spec, a, b)
    assert relative_difference(engine_gradient(spec, [a, b]), expected) < 1e-5


GRADIENT_SCRIPT = """
import sys, torch
from pathlib import Path
from tests.harness import tiny_spec
from tests.test_train import engine_gradient, two_uneven_micro_batches
data, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = tiny_spec(data, out / "run", 1)
a, b = two_uneven_micro_batches(data)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
grads = engine_gradient(spec, [a] if rank == 0 else [b])
if torch.distributed.get_rank() == 0:
    torch.save(grads, out / "grads.pt")
"""


@pytest.mark.slow
@pytest.mark.multiproc
def test_uneven_ranks_give_the_one_micro_batch_gradient(tiny_data, tmp_path):
    """Two ranks, one holding a 1-label sample and the other a many-label one: the step's gradient is
    that of both samples in one micro-batch on one rank, to 1e-5 relative."""
    run_script_on_two_ranks(GRADIENT_SCRIPT, tmp_path, str(tiny_data), str(tmp_path))
    a, b = two_uneven_micro_batches(tiny_data)
    expected = reference_gradient(tiny_data, tiny_spec(tiny_data, tmp_path / "run", 1), a, b)
    assert relative_difference(torch.load(tmp_path / "grads.pt"), expected) < 1e-5


def test_generation_eval_during_training_logs_task_metrics(tiny_data, tmp_path, in_process):
    """With eval.generate_every_steps, the step's metrics record gains per-task generation scores
    (VQA accuracy, CIDEr, acc@0.5...) on the held-out records, as `cosctl eval` computes them."""
    spec = tiny_spec(
        tiny_data,
        tmp_path / "out",
        2,
        "eval.generate_every_steps=2",
        "eval.generate_samples=6",
        "eval.generate_max_new_tokens=4",
        "data.eval=eval.json",
    )
    in_process(spec, tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    step_two = next(r for r in records if r.get("step") == 2 and "loss" in r)
    generated = {key for key in step_two if key.startswith("eval/")}
    assert generated and all(isinstance(step_two[key], float) for key in generated)
