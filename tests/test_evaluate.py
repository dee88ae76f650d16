"""`cosctl eval` and the in-process eval: prompts as training tokenised them, batched greedy generation
with the KV cache equal to one record at a time and to a plain greedy loop, sharding that does not change
the predictions, ZeRO-3 engines (one rank here, two in the slow tier), every artefact kind as the model,
and the command's files, table and errors.

The inputs are built as the pipeline builds them, tiny and in-process: the synthetic set and its
tokenizer, a published `model/` (random weights, saved with `save_pretrained`), a published LoRA
`adapter/` on it, and the export of that adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cos_model import CosForConditionalGeneration
from cos_model.processing import CosImageProcessor, CosProcessor
from cosctl.artefacts.export import export_merged
from cosctl.artefacts.loading import load_for_eval
from cosctl.artefacts.published import save_adapter
from cosctl.checkpoint.layout import publish
from cosctl.cli.app import app
from cosctl.common.errors import DataError
from cosctl.data.conversation import IMAGE_TOKEN, encode_conversation, image_token_id
from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.evaluate.generation import generate_and_score, metrics_record, plan_batches, rank_batches
from cosctl.evaluate.records import build_prompt, load_eval_records
from cosctl.spec.sections import LoraSpec
from cosctl.stages.finetune import apply_lora
from cosctl.storage import open_store
from tests.harness import REPO, cosctl, ok, run_script_on_two_ranks
from tests.llava import write_llava665k_set
from tests.tiny import tiny_config, tiny_model

runner = CliRunner()
MAX_NEW_TOKENS = 6


def publish_model(run: Path, tokenizer, seed: int = 0) -> None:
    """`run`/model/ as the pretrain and inflate stages publish it."""
    config = tiny_config()
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = image_token_id(tokenizer)
    local = run.parent / "staging" / run.name
    tiny_model(config, seed).save_pretrained(local)
    tokenizer.save_pretrained(local)
    publish(open_store(str(run)), local, "model")


def publish_adapter(run: Path, base: Path, tokenizer) -> None:
    """`run`/adapter/ as a LoRA finetune of `base` publishes it, with trained-looking weights."""
    model = CosForConditionalGeneration.from_pretrained(base / "model", dtype=torch.float32)
    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), ["projector"], seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    local = run.parent / "staging" / run.name
    save_adapter(peft_model, state, tokenizer, str(base), local)
    publish(open_store(str(run)), local, "adapter")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Synthetic data (30 records, 64 px), a base run (model/), a finetune run (adapter/), its export."""
    root = tmp_path_factory.mktemp("eval")
    synthesize(root / "data", num_samples=30, seed=0, image_size=64)
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    publish_model(root / "base", tokenizer)
    publish_adapter(root / "finetune", root / "base", tokenizer)
    export_merged(str(root / "finetune"), root / "export")
    records = json.loads((root / "data" / "train.json").read_text())
    return {"root": root, "data": root / "data", "tokenizer": tokenizer, "records": records}


def base_model(built):
    return load_for_eval(str(built["root"] / "base"), built["root"] / "scratch").model


def predictions(rows: list[dict]) -> dict[str, str]:
    return {row["id"]: row["prediction"] for row in rows}


# ----------------------------------------------------------------------------------------- prompts


