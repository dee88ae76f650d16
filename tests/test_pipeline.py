"""The three stages end to end on CPU: 2-rank ZeRO-3 pretrain -> inflate -> 2-rank LoRA finetune -> export.

One module-scoped fixture runs the pipeline once through the real CLI (torchrun, gloo); each test
checks one behaviour of its outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from cos_model import CosConfig, CosForConditionalGeneration
from tests.harness import assert_plan_equals_run, cosctl, ok

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

FAST = [
    "optim.num_steps=6",
    "checkpoint.every_steps=3",
    "checkpoint.keep_last=5",
    "eval.every_steps=3",
    "eval.num_batches=1",
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    ok(cosctl("data", "synth", "--out", str(root / "data"), "--num-samples", "96", "--image-size", "64"))
    out = {s: root / "runs" / s for s in ("pretrain", "inflate", "finetune")}
    pre = ok(
        cosctl(
            "pretrain",
            "recipes/tiny/pretrain.yaml",
            "--nproc",
            "2",
            "--run-dir",
            str(root / "work/pre"),
            "--output",
            str(out["pretrain"]),
            *sum(
                (
                    ["--set", s]
                    for s in FAST
                    + [
                        f"data.root={root / 'data'}",
                        f"model.tokenizer={root / 'data/tokenizer'}",
                        "batch.tokens_per_micro_batch=1024",
                    ]
                ),
                [],
            ),
            tmp=root,
        )
    )
    inf = ok(
        cosctl(
            "inflate",
            "recipes/tiny/inflate.yaml",
            "--set",
            f"source={out['pretrain']}",
            "--run-dir",
            str(root / "work/inf"),
            "--output",
            str(out["inflate"]),
        )
    )
    fin = ok(
        cosctl(
            "finetune",
            "recipes/tiny/finetune.yaml",
            "--nproc",
            "2",
            "--run-dir",
            str(root / "work/fin"),
            "--output",
            str(out["finetune"]),
            *sum(
                (
                    ["--set", s]
                    for s in FAST
                    + [
                        f"data.root={root / 'data'}",
                        f"model.source={out['inflate']}",
                        "batch.tokens_per_micro_batch=2048",
                    ]
                ),
                [],
            ),
            tmp=root,
        )
    )
    return {"root": root, "out": out, "pretrain": pre, "inflate": inf, "finetune": fin}


def probe_inputs(config: CosConfig, num_images: int = 2) -> dict[str, torch.Tensor]:
    """Prompts of ordinary tokens around one image each (ids chosen to avoid special tokens)."""
    generator = torch.Generator().manual_seed(0)
    low = config.image_token_id + 1
    rows = []
    for _ in range(num_images):
        text = torch.randint(low, config.text_config.vocab_size, (6,), generator=generator).tolist()
        rows.append(text[:2] + [config.image_token_id] * config.num_visual_tokens + text[2:])
    pixels = torch.randn(num_images, 3, config.image_size, config.image_size, generator=generator)
    return {"input_ids": torch.tensor(rows), "pixel_values": pixels}


def summary(pipeline, stage: str) -> dict:
    work = {"pretrain": "pre", "inflate": "inf", "finetune": "fin"}[stage]
    return json.loads((pipeline["root"] / "work" / work / "summary.json").read_text())


def test_pretrain_runs_two_ranks_and_learns(pipeline):
    """Pretrain on 2 gloo ranks: 6 steps of 32-token batches, finite falling loss, metrics per step,
    eval losses with own and swapped images."""
    result = summary(pipeline, "pretrain")
    assert result["world_size"] == 2 and result["steps"] == 6 and result["visual_tokens"] == 32
    records = [json.loads(line) for line in (pipeline["root"] / "work/pre/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm", "tflops"):
        assert all(r[key] is not None for r in steps), key
    assert result["final_loss"] < result["first_loss"]
    # the held-out loss with swapped images runs collectively on both ranks, beside the own-image one
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 3, 6]
    assert all(r["eval_loss_swapped_images"] > 0 and r["eval_loss"] > 0 for r in evals.values())
    assert result["final_eval_loss_swapped_images"] == evals[6]["eval_loss_swapped_images"]


def test_trainable_set_printed_equals_the_spec(pipeline):
    """The printed trainable set is exactly the spec's modules (pretrain) / LoRA + bridge (finetune)."""
    assert "trainable parameters: language_model" in pipeline["pretrain"].stdout
    assert set(summary(pipeline, "pretrain")["trainable_params"]) == {"resampler", "projector", "language_model"}
    assert set(summary(pipeline, "finetune")["trainable_params"]) == {"lora", "resampler", "projector"}


