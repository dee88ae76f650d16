"""`cosctl plan`: model and hardware FLOPs, the communication model of `cosctl.plan.comm` (ZeRO-3's re-gathers
included), and the ZeRO advice for the tiny and the paper-scale recipes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cos_model import CosConfig, CosForConditionalGeneration
from cosctl.cli.app import app
from cosctl.plan.comm import ParamCounts, link_gbps, memory_gib, param_counts, step_volume
from cosctl.plan.summary import build_plan, format_plan
from cosctl.spec.specs import load_spec
from tests.harness import REPO

TINY = REPO / "recipes/tiny/pretrain.yaml"
FROZEN_LLM = "model.trainable=[resampler, projector]"
runner = CliRunner()


def _plan(tmp_path, *overrides: str, **kwargs) -> dict:
    return build_plan(load_spec(TINY, [f"run.output={tmp_path}", *overrides]), **kwargs)


# ---------------------------------------------------------------------------------------------------
# cosctl.plan.comm


def test_step_volumes_follow_what_deepspeed_moves():
    """ZeRO-3: every partitioned parameter per micro-batch + the persistent ones once, gradients
    reduce-scattered per micro-batch; ZeRO-2: gradients all-reduced per micro-batch, the trainable
    parameters all-gathered once."""
    counts = ParamCounts(total=1000, persistent=100, trainable=50)
    zero3 = step_volume(3, counts, micro_batches=4, bytes_per_param=2)
    assert (zero3.all_gather, zero3.reduce_scatter, zero3.all_reduce) == ((4 * 900 + 100) * 2, 4 * 50 * 2, 0)
    zero2 = step_volume(2, counts, micro_batches=4, bytes_per_param=2)
    assert (zero2.all_gather, zero2.reduce_scatter, zero2.all_reduce) == (50 * 2, 0, 4 * 50 * 2)
    # A ring rank sends (W-1)/W of an all-gather or reduce-scatter and twice that of an all-reduce.
    assert zero3.per_rank(4) == pytest.approx(0.75 * (7400 + 400))
    assert zero2.per_rank(4) == pytest.approx(0.75 * 100 + 1.5 * 400)
    assert zero3.per_rank(1) == 0 and zero2.seconds(1, 100) == 0
    assert zero3.seconds(4, 8.0) == pytest.approx(zero3.per_rank(4) * 8 / 8e9)
    with pytest.raises(ValueError, match="ZeRO stage 1"):
        step_volume(1, counts, 1, 2)


def test_param_counts_and_memory():
    """Persistent parameters are those at most the threshold; ZeRO-2 keeps whole weights, ZeRO-3 shards."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.LayerNorm(10))
    model[1].requires_grad_(False)
    counts = param_counts(model.parameters(), persistence_threshold=10, extra_trainable=5)
    assert counts == ParamCounts(total=130 + 5, persistent=30, trainable=110 + 5)
    assert memory_gib(3, counts, 5, 2)["weights"] == pytest.approx(135 * 2 / 5 / 2**30)
    assert memory_gib(2, counts, 5, 2)["weights"] == pytest.approx(135 * 2 / 2**30)
    assert memory_gib(2, counts, 5, 2)["optimizer"] == pytest.approx(115 * 14 / 5 / 2**30)


def test_one_node_talks_over_its_own_links():
    """A world that fits on one node runs at the intra-node bandwidth, a larger one at the per-rank network."""
    assert link_gbps(8, 8, inter_node_gbps=100, intra_node_gbps=2400) == 2400
    assert link_gbps(16, 8, inter_node_gbps=100, intra_node_gbps=2400) == 100


# ---------------------------------------------------------------------------------------------------
# FLOPs in the plan


def test_plan_counts_model_and_hardware_flops(tmp_path):
    """The plan's FLOPs follow the spec's trainable set (a frozen LLM at 4·N) and its gradient
    checkpointing (hardware FLOPs only); the text says which figure MFU and HFU count."""
    plan = _plan(tmp_path, FROZEN_LLM, "model.gradient_checkpointing=true")
    assert plan["flop_passes"] == {"vision_tower": 1, "resampler": 3, "projector": 3, "language_model": 2}
    assert plan["hardware_flops_per_sample"] > plan["flops_per_sample"]
    assert plan["flops_by_part"]["recompute"] == pytest.approx(
        plan["hardware_flops_per_sample"] - plan["flops_per_sample"]
    )
    trained = _plan(tmp_path)
    assert trained["flop_passes"]["language_model"] == 3 and trained["flops_per_sample"] > plan["flops_per_sample"]
    assert trained["hardware_flops_per_sample"] == trained["flops_per_sample"]
    text = format_plan(plan)
    assert "what MFU counts (LLM 4·N (frozen, back-propagated)" in text
    assert "what HFU counts (+ the LLM forward recomputed by gradient checkpointing" in text