def test_prompt_ids_are_the_training_ids_up_to_the_answer(built):
    """A record's prompt ids are its training ids cut where the last answer's labels start, for one turn
    and for several, and equal the exported processor's ids for the same question."""
    tokenizer = built["tokenizer"]
    record = built["records"][0]
    multi = {
        **record,
        "id": "multi",
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is in this picture?"},
            {"from": "gpt", "value": "shapes"},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "3"},
        ],
    }
    for rec in (record, multi):
        ids, labels = encode_conversation(rec["conversations"], tokenizer, 32)
        prompt = build_prompt(rec, tokenizer, 32, built["data"])
        last_answer = tokenizer.encode(rec["conversations"][-1]["value"], add_special_tokens=False)
        assert list(prompt.input_ids) + last_answer + [tokenizer.eos_token_id] == ids
        assert labels[len(prompt.input_ids) - 1] == -100 != labels[len(prompt.input_ids)]
        assert prompt.reference == rec["conversations"][-1]["value"]
    assert build_prompt(multi, tokenizer, 32, built["data"]).text == (
        "<s>USER: <image>\nWhat is in this picture? ASSISTANT: shapes</s>USER: How many? ASSISTANT: "
    )
    processor = CosProcessor(CosImageProcessor(image_size=64), tokenizer, num_visual_tokens=32)
    question = record["conversations"][0]["value"].removeprefix(f"{IMAGE_TOKEN}\n")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    processed = processor(images=[Image.new("RGB", (8, 8))], text=text)["input_ids"][0]
    assert processed == list(build_prompt(record, tokenizer, 32, built["data"]).input_ids)


def test_bad_records_are_one_error_naming_them(built, tmp_path):
    """Records that cannot be evaluated stop the eval with one DataError giving reasons and ids."""
    good = built["records"][:3]
    bad = [
        {**good[0], "id": "no-answer", "conversations": good[0]["conversations"][:1]},
        {**good[1], "id": "lost-image", "image": "images/none.png"},
        {
            **good[2],
            "id": "box",
            "task": "refcoco",
            "conversations": [  # a refexp reference without a box
                good[2]["conversations"][0],
                {"from": "gpt", "value": "on the left"},
            ],
        },
        {**good[2], "id": "box"},  # and a repeated id
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good + bad))
    with pytest.raises(DataError) as caught:
        load_eval_records(path, built["data"])
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: 4 of 7 records cannot be evaluated")
    for reason in ("bad_conversation=1", "missing_image=1", "reference_without_box=1", "duplicate_id=1"):
        assert reason in message
    assert "first: no-answer, lost-image, box, box" in message
    assert load_eval_records(path, built["data"], limit=3) == good
    assert load_eval_records(path, built["data"], skip_bad=True) == good  # an id's second use is bad too
    assert load_eval_records(path, built["data"], limit=2, skip_bad=True) == good[:2]


# -------------------------------------------------------------------------------------- generation


def greedy_without_cache(model, tokenizer, prompt, image_size: int, steps: int) -> str:
    """Greedy decoding by full forwards over the whole sequence, one record, no padding, no cache."""
    from cosctl.data.records import load_image

    ids = torch.tensor([prompt.input_ids])
    pixels = None if prompt.image is None else load_image(prompt.image, image_size)[None]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids, pixel_values=pixels).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_batched_generation_equals_one_record_at_a_time_and_a_plain_loop(built):
    """Left-padded batches of mixed prompt lengths, decoded with the KV cache, give the predictions of
    one record at a time, and those of greedy full forwards without a cache."""
    model, tokenizer, records = base_model(built), built["tokenizer"], built["records"][:12]
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    batched, scores = generate_and_score(model, tokenizer, records, built["data"], batch_size=5, **kwargs)
    single, _ = generate_and_score(model, tokenizer, records, built["data"], batch_size=1, **kwargs)
    lengths = {len(build_prompt(r, tokenizer, 32, built["data"]).input_ids) for r in records}
    assert len(lengths) > 3  # batches really are padded
    assert predictions(batched) == predictions(single)
    assert all(row["prediction"] for row in batched)
    for record in records[:3]:
        prompt = build_prompt(record, tokenizer, 32, built["data"])
        assert predictions(batched)[prompt.id] == greedy_without_cache(model, tokenizer, prompt, 64, MAX_NEW_TOKENS)
    assert [row["id"] for row in batched] == [r["id"] for r in records]
    assert set(scores.tasks) == {r["task"] for r in records}
    # Decoding settings a model's generation config may carry do not change the greedy eval.
    longer = dict(max_new_tokens=16, device="cpu", batch_size=6)
    neutral, _ = generate_and_score(model, tokenizer, records, built["data"], **longer)
    model.language_model.generation_config.update(
        do_sample=True, num_beams=3, repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=16
    )
    configured, _ = generate_and_score(model, tokenizer, records, built["data"], **longer)
    assert predictions(configured) == predictions(neutral)
    assert all(row["score"] == scores.per_record[row["id"]] for row in batched)


