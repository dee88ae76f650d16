"""ZeRO-3's gathers replayed on the model's module trace (`cosctl.plan.gathers`), the volume `cosctl.plan.comm`
builds on them, and both against the bytes the real DeepSpeed engine moves (2 CPU ranks), below and above
the live/reuse thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cos_model import CosConfig, CosForConditionalGeneration
from cosctl.plan.comm import ParamCounts, param_counts, step_volume
from cosctl.plan.gathers import Zero3Settings, zero3_gathers
from cosctl.plan.trace import call_tree, micro_batch_events
from cosctl.stages.base import set_trainable
from tests.harness import REPO
from tests.tiny import tiny_config, tiny_model

BELOW = Zero3Settings(prefetch_bucket=100_000, max_live=10**9, max_reuse=10**9, persistence_threshold=320)
# No prefetch, and nothing kept for a later use: every module's parameters are released after each use.
RELEASE_ALL = Zero3Settings(prefetch_bucket=0, max_live=10**9, max_reuse=0, persistence_threshold=320)
TRAINED, FROZEN = ["resampler", "projector", "language_model"], ["resampler", "projector"]


def _tiny(trainable: list[str]) -> CosForConditionalGeneration:
    model = tiny_model(tiny_config())
    set_trainable(model, trainable)
    return model


def _names(model) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def test_the_trace_runs_the_forward_in_call_order_then_the_backward_in_reverse():
    """The replayed trace is the order DeepSpeed records its hooks: the LLM's input embeddings first, the
    ViT's parts and blocks (the tower itself is never called), the bridge, the LLM; then the backward of
    what carries a gradient only, outermost first: no ViT, and the input embeddings last when they train."""
    fetched = [node.name for kind, node, _ in micro_batch_events(call_tree(_tiny(TRAINED))) if kind == "fetch"]
    forward = [
        "",
        "language_model.model.embed_tokens",
        "vision_tower.embeddings",
        "vision_tower.embeddings.patch_embedding",
        "vision_tower.embeddings.position_embedding",
        "vision_tower.pre_layrnorm",
        "vision_tower.encoder.layers.0",
        "vision_tower.encoder.layers.1",
        "resampler",
        "resampler.scales.0",
        "resampler.scales.0.levels.0",
        "resampler.scales.0.levels.1",
        "resampler.scales.1",
        "resampler.scales.1.levels.0",
        "resampler.scales.1.levels.1",
        "projector",
        "projector.norm",
        "projector.linear",
        "language_model",
        "language_model.model",
        "language_model.model.rotary_emb",
        "language_model.model.layers.0",
        "language_model.model.layers.1",
        "language_model.model.norm",
        "language_model.lm_head",
    ]
    backward = [
        "",
        "language_model",
        "language_model.lm_head",
        "language_model.model",
        "language_model.model.norm",
        "language_model.model.layers.1",
        "language_model.model.layers.0",
        "projector",
        "projector.linear",
        "projector.norm",
        "resampler",
        "resampler.scales.1",
        "resampler.scales.1.levels.1",
        "resampler.scales.1.levels.0",
        "resampler.scales.0",
        "resampler.scales.0.levels.1",
        "resampler.scales.0.levels.0",
        "language_model.model.embed_tokens",
    ]
    assert fetched == forward + backward
    frozen = [node.name for kind, node, _ in micro_batch_events(call_tree(_tiny(FROZEN))) if kind == "fetch"]
    assert frozen == forward + backward[:-1]  # a frozen embedding has no backward


def test_below_the_thresholds_nothing_is_gathered_twice():
    """With the templates' 1e9 thresholds a small model stays gathered from its forward to its backward:
    each parameter once per micro-batch (fewer when a later micro-batch still finds it gathered), the
    persistent ones once after the step, nothing in the backward."""
    model = _tiny(TRAINED)
    for micro_batches in (1, 3):
        counts = zero3_gathers(model, BELOW, micro_batches)
        assert counts.backward == 0 and max(counts.per_param.values()) <= micro_batches
    one = zero3_gathers(model, BELOW, 1)
    numels = [p.numel() for p in model.parameters()]
    assert one.persistent == sum(n for n in numels if n <= 320)
    assert one.forward == sum(n for n in numels if n > 320)  # every parameter is used once


def test_released_modules_are_gathered_again_for_their_backward():
    """With no reuse distance and no prefetch, every module that back-propagates is gathered in its
    forward and again in its backward; the frozen ViT only once; a frozen LLM's embeddings only once."""
    for trainable in (TRAINED, FROZEN):
        model = _tiny(trainable)
        counts = zero3_gathers(model, RELEASE_ALL, 1)
        by_name = {name: counts.per_param.get(i, 0) for i, name in enumerate(_names(model))}
        assert by_name["language_model.model.layers.0.mlp.up_proj.weight"] == 2
        assert by_name["resampler.scales.1.levels.0.mlp.0.weight"] == 2
        assert by_name["language_model.lm_head.weight"] == 2
        assert by_name["vision_tower.encoder.layers.1.mlp.fc1.weight"] == 1
        assert by_name["language_model.model.embed_tokens.weight"] == (2 if trainable == TRAINED else 1)
        assert counts.backward > 0 and counts.total > zero3_gathers(model, BELOW, 1).total