def test_plan_implied_hfu_and_peak_option(tmp_path, monkeypatch):
    """--peak-tflops gives a step time; the assumed MFU implies an HFU scaled by hardware/model FLOPs."""
    monkeypatch.delenv("COSCTL_PEAK_TFLOPS", raising=False)
    plan = _plan(tmp_path, "model.gradient_checkpointing=true", peak=2.0)
    assert plan["peak_tflops"] == 2.0 and plan["predicted_step_s"] is not None
    assert plan["implied_hfu"] == pytest.approx(
        plan["assumed_mfu"] * plan["hardware_flops_per_sample"] / plan["flops_per_sample"]
    )
    assert "HFU of 2 TFLOP/s per rank" in format_plan(plan)


# ---------------------------------------------------------------------------------------------------
# Communication and the ZeRO advice


def test_plan_communication_matches_the_model(tmp_path):
    """The plan's ZeRO-3 volume is the parameters of its meta model, partitioned and persistent, per
    micro-batch; at 64 ranks the link is the inter-node one."""
    plan = _plan(tmp_path, FROZEN_LLM, world_size=64, bandwidth_gbps=50.0)
    comm = plan["communication"]
    counts = ParamCounts(**comm["params"])
    assert counts.total == plan["total_params"] and counts.trainable == plan["trainable_params"]
    micro = comm["micro_batches_per_step"]
    assert comm["stages"]["zero3"]["all_gather"] == (micro * (counts.total - counts.persistent) + counts.persistent) * 4
    assert comm["stages"]["zero2"]["all_reduce"] == micro * counts.trainable * 4
    assert (comm["link"], comm["gbps"], comm["nodes"]) == ("inter-node", 50.0, 8)
    assert comm["predicted_comm_s"] == pytest.approx(comm["stages"]["zero3"]["per_rank"] * 8 / 50e9)


def test_plan_recommends_zero2_for_a_frozen_llm_and_zero3_when_it_does_not_fit(tmp_path):
    """A frozen LLM costs ZeRO-3 a gather per micro-batch and ZeRO-2 nothing: ZeRO-2 is advised, with the
    numbers, and the spec is left alone; when ZeRO-2's whole weights would not fit, ZeRO-3 is advised."""
    plan = _plan(tmp_path, FROZEN_LLM, world_size=16)
    comm = plan["communication"]
    assert comm["current"] == "zero3" and comm["recommended"] == "zero2"
    assert comm["stages"]["zero2"]["per_rank"] < comm["stages"]["zero3"]["per_rank"]
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 3
    text = format_plan(plan)
    assert "recommend      ZeRO-2: set deepspeed.template: zero2 (the spec says zero3)" in text
    small = _plan(tmp_path, FROZEN_LLM, world_size=16, gpu_memory_gib=0.01)["communication"]
    assert small["recommended"] == "zero3" and "would take more than half" in small["reason"]
    kept = _plan(tmp_path, FROZEN_LLM, "deepspeed.template=zero2", world_size=16)
    assert "recommend      ZeRO-2: keep it" in format_plan(kept)


def test_plan_with_a_trained_llm_keeps_zero3_across_nodes(tmp_path):
    """When everything trains, ZeRO-2's gradient all-reduce moves more than ZeRO-3's reduce-scatter."""
    comm = _plan(tmp_path, world_size=16)["communication"]
    assert comm["recommended"] == "zero3"
    assert comm["stages"]["zero3"]["per_rank"] < comm["stages"]["zero2"]["per_rank"]