def test_text_only_records_are_generated_beside_image_records(built, tmp_path):
    """A LLaVA-665K-shaped eval file (runs of text-only ShareGPT records among image records) is generated
    for whole: batches mixing rows with and without an image, and batches with no image, give the
    predictions of one record at a time, and a text-only record's is greedy decoding of its text alone."""
    path = write_llava665k_set(tmp_path / "llava", built["data"], 40, seed=0, name="eval.json", shared_ids=False)
    model, tokenizer, root = base_model(built), built["tokenizer"], path.parent
    records = load_eval_records(path, root)
    text_only = [r for r in records if "image" not in r]
    assert len(records) == 40 and len(text_only) >= 4
    prompts = [build_prompt(r, tokenizer, 32, root) for r in records]
    batches = plan_batches([len(p.input_ids) for p in prompts], 4)
    kinds = {frozenset(prompts[i].image is None for i in batch) for batch in batches}
    assert kinds == {frozenset({False}), frozenset({False, True}), frozenset({True})}  # one of each kind
    kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, device="cpu")
    batched, scores = generate_and_score(model, tokenizer, records, root, batch_size=4, **kwargs)
    single, _ = generate_and_score(model, tokenizer, records, root, batch_size=1, **kwargs)
    assert predictions(batched) == predictions(single)
    assert [row["id"] for row in batched] == [r["id"] for r in records]
    assert sum(values["num"] for values in scores.tasks.values()) == 40
    for record in text_only[:4]:
        prompt = build_prompt(record, tokenizer, 32, root)
        assert prompt.image is None and image_token_id(tokenizer) not in prompt.input_ids
        assert predictions(batched)[prompt.id] == greedy_without_cache(model, tokenizer, prompt, 64, MAX_NEW_TOKENS)


def test_batches_are_the_same_whatever_the_number_of_ranks():
    """Batches hold the same records for any rank count; ranks take every N-th; under ZeRO-3 a short
    rank gets filler batches (the shortest prompt, kept=False) so that all ranks run as many."""
    lengths = [5, 9, 7, 9, 3, 8, 6]
    batches = plan_batches(lengths, 2)
    assert batches == [(1, 3), (5, 2), (6, 0), (4,)]
    for world in (1, 2, 3, 5):
        shares = [rank_batches(batches, r, world, equal_counts=False) for r in range(world)]
        assert sorted(b.indices for share in shares for b in share) == sorted(batches)
        padded = [rank_batches(batches, r, world, equal_counts=True) for r in range(world)]
        assert len({len(share) for share in padded}) == 1
        assert [b.indices for share in padded for b in share if b.keep] == [b.indices for s in shares for b in s]
        assert all(b.indices == (4,) for share in padded for b in share if not b.keep)


def test_metrics_record_flattens_task_aggregates_for_the_metrics_log():
    """Scores become the `eval/<task>/<metric>` keys `cosctl report` plots; counts stay out."""
    from cosctl.evaluate.scoring import EvalItem, score

    items = [
        EvalItem("1", "vqa", ("red",)),
        EvalItem("2", "vqa", ("blue",)),
        EvalItem("3", "refcoco", ("[0, 0, 50, 50]",)),
    ]
    scores = score(items, {"1": "red", "2": "green", "3": "[0, 0, 50, 50]"})
    assert metrics_record(scores) == {
        "eval/vqa/accuracy": 0.5,
        "eval/refcoco/acc@0.5": 1.0,
        "eval/refcoco/mean_iou": 1.0,
    }


def test_an_adapter_run_evaluates_as_its_merged_export(built):
    """A finetune run output (adapter/ + its recorded base) and its export give the same predictions,
    different from the base model's."""
    records, tokenizer = built["records"][:8], built["tokenizer"]
    out = {}
    for name in ("finetune", "export", "base"):
        loaded = load_for_eval(str(built["root"] / name), built["root"] / "scratch" / name)
        assert loaded.kind == ("adapter" if name == "finetune" else "model")
        rows, _ = generate_and_score(
            loaded.model, tokenizer, records, built["data"], max_new_tokens=MAX_NEW_TOKENS, batch_size=4, device="cpu"
        )
        out[name] = predictions(rows)
    assert out["finetune"] == out["export"] != out["base"]