def test_checkpoints_are_committed_with_manifests(pipeline):
    """Each save commits a manifest listing every rank's ZeRO shard; `latest` names the newest."""
    ckpts = pipeline["out"]["pretrain"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    manifest = json.loads((ckpts / "step_00000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 2
    shards = [f for f in manifest["files"] if "optim_states" in f]
    assert len(shards) == 2 and {"rank_00000.json", "rank_00001.json", "spec.json"} <= set(manifest["files"])


def test_inflated_model_reports_528_tokens_in_plan(pipeline):
    """`cosctl plan` on a finetune spec pointing at the inflated model reports 528 tokens at 128 px."""
    result = ok(
        cosctl(
            "plan",
            "recipes/tiny/finetune.yaml",
            "--json",
            "--set",
            f"model.source={pipeline['out']['inflate']}",
            "--set",
            f"run.output={pipeline['root'] / 'nowhere'}",
        )
    )
    plan = json.loads(result.stdout)
    assert plan["visual_tokens"] == 528 and plan["image_size"] == 128
    assert [s["windows"] for s in plan["scales"]] == [1, 16, 256]
    assert "auto" not in json.dumps(plan["deepspeed"])


def test_finetune_runs_528_tokens_with_lora(pipeline):
    """Finetune on 2 ranks at 528 tokens publishes a peft adapter with non-zero LoRA B matrices."""
    result = summary(pipeline, "finetune")
    assert result["world_size"] == 2 and result["visual_tokens"] == 528
    adapter = pipeline["out"]["finetune"] / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "manifest.json").exists()
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in weights.values())
    assert any(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init
    assert any("resampler" in k for k in weights) and any("projector" in k for k in weights)


def test_mid_run_adapter_reloads_to_the_checkpointed_weights(pipeline):
    """The adapter gathered at the step-3 save, reloaded with PeftModel.from_pretrained, gives the same
    logits as the trainable weights in that checkpoint's ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel

    ckpt = pipeline["out"]["finetune"] / "checkpoints" / "step_00000003"
    base_dir = pipeline["out"]["inflate"] / "model"
    config = CosConfig.from_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(
        CosForConditionalGeneration.from_pretrained(base_dir), ckpt / "trainable"
    ).eval()
    from_shards = PeftModel.from_pretrained(
        CosForConditionalGeneration.from_pretrained(base_dir), ckpt / "trainable"
    ).eval()
    shards = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="zero")
    missing, unexpected = from_shards.load_state_dict(shards, strict=False)
    assert not unexpected and len(shards) > 0
    inputs = probe_inputs(config)
    with torch.no_grad():
        a, b = reloaded(**inputs).logits, from_shards(**inputs).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_export_merges_and_generates(pipeline, tmp_path):
    """`cosctl export` writes one HF folder that from_pretrained loads and that generates tokens."""
    out = tmp_path / "merged"
    ok(cosctl("export", str(pipeline["out"]["finetune"]), "--out", str(out)))
    model = CosForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.num_visual_tokens == 528
    inputs = probe_inputs(model.config)
    prompt_length = inputs["input_ids"].shape[1]
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tokens.shape[0] == 2 and prompt_length + 1 <= tokens.shape[1] <= prompt_length + 3
    assert torch.equal(tokens[:, :prompt_length], inputs["input_ids"])


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_the_plan_of_each_tiny_recipe_equals_what_its_run_resolved(pipeline, stage, tmp_path):
    """`cosctl plan --world-size 2` of the spec each 2-rank tiny stage ran prints the numbers the run
    resolved at start (batch geometry, DeepSpeed config, FLOPs), not numbers of its own."""
    work = {"pretrain": "work/pre", "finetune": "work/fin"}[stage]
    plan = assert_plan_equals_run(pipeline["root"] / work, pipeline["out"][stage], 2, tmp_path)
    assert plan["samples_per_step"] == plan["resolved"]["samples_per_step"]
    assert plan["assumed_text_tokens"] is None  # measured on the prepared split, as the run did


def test_the_plan_of_the_tiny_inflate_recipe_is_what_inflate_made(pipeline):
    """`cosctl plan` of the inflate recipe names the visual tokens, resolution and scales inflate made."""
    source = pipeline["out"]["pretrain"]
    plan = json.loads(ok(cosctl("plan", "recipes/tiny/inflate.yaml", "--json", "--set", f"source={source}")).stdout)
    made = CosConfig.from_pretrained(pipeline["out"]["inflate"] / "model")
    assert (plan["visual_tokens"], plan["image_size"]) == (made.num_visual_tokens, made.image_size) == (528, 128)
    assert [(s["window"], s["queries_per_window"]) for s in plan["scales"]] == [
        (s.window, s.queries_per_window) for s in made.scales
    ]