def _paper_scale(text: dict) -> CosForConditionalGeneration:
    """CLIP ViT-L/14 at 224 px (blocks up to 22) + an LLM of `text`'s geometry, on the meta device, the
    bridge trained and the LLM frozen (the pre-training recipes)."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    )
    llama = dict(model_type="llama", vocab_size=32000, num_key_value_heads=text["num_attention_heads"], **text)
    config = CosConfig(vision_config=vision, text_config=llama, feature_layers=[15, 22], resampler_num_heads=16)
    with torch.device("meta"):
        model = CosForConditionalGeneration(config)
    set_trainable(model, FROZEN)
    return model


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}, 5),
        ({"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40}, 3),
    ],
    ids=["vicuna7b", "vicuna13b"],
)
def test_a_paper_scale_llm_keeps_only_its_last_blocks_gathered(text, kept):
    """At the zero3 template's thresholds (1e9 elements) a 7B LLM (202M parameters per block) keeps its
    last 5 blocks gathered from forward to backward and a 13B one (315M per block) its last 3: the other
    blocks, the head's input norm and the bridge are gathered again for the backward, so ZeRO-3 gathers
    ~1.8x (7B) and ~1.9x (13B) what every parameter once per micro-batch would be."""
    model = _paper_scale(text)
    width, layers = text["hidden_size"], text["num_hidden_layers"]
    block = 4 * width * width + 3 * width * text["intermediate_size"]
    settings = Zero3Settings(
        prefetch_bucket=2 * block, max_live=10**9, max_reuse=10**9, persistence_threshold=10 * width
    )
    counts = zero3_gathers(model, settings, 1)
    names = _names(model)
    twice = {
        int(name.split(".")[3])
        for i, name in enumerate(names)
        if name.startswith("language_model.model.layers.") and counts.per_param.get(i) == 2
    }
    assert twice == set(range(layers - kept))
    floor = step_volume(3, param_counts(model.parameters(), 10 * width), 1, 2)
    replayed = step_volume(3, param_counts(model.parameters(), 10 * width), 1, 2, counts)
    assert replayed.backward_all_gather == pytest.approx(2 * counts.backward)
    ratio = replayed.all_gather / floor.all_gather
    assert ratio == pytest.approx({32: 1.78, 40: 1.88}[layers], abs=0.01)


def test_without_a_replay_the_volume_is_the_once_per_micro_batch_floor():
    """`step_volume` without replayed gathers keeps the floor (every partitioned parameter once per
    micro-batch, the persistent ones once), and with them it is their bytes."""
    counts = ParamCounts(total=1000, persistent=100, trainable=50)
    assert step_volume(3, counts, 2, 2).all_gather == (2 * 900 + 100) * 2
    model = _tiny(TRAINED)
    gathers = zero3_gathers(model, RELEASE_ALL, 2)
    volume = step_volume(3, param_counts(model.parameters(), 320), 2, 4, gathers)
    assert volume.all_gather == 4 * gathers.total and volume.backward_all_gather == 4 * gathers.backward


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_the_replayed_gathers_are_the_bytes_deepspeed_moves_below_and_above_the_thresholds(tmp_path):
    """bench/comm_volume.py on 2 CPU ranks, two micro-batches per step: with the templates' thresholds
    (nothing re-gathered; parameters kept from one micro-batch to the next) and with the reuse distance
    and live parameters lowered below the tiny model's sizes (its first LLM block and the resampler
    blocks gathered again in every backward), DeepSpeed's all-gather bytes in the forward, the backward
    and the step, and its reduce-scatter bytes, are what the model predicts, to the byte; and the trace
    DeepSpeed recorded is the one replayed. The once-per-micro-batch floor would miss both ways."""
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
    variants = "zero3-llm-trained,zero3-llm-frozen,zero3-llm-trained-regather,zero3-llm-frozen-regather"
    command = [sys.executable, str(REPO / "bench" / "comm_volume.py"), "--variants", variants]
    command += ["--micro-batches", "2", "--warmup", "2", "--steps", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == variants.split(",")
    for name, row in rows.items():
        measured, predicted = row["measured_bytes_per_step"], row["predicted_bytes_per_step"]
        assert measured["all_gather"] == predicted["all_gather"], name
        assert measured["reduce_scatter"] == predicted["reduce_scatter"], name
        for phase, want in row["predicted_all_gather_by_phase"].items():
            assert row["measured_bytes_by_phase"].get(f"all_gather/{phase}", 0) == want, (name, phase)
        assert row["trace"]["matches"], (name, row["trace"]["recorded"], row["trace"]["replayed"])
        counts = ParamCounts(**row["params"])
        floor = step_volume(3, counts, 2, 4).all_gather
        regathered = row["predicted_all_gather_by_phase"]["backward"]
        if name.endswith("regather"):
            assert regathered > 0 and measured["all_gather"] > floor
        else:
            assert regathered == 0 and measured["all_gather"] < floor