def tiny_spec(data: Path, output: Path):
    from cosctl.spec.specs import load_spec

    return load_spec(
        REPO / "recipes" / "tiny" / "pretrain.yaml",
        [
            f"data.root={data}",
            f"model.tokenizer={data / 'tokenizer'}",
            f"run.output={output}",
            "eval.every_steps=null",
            "batch.tokens_per_micro_batch=1024",
        ],
    )


def zero3_engine(spec):
    """A ZeRO-3 engine around the tiny pretrain model, as the training loop builds it."""
    from cosctl.common.dist import init_distributed
    from cosctl.stages.pretrain import build_pretrain_model
    from cosctl.train.engine import build_engine

    tokenizer = load_tokenizer(spec.model.tokenizer)
    dist_info = init_distributed()
    model = build_pretrain_model(spec, len(tokenizer), image_token_id(tokenizer))
    engine, _, _ = build_engine(model, spec, dist_info, micro_batch_size=1)
    return engine, dist_info


@pytest.fixture
def restore_env():
    """`init_distributed` sets launcher variables; keep them from leaking into later subprocesses."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def vision_tower_runs(model) -> list[int]:
    """A list that grows by the number of images each forward of `model`'s vision tower sees."""
    runs: list[int] = []
    model.vision_tower.embeddings.register_forward_hook(lambda module, args, out: runs.append(out.shape[0]))
    return runs


def test_generate_and_score_on_a_zero3_engine(built, tmp_path, restore_env):
    """On a one-rank ZeRO-3 engine (partitioned weights) the in-process eval gives the plain model's
    predictions and scores, text-only batches included, and leaves the engine in training mode. The
    plain model runs its vision tower only for the batch with images; the partitioned one for every
    batch, on one blank image where a batch has none (its gathers are collective)."""
    from cosctl.stages.pretrain import build_pretrain_model

    spec = tiny_spec(built["data"], tmp_path / "out")
    tokenizer = built["tokenizer"]
    records = text_only_on_one_rank(built["records"], tokenizer, built["data"])  # 3 batches, 1 with images
    plain = build_pretrain_model(spec, len(tokenizer), image_token_id(tokenizer))
    plain_runs = vision_tower_runs(plain)
    expected, expected_scores = generate_and_score(
        plain, tokenizer, records, built["data"], max_new_tokens=MAX_NEW_TOKENS, batch_size=4, device="cpu"
    )
    assert plain_runs == [3]
    engine, dist_info = zero3_engine(spec)
    try:
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())
        engine_runs = vision_tower_runs(engine.module)
        engine.train()
        rows, scores = generate_and_score(
            engine,
            tokenizer,
            records,
            built["data"],
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=4,
            device=dist_info.device,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )
        assert engine.module.training
    finally:
        engine.destroy()
    assert engine_runs == [3, 1, 1]
    assert rows == expected and scores.tasks == expected_scores.tasks


ZERO3_SCRIPT = """
import json, sys, torch
from pathlib import Path
from cosctl.stages.pretrain import build_pretrain_model
from cosctl.evaluate.generation import generate_and_score
from tests.test_evaluate import eos_that_ends_ranks_apart, text_only_on_one_rank, tiny_spec, zero3_engine
data, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = tiny_spec(data, out / "run")
from cosctl.data.records import load_tokenizer
from cosctl.data.conversation import image_token_id
tokenizer = load_tokenizer(data / "tokenizer")
records = text_only_on_one_rank(json.loads((data / "train.json").read_text()), tokenizer, data)
plain = build_pretrain_model(spec, len(tokenizer), image_token_id(tokenizer))
eos_that_ends_ranks_apart(plain, tokenizer, records, data, batch_size=4, world_size=2, steps=8)
expected, _ = generate_and_score(plain, tokenizer, records, data, max_new_tokens=8, batch_size=4, device="cpu")
engine, info = zero3_engine(spec)
rows, scores = generate_and_score(engine, tokenizer, records, data, max_new_tokens=8, batch_size=4,
                                  device=info.device, rank=info.rank, world_size=info.world_size)
(out / f"rank{info.rank}.json").write_text(json.dumps({"rows": rows, "expected": expected}))
engine.destroy()
"""


