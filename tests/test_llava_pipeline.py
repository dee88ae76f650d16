"""The pipeline on data shaped like users': a LLaVA-665K-shaped set (blocks of records on one image, runs
of text-only ShareGPT records, no `task`) with a Llama/Vicuna-style SentencePiece tokenizer (legacy=False),
run through the CLI as a user runs it: 2-rank ZeRO-3 pretrain -> inflate -> 2-rank LoRA finetune (with
the held-out generation eval) -> 2-rank `cosctl eval` -> `cosctl export`, whose folder transformers alone
(a fresh process that cannot import the project) answers the same held-out records with.

One module-scoped fixture runs it once (few steps, 96 training and 24 held-out records); each test checks
one behaviour of its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cosctl.data.records import load_tokenizer
from cosctl.evaluate.records import build_prompt
from tests.harness import cosctl, ok, steps
from tests.llava import write_llava665k_set
from tests.test_export import FRESH_CHAT_SCRIPT, _run_fresh
from tests.test_heldout import text_only_at_both_ends
from tests.test_pipeline import summary
from tests.test_processing import messages_of

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

NUM_TRAIN, NUM_HELD_OUT = 96, 24
MAX_NEW_TOKENS = 8
# Both training stages: 2 steps, the held-out losses at steps 0 and 2, no mid-run checkpoint. A low
# learning rate keeps the model near its random init, whose greedy answers vary with the prompt and the
# image; 2 steps at the recipe's rate collapse them to frequent tokens (every image record answered with
# eos at once), and equal empty answers would say little about the export.
FAST = ["optim.num_steps=2", "optim.lr=1e-4", "checkpoint.every_steps=2", "eval.every_steps=2", "eval.num_batches=8"]
# The finetune's generation eval at step 2 on the split's first 6 records: its 4 text-only ones and 2
# with an image, in batches of 4, so rank 0 generates a batch with images and rank 1 a text-only one.
GENERATION = [
    "eval.generate_every_steps=2",
    "eval.generate_samples=6",
    "eval.generate_batch_size=4",
    f"eval.generate_max_new_tokens={MAX_NEW_TOKENS}",
]


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def write_data(root: Path, synth_dir: Path, tokenizer_dir: Path) -> list[dict]:
    """train.json and eval.json shaped like llava_v1_5_mix665k.json under `root`; the held-out split opens
    and closes with text-only runs (as a split cut inside ShareGPT blocks) and has one id per record, as
    `cosctl eval` needs. Returns the held-out records."""
    write_llava665k_set(root, synth_dir, NUM_TRAIN, seed=0)
    held_out = write_llava665k_set(
        root, synth_dir, NUM_HELD_OUT, seed=1, name="eval.json", source="eval.json", shared_ids=False
    )
    assert load_tokenizer(tokenizer_dir).is_fast  # the Llama-style folder loads as cosctl loads it
    return text_only_at_both_ends(held_out, num_first=4, num_last=2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, synth_dir, llama_tokenizer_dirs):
    root = tmp_path_factory.mktemp("llava_pipeline")
    data, tokenizer = root / "data", llama_tokenizer_dirs[False]
    held_out = write_data(data, synth_dir, tokenizer)
    out = {stage: root / "runs" / stage for stage in ("pretrain", "inflate", "finetune", "export")}
    results = {}
    results["pretrain"] = cosctl(
        "pretrain", "recipes/tiny/pretrain.yaml", "--nproc", "2", "--run-dir", str(root / "work/pre"),
        "--output", str(out["pretrain"]),
        *sets(*FAST, f"data.root={data}", f"model.tokenizer={tokenizer}", "batch.tokens_per_micro_batch=1024"),
        tmp=root,
    )  # fmt: skip
    results["inflate"] = cosctl(
        "inflate", "recipes/tiny/inflate.yaml", "--run-dir", str(root / "work/inf"), "--output", str(out["inflate"]),
        *sets(f"source={out['pretrain']}"),
    )  # fmt: skip
    results["finetune"] = cosctl(
        "finetune", "recipes/tiny/finetune.yaml", "--nproc", "2", "--run-dir", str(root / "work/fin"),
        "--output", str(out["finetune"]),
        *sets(*FAST, *GENERATION, f"data.root={data}", f"model.source={out['inflate']}",
              "batch.tokens_per_micro_batch=2048"),
        tmp=root,
    )  # fmt: skip
    results["eval"] = cosctl(
        "eval", str(out["finetune"]), "--data", str(data / "eval.json"), "--images", str(data),
        "--out", str(root / "eval"), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "4", "--nproc", "2",
        tmp=root,
    )  # fmt: skip
    results["export"] = cosctl("export", str(out["finetune"]), "--out", str(out["export"]), tmp=root)
    return {"root": root, "data": data, "held_out": held_out, "out": out, **results}


def metrics(pipeline, work: str) -> list[dict]:
    return [json.loads(line) for line in (pipeline["root"] / "work" / work / "metrics.jsonl").read_text().splitlines()]


def predictions(pipeline) -> list[dict]:
    return [json.loads(line) for line in (pipeline["root"] / "eval" / "predictions.jsonl").read_text().splitlines()]


def test_every_stage_exits_zero(pipeline):
    """Pretrain, inflate, finetune, eval and export each exit 0 on the LLaVA-shaped set and Llama tokenizer."""
    for stage in ("pretrain", "inflate", "finetune", "eval", "export"):
        ok(pipeline[stage])
    assert summary(pipeline, "pretrain")["world_size"] == summary(pipeline, "finetune")["world_size"] == 2
    assert summary(pipeline, "finetune")["visual_tokens"] == 528


@pytest.mark.parametrize("work", ["pre", "fin"])
def test_training_stages_log_the_swapped_image_loss(pipeline, work):
    """Both training stages log the held-out loss with own and swapped images at steps 0 and 2, with
    records given another image, and train their 2 steps to a finite loss."""
    ok(pipeline["pretrain" if work == "pre" else "finetune"])
    evals = {r["step"]: r for r in metrics(pipeline, work) if "eval_loss" in r}
    assert sorted(evals) == [0, 2] and sorted(steps(pipeline["root"] / "work" / work)) == [1, 2]
    for record in evals.values():
        assert record["eval_loss"] > 0 and record["eval_loss_swapped_images"] > 0
        assert record["eval_swapped_records"] > 0


def test_finetune_generation_eval_includes_text_only_records(pipeline):
    """The finetune's generation eval takes the split's first 6 records, its 4 text-only ones included, on
    2 ZeRO-3 ranks of which one generates only a text-only batch, and logs their scores: all 6 are task
    `unknown` (ShareGPT, and 2 image questions that name no task), where the first 6 image records alone
    would include VQA."""
    ok(pipeline["finetune"])
    assert "generation eval: 6 held-out records (4 text-only)" in pipeline["finetune"].stdout
    generated = [r for r in metrics(pipeline, "fin") if any(key.startswith("eval/") for key in r)]
    assert [r["step"] for r in generated] == [2]
    assert [key for key in generated[0] if key.startswith("eval/")] == ["eval/unknown/exact_match"]


def test_eval_scores_every_held_out_record(pipeline):
    """`cosctl eval --nproc 2` of the finetune run scores all 24 held-out records, the text-only ones included."""
    ok(pipeline["eval"])
    rows, held_out = predictions(pipeline), pipeline["held_out"]
    assert [row["id"] for row in rows] == [record["id"] for record in held_out]
    evaluated = json.loads((pipeline["root"] / "eval" / "metrics.json").read_text())
    assert evaluated["num_records"] == sum(evaluated["counts"].values()) == NUM_HELD_OUT
    text_only = {record["id"] for record in held_out if "image" not in record}
    assert len(text_only) >= 6 and all(row["task"] == "unknown" for row in rows if row["id"] in text_only)


def test_transformers_alone_answers_as_cosctl_eval(pipeline):
    """The export of the finetune run, driven by transformers alone one record at a time (chat template,
    processor, greedy generate; no image for a text-only record), gets `cosctl eval`'s prompt ids and
    answers on every held-out record."""
    ok(pipeline["eval"])
    ok(pipeline["export"])
    root, data, folder = pipeline["root"], pipeline["data"], pipeline["out"]["export"]
    records = pipeline["held_out"]
    requests = [
        {"messages": messages_of(r["conversations"])[:-1], "image": str(data / r["image"]) if "image" in r else None}
        for r in records
    ]
    (root / "requests.json").write_text(json.dumps(requests))
    _run_fresh(FRESH_CHAT_SCRIPT, folder, root / "fresh", root / "requests.json", MAX_NEW_TOKENS)
    fresh = json.loads((root / "fresh" / "answers.json").read_text())
    assert fresh["project_modules"] == []
    tokenizer = load_tokenizer(folder)
    prompts = [list(build_prompt(r, tokenizer, 528, data).input_ids) for r in records]
    rows = predictions(pipeline)
    agreement = {
        "records": len(records),
        "text_only": sum("image" not in r for r in records),
        "same_prompt_ids": sum(f["input_ids"] == p for f, p in zip(fresh["rows"], prompts, strict=True)),
        "same_answers": sum(f["answer"] == r["prediction"] for f, r in zip(fresh["rows"], rows, strict=True)),
    }
    print(f"export vs cosctl eval: {agreement}")
    assert agreement["same_prompt_ids"] == agreement["same_answers"] == agreement["records"] == NUM_HELD_OUT
    for with_image in (True, False):  # the answers depend on the prompt, with an image and without
        answers = [row["prediction"] for row, r in zip(rows, records, strict=True) if ("image" in r) == with_image]
        assert len(set(answers)) > 1 and any(answers), answers