def test_plan_command_prints_communication_and_both_flop_figures(tmp_path):
    """`cosctl plan --world-size 64` prints the FLOP figures, the communication, the bound and the advice."""
    result = runner.invoke(
        app,
        [
            "plan",
            str(TINY),
            "--set",
            f"run.output={tmp_path}",
            "--set",
            FROZEN_LLM,
            "--world-size",
            "64",
            "--bandwidth-gbps",
            "200",
            "--peak-tflops",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    for words in (
        "what MFU counts",
        "what HFU counts",
        "communication  per step per rank at 64 ranks on 8 nodes",
        "inter-node link 200 Gb/s",
        "ZeRO-3 (the spec's)",
        "bound        ",
        "recommend      ZeRO-2",
    ):
        assert words in result.output, words
    data = json.loads(runner.invoke(app, ["plan", str(TINY), "--json", "--set", f"run.output={tmp_path}"]).output)
    assert data["communication"]["world_size"] == 1 and data["communication"]["stages"]["zero3"]["per_rank"] == 0


# ---------------------------------------------------------------------------------------------------
# The paper-scale recipes: ZeRO-3's re-gathers and the advice


def _paper_folders(root, width: int, layers: int, intermediate: int) -> dict[str, str]:
    """config.json-only folders as users have them (CLIP ViT-L/14 and a Vicuna geometry, written by
    transformers' own classes) and an inflated 528-token model folder made from them: the
    `--set` overrides that point a vicuna recipe at them."""
    from transformers import CLIPConfig, LlamaConfig

    from cos_model import inflate_config
    from cosctl.stages.pretrain import pretrain_config

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    CLIPConfig(vision_config={**vision, "patch_size": 14, "image_size": 224}).save_pretrained(root / "clip")
    heads = width // 128
    LlamaConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=4096,
    ).save_pretrained(root / "llm")
    sets = {"model.vision.path": root / "clip", "model.text.path": root / "llm", "model.tokenizer": root / "llm"}
    pretrain = [f"{key}={value}" for key, value in sets.items()]
    spec = load_spec(REPO / "recipes/vicuna7b/pretrain.yaml", [*pretrain, f"run.output={root}/out"])
    inflate_config(pretrain_config(spec, 32001, 32000), "32to528").save_pretrained(root / "inflated")
    return {"pretrain": pretrain, "finetune": [f"model.source={root / 'inflated'}"]}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "width", "layers", "intermediate"), [("7b", 4096, 32, 11008), ("13b", 5120, 40, 13824)]
)
def test_paper_scale_plans_count_zero3_regathers_and_advise_zero2(tmp_path, size, width, layers, intermediate):
    """At 8 x 8 ranks, the vicuna recipes' ZeRO-3 all-gather is what the replayed coordinator gathers:
    most LLM blocks again in the backward (at least 40% of the bytes), ~1.8-1.9x every parameter once per
    micro-batch; ZeRO-2 moves under 5% of it and its whole weights fit: ZeRO-2 is advised."""
    sets = _paper_folders(tmp_path, width, layers, intermediate)
    for stage in ("pretrain", "finetune"):
        spec = load_spec(REPO / f"recipes/vicuna{size}/{stage}.yaml", [*sets[stage], f"run.output={tmp_path}/o"])
        plan = build_plan(spec, world_size=64, device_type="cuda", peak=989.4)
        comm = plan["communication"]
        zero3, zero2 = comm["stages"]["zero3"], comm["stages"]["zero2"]
        counts = ParamCounts(**comm["params"])
        floor = counts.total * 2  # every parameter once (one micro-batch, bf16)
        assert comm["micro_batches_per_step"] == 1 and comm["nodes"] == 8
        assert zero3["backward_all_gather"] > 0.4 * zero3["all_gather"]
        assert 1.7 < zero3["all_gather"] / floor < 2.0
        assert zero2["per_rank"] < 0.05 * zero3["per_rank"]
        assert comm["recommended"] == "zero2" and comm["current"] == "zero3"
        assert "of it again for the backward" in format_plan(plan)


def test_a_finetune_plan_counts_its_lora_adapters_once(tmp_path):
    """The fine-tuning plan's meta model carries its LoRA adapters: trainable parameters are the adapters
    plus the bridge, once each (the communication's gradients too)."""
    sets = _paper_folders(tmp_path, 4096, 32, 11008)
    spec = load_spec(REPO / "recipes/vicuna7b/finetune.yaml", [*sets["finetune"], f"run.output={tmp_path}/o"])
    plan = build_plan(spec, world_size=64, device_type="cuda")
    with torch.device("meta"):
        model = CosForConditionalGeneration(CosConfig.from_pretrained(tmp_path / "inflated"))
    bridge = sum(p.numel() for m in (model.resampler, model.projector) for p in m.parameters())
    per_layer = 16 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # r 16 on 7 projections
    assert plan["lora_params"] == 32 * per_layer
    assert plan["trainable_params"] == plan["lora_params"] + bridge
    assert plan["communication"]["params"]["trainable"] == plan["trainable_params"]