def text_only_on_one_rank(records: list[dict], tokenizer, data: Path) -> list[dict]:
    """11 records for two ranks in batches of 4: 3 with an image and 8 text-only (records[3:11] without
    their image), so that rank 0 gets a batch mixing both and a text-only one, and rank 1 only
    text-only batches (its own and the filler), while rank 0's first batch runs the vision tower."""
    text_only = [
        {"id": f"text-{r['id']}", "conversations": [
            {"from": "human", "value": r["conversations"][0]["value"].replace(f"{IMAGE_TOKEN}\n", "")},
            r["conversations"][1],
        ]}
        for r in records[3:11]
    ]  # fmt: skip
    chosen = records[:3] + text_only
    prompts = [build_prompt(r, tokenizer, 32, data) for r in chosen]
    batches = plan_batches([len(p.input_ids) for p in prompts], 4)
    has_image = [[prompts[i].image is not None for i in batch] for batch in batches]
    shares = [rank_batches(batches, rank, 2, equal_counts=True) for rank in range(2)]
    assert has_image[0].count(True) == 3 and not any(has_image[1] + has_image[2]), has_image
    assert all(prompts[i].image is None for batch in shares[1] for i in batch.indices)
    assert len(shares[1]) == 2 and not shares[1][1].keep
    return chosen


def eos_that_ends_ranks_apart(model, tokenizer, records, data, *, batch_size: int, world_size: int, steps: int):
    """Make the tokenizer's eos a token the model emits, chosen so that in some round of batches the
    ranks' decoding ends after different numbers of steps (the case ZeRO-3 must keep in step)."""
    from cosctl.data.images import ImageSource
    from cosctl.evaluate.generation import batch_pixels, collate_prompts

    prompts = [build_prompt(r, tokenizer, 32, data) for r in records]
    batches = plan_batches([len(p.input_ids) for p in prompts], batch_size)
    rows = {}
    for batch in batches:
        chosen = [prompts[i] for i in batch]
        pixels = batch_pixels(ImageSource(data), [records[i] for i in batch], 64)
        inputs = collate_prompts(chosen, tokenizer.pad_token_id, pixels)
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        rows.update(zip(batch, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True))
    shares = [rank_batches(batches, r, world_size, equal_counts=True) for r in range(world_size)]

    def ends(token: int, indices) -> int:
        return max(rows[i].index(token) + 1 if token in rows[i] else steps for i in indices)

    for token in sorted({t for row in rows.values() for t in row}):
        rounds = [{ends(token, share[k].indices) for share in shares} for k in range(len(shares[0]))]
        if any(len(r) > 1 for r in rounds):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(token)
            return token
    raise AssertionError("no token ends the ranks' decoding at different steps")


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_two_ranks_with_uneven_work_match_the_plain_model(built, tmp_path):
    """Two ZeRO-3 ranks, one with more batches than the other (11 records in batches of 4: 2 against 1),
    rows ending at different steps (eos chosen so), and one rank given only text-only batches while the
    other's first batch mixes images and text-only rows, finish without hanging and agree with the
    plain model on one rank. Without the filler batch, the synced decoding or the vision tower run on
    a blank image by the rank without images, the ranks' gathers mismatch and gloo aborts."""
    run_script_on_two_ranks(ZERO3_SCRIPT, tmp_path, str(built["data"]), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["rows"] == ranks[1]["rows"] == ranks[0]["expected"]
    assert len(ranks[0]["rows"]) == 11


# ------------------------------------------------------------------------------------------ command


def eval_file(built, path: Path, count: int = 12) -> Path:
    """The first `count` records, one of them relabelled with a task no metric knows."""
    records = [dict(r) for r in built["records"][:count]]
    records[1]["task"] = "mystery"
    path.write_text(json.dumps(records))
    return path


def test_eval_command_writes_predictions_metrics_and_the_table(built, tmp_path):
    """`cosctl eval` on a run output: predictions.jsonl (a row per record), metrics.json (tasks,
    baseline, counts, fallback, model, timings) and a table naming the fallback task."""
    data = eval_file(built, tmp_path / "eval.json")
    train = built["data"] / "train.json"
    result = ok(
        cosctl(
            "eval",
            str(built["root"] / "base"),
            "--data",
            str(data),
            "--images",
            str(built["data"]),
            "--out",
            str(tmp_path / "out"),
            "--max-new-tokens",
            str(MAX_NEW_TOKENS),
            "--batch-size",
            "4",
            "--limit",
            "10",
            "--baseline-from",
            str(train),
            tmp=tmp_path,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    records = json.loads(data.read_text())[:10]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert {"id", "task", "prompt", "prediction", "reference", "score"} <= rows[0].keys()
    assert rows[1]["task"] == "mystery" and set(rows[1]["score"]) == {"exact_match"}
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["model"] == str(built["root"] / "base") and metrics["kind"] == "model"
    assert metrics["num_records"] == 10 and sum(metrics["counts"].values()) == 10
    assert metrics["fallback_tasks"] == ["mystery"]
    assert metrics["tasks"].keys() == metrics["baseline"]["tasks"].keys() == metrics["counts"].keys()
    assert metrics["baseline"]["source"] == str(train)
    assert metrics["generation"] == {
        "greedy": True,
        "max_new_tokens": MAX_NEW_TOKENS,
        "batch_size": 4,
        "world_size": 1,
        "device": "cpu",
        "dtype": "float32",
    }
    assert metrics["wall_clock_s"]["total"] >= metrics["wall_clock_s"]["generate"] > 0
    assert "image-free baseline" in result.stdout
    assert "exact-match fallback (unknown task): mystery" in result.stdout
    for task in metrics["tasks"]:
        assert task in result.stdout


@pytest.mark.slow
@pytest.mark.multiproc
def test_eval_on_two_ranks_equals_eval_on_one(built, tmp_path):
    """`--nproc 2` writes the same predictions.jsonl as one rank, byte for byte (13 records: uneven)."""
    data = eval_file(built, tmp_path / "eval.json", count=13)
    for nproc in (1, 2):
        ok(
            cosctl(
                "eval",
                str(built["root"] / "finetune"),
                "--data",
                str(data),
                "--images",
                str(built["data"]),
                "--out",
                str(tmp_path / f"n{nproc}"),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--batch-size",
                "3",
                "--nproc",
                str(nproc),
                tmp=tmp_path,
            )
        )
    one, two = ((tmp_path / f"n{n}" / "predictions.jsonl").read_text() for n in (1, 2))
    assert one == two and len(one.splitlines()) == 13
    metrics = [json.loads((tmp_path / f"n{n}" / "metrics.json").read_text()) for n in (1, 2)]
    assert metrics[0]["tasks"] == metrics[1]["tasks"] and metrics[1]["generation"]["world_size"] == 2


BAD_DATA = {
    "missing": None,
    "not_json": "[{",
    "not_a_list": '{"id": 1}',
    "no_answer": json.dumps([{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>"}]}]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_is_one_error_line(built, tmp_path, case):
    """A missing, malformed or unusable --data file: exit 1, one line naming the file, no traceback."""
    path = tmp_path / "eval.json"
    if BAD_DATA[case] is not None:
        path.write_text(BAD_DATA[case])
    result = runner.invoke(app, ["eval", str(built["root"] / "base"), "--data", str(path)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.output


@pytest.mark.slow
def test_bad_data_before_relaunching_ranks_is_one_line(built, tmp_path):
    """With --nproc 2 the data is checked before torchrun starts: one line on stderr, no launcher trace."""
    path = tmp_path / "eval.json"
    path.write_text("[{")
    result = cosctl("eval", str(built["root"] / "base"), "--data", str(path), "--nproc", "2", tmp=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_source_without_a_model_is_one_error_line(built, tmp_path):
    """A MODEL that holds no model (an empty folder) is refused in one line naming it."""
    data = eval_file(built, tmp_path / "eval.json", count=2)
    result = runner.invoke(app, ["eval", str(tmp_path / "empty"), "--data", str(data), "--images", str(built["data"])])
    assert result.exit_code == 1
    assert result.output.strip().startswith(f"error: {tmp_path / 'empty'}") and "Traceback" not in result.output


@pytest.mark.s3
@pytest.mark.slow
def test_eval_reads_runs_from_a_bucket(built, tmp_path, moto_server, s3_env, monkeypatch):
    """A base run and a finetune run published to a bucket (the adapter naming its base by s3:// URI)
    evaluate from there: `cosctl eval s3://...` gives the local run's predictions."""
    from tests.conftest_s3 import create_bucket
    from tests.test_checkpoint_s3 import s3_env as subprocess_env

    bucket = create_bucket(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)  # as a user points cosctl at an S3-compatible store
    store = lambda name: open_store(f"s3://{bucket}/{name}")
    tokenizer = built["tokenizer"]
    publish(store("base"), built["root"] / "staging" / "base", "model")
    adapter = tmp_path / "adapter"
    peft_model = load_for_eval(str(built["root"] / "base"), tmp_path / "scratch").model
    peft_model = apply_lora(peft_model, LoraSpec(r=4, alpha=8, dropout=0.0), ["projector"], seed=0)
    save_adapter(
        peft_model,
        {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "modules_to" in k},
        tokenizer,
        f"s3://{bucket}/base",
        adapter,
    )
    publish(store("finetune"), adapter, "adapter")
    data = eval_file(built, tmp_path / "eval.json", count=6)
    extra = subprocess_env(moto_server, s3_env)
    for source in (f"s3://{bucket}/base", f"s3://{bucket}/finetune"):
        ok(
            cosctl(
                "eval",
                source,
                "--data",
                str(data),
                "--images",
                str(built["data"]),
                "--out",
                str(tmp_path / "s3"),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                tmp=tmp_path,
                env_extra=extra,
            )
        )
        assert json.loads((tmp_path / "s3" / "metrics.json").read_text())["model"] == source
    local = load_for_eval(str(built["root"] / "base"), tmp_path / "scratch2")
    rows, _ = generate_and_score(
        local.model,
        tokenizer,
        json.loads(data.read_text()),
        built["data"],
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=8,
        device="cpu",
    )
    evaluated = [json.loads(line) for line in (tmp_path / "s3" / "predictions.jsonl").read_text().splitlines()]
    assert predictions(evaluated) == predictions(rows)  # fresh LoRA B is zero: the finetune equals its base


# --------------------------------------------------------------- LLaVA-665K-shaped files, s3:// images


def llava665k(built, tmp_path: Path, num_records: int = 160) -> Path:
    """A training file shaped like llava_v1_5_mix665k.json (no `task` field) from the synthetic set."""
    return write_llava665k_set(tmp_path / "llava", built["data"], num_records, seed=0)


def eval_command(built, data: Path, out: Path, *extra: str, images: str | None = None):
    """`cosctl eval` of the base run in this process (CliRunner), 4 new tokens per record."""
    args = ["eval", str(built["root"] / "base"), "--data", str(data), "--images", images or str(built["data"])]
    return runner.invoke(app, [*args, "--out", str(out), "--max-new-tokens", "4", *extra])


def test_baseline_from_a_training_file_without_tasks_counts_its_answers(built, tmp_path):
    """`--baseline-from` a LLaVA-665K-shaped training file (no `task`): its answers are typed by LLaVA's
    instructions as eval types records, so the VQA baseline is a real one, not all zero; a task the file
    has no answers for (ocr: OCR-VQA is asked as VQA) is named under the table and in metrics.json; a
    file with answers for none of the eval tasks is refused in one line, before the model is loaded."""
    train = llava665k(built, tmp_path)
    records = [r for r in built["records"] if r["task"] in ("vqa", "refexp", "ocr")][:12]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    result = eval_command(built, data, tmp_path / "out", "--baseline-from", str(train))
    assert result.exit_code == 0, result.output
    baseline = json.loads((tmp_path / "out" / "metrics.json").read_text())["baseline"]
    assert baseline["tasks"]["vqa"]["accuracy"] > 0 and "refexp" in baseline["tasks"]  # typed, with answers
    assert baseline["tasks_without_answers"] == ["ocr"]
    assert f"image-free baseline: {train} has no answers for ocr" in " ".join(result.output.split())
    data.write_text(json.dumps([r for r in built["records"] if r["task"] == "ocr"]))
    refused = eval_command(built, data, tmp_path / "refused", "--baseline-from", str(train))
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 1 and len(lines) == 1, refused.output
    assert lines[0].startswith(f"error: {train}: no answers for the task(s) ocr of {data}")
    assert not (tmp_path / "refused").exists()


def test_eval_scores_every_record_of_a_llava665k_held_out_file(built, tmp_path):
    """`cosctl eval` on a LLaVA-665K-shaped held-out file scores every record, its runs of text-only
    ShareGPT records included (task `unknown` unless inferred: exact match); the held-out generation's
    pick (`skip_bad`, `limit`) keeps text-only records too, also from a file that holds nothing else."""
    path = write_llava665k_set(tmp_path / "llava", built["data"], 40, seed=0, name="eval.json", shared_ids=False)
    records = json.loads(path.read_text())
    text_only = [r["id"] for r in records if "image" not in r]
    assert len(text_only) >= 4
    result = eval_command(built, path, tmp_path / "out", images=str(path.parent))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_records"] == sum(metrics["counts"].values()) == len(records)
    by_id = {row["id"]: row for row in rows}
    for key in text_only:
        assert by_id[key]["task"] == "unknown" and set(by_id[key]["score"]) == {"exact_match"}
        assert "<image>" not in by_id[key]["prompt"]
    assert load_eval_records(path, path.parent, limit=12, skip_bad=True) == records[:12]
    path.write_text(json.dumps([r for r in records if "image" not in r]))
    assert [r["id"] for r in load_eval_records(path, path.parent, limit=4, skip_bad=True)] == text_only[:4]


@pytest.mark.s3
def test_eval_reads_images_from_a_bucket(built, tmp_path, moto_server, s3_env, monkeypatch):
    """`cosctl eval --images s3://BUCKET/PREFIX` reads (and checks) the images through the object store
    and predicts what the same images on disk give; a missing image there is one error line naming it."""
    from tests.conftest_s3 import create_bucket

    bucket = create_bucket(moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)  # as a user points cosctl at an S3-compatible store
    monkeypatch.setenv("COSCTL_CACHE", str(tmp_path / "cache"))
    client = moto_server.client()
    for image in sorted((built["data"] / "images").iterdir()):
        client.upload_file(str(image), bucket, f"data/images/{image.name}")
    data = eval_file(built, tmp_path / "eval.json", count=6)
    remote = eval_command(built, data, tmp_path / "s3", images=f"s3://{bucket}/data")
    local = eval_command(built, data, tmp_path / "disk")
    assert remote.exit_code == local.exit_code == 0, remote.output
    rows = {name: (tmp_path / name / "predictions.jsonl").read_text() for name in ("s3", "disk")}
    assert rows["s3"] == rows["disk"] and len(rows["s3"].splitlines()) == 6
    assert json.loads((tmp_path / "s3" / "metrics.json").read_text())["images"] == f"s3://{bucket}/data"
    client.delete_object(Bucket=bucket, Key=f"data/{json.loads(data.read_text())[0]['image']}")
    monkeypatch.setenv("COSCTL_CACHE", str(tmp_path / "cache2"))
    missing = eval_command(built, data, tmp_path / "missing", images=f"s3://{bucket}/data")
    assert missing.exit_code == 1 and "missing_image=1" in missing.output, missing.output
