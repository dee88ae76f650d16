"""The FLOP model of `cosctl.train.metrics`, checked against counts worked out by hand for a tiny config."""

from __future__ import annotations

import pytest

from cos_model import CosConfig
from cosctl.plan.flops import DEFAULT_TRAINABLE, flops_per_sample, passes, sample_flops

# ViT 32 wide (MLP 64), 4-px patches at 64 px: 16x16 grid + CLS = 257 tokens; feature blocks 0 and 1, so
# 2 blocks run. LLaMA 32 wide (MLP 64), 2 layers, 4 heads, vocabulary 100. Chain [16x16, 4x1]: 32 tokens.
CONFIG = CosConfig(
    vision_config={
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 64,
    },
    text_config={
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 100,
    },
    feature_layers=[0, 1],
    resampler_num_heads=4,
    image_token_id=99,
)
TEXT = 8
SEQ = 32 + TEXT  # visual + text tokens

# By hand. LLM matmul weights: per layer q, o, k, v (4 x 32x32) + gate, up, down (3 x 32x64); + LM head 32x100.
N_LLM = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 100  # 23,680
LLM_FORWARD = 2 * N_LLM * SEQ  # 2·N per token
# Causal attention forward per token: QK^T and AV over the SEQ/2 earlier positions on average, per layer:
# 2 x 2 x 32 (width) x SEQ/2 = 2 x 32 x SEQ; two layers.
ATTENTION_FORWARD = 2 * (2 * 32 * SEQ) * SEQ
# ViT forward, 2 blocks of 257 tokens: 2·N per token (4 x 32x32 + 2 x 32x64) + full attention 4 x 257² x 32;
# patch embedding 2 x 257 x (3 x 4 x 4) x 32.
VIT_FORWARD = 2 * (2 * 257 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 257 * 257 * 32) + 2 * 257 * 3 * 16 * 32
# Resampler, per feature level (2): q and out projections of the queries, k/v projections of all 256
# patches, cross-attention of each query to its window's patches, MLP x4 on the queries.
GLOBAL = 2 * 16 * 32 * 32 * 2 + 2 * 256 * 2 * 32 * 32 + 4 * 16 * 256 * 32 + 2 * 16 * 2 * 4 * 32 * 32  # 1 window x 16 q
LOCAL = 2 * 16 * 32 * 32 * 2 + 2 * 256 * 2 * 32 * 32 + 4 * 16 * 16 * 32 + 2 * 16 * 2 * 4 * 32 * 32  # 16 windows x 1 q
RESAMPLER_FORWARD = 2 * (GLOBAL + LOCAL)
PROJECTOR_FORWARD = 2 * 32 * 32 * 32  # 32 tokens, 32 -> 32


def test_the_hand_counts_are_what_they_say():
    """The worked-out constants, as numbers (so a slip in the arithmetic above shows)."""
    assert N_LLM == 23_680 and VIT_FORWARD == 26_119_424 and RESAMPLER_FORWARD == 6_619_136


def test_trained_llm_counts_6n():
    """Bridge and LLM trained, ViT frozen: ViT forward + 3x bridge + 6·N per token + 3x attention."""
    flops = sample_flops(CONFIG, TEXT, ["resampler", "projector", "language_model"])
    assert (
        flops.model
        == VIT_FORWARD + 3 * RESAMPLER_FORWARD + 3 * PROJECTOR_FORWARD + 3 * LLM_FORWARD + 3 * ATTENTION_FORWARD
    )
    assert flops.hardware == flops.model and flops.recompute == 0
    assert flops_per_sample(CONFIG, TEXT) == flops.model  # the default trainable set


def test_frozen_llm_under_a_trained_bridge_counts_4n():
    """A frozen LLM back-propagates the bridge's gradients: 4·N per token (no weight gradients), while
    attention's backward (no weights) still costs 2x its forward."""
    flops = sample_flops(CONFIG, TEXT, ["resampler", "projector"])
    assert flops.llm == 2 * LLM_FORWARD and flops.llm_attention == 3 * ATTENTION_FORWARD
    assert (
        flops.model
        == VIT_FORWARD + 3 * RESAMPLER_FORWARD + 3 * PROJECTOR_FORWARD + 2 * LLM_FORWARD + 3 * ATTENTION_FORWARD
    )


def test_gradient_checkpointing_adds_the_llm_forward_to_hardware_flops_only():
    """Recomputation is hardware work, not model work: +2·N per token and the attention forward."""
    for trainable in (["resampler", "projector", "language_model"], ["resampler", "projector"]):
        plain = sample_flops(CONFIG, TEXT, trainable)
        ckpt = sample_flops(CONFIG, TEXT, trainable, gradient_checkpointing=True)
        assert ckpt.model == plain.model
        assert ckpt.hardware == plain.model + LLM_FORWARD + ATTENTION_FORWARD


def test_frozen_modules_below_everything_trained_run_forward_only():
    """Only the projector trains: ViT and resampler forward only (1x), projector 3x, LLM 2x (4·N), and
    checkpointing recomputes the LLM forward."""
    flops = sample_flops(CONFIG, TEXT, ["projector"], gradient_checkpointing=True)
    assert (flops.vision, flops.resampler, flops.projector) == (VIT_FORWARD, RESAMPLER_FORWARD, 3 * PROJECTOR_FORWARD)
    assert flops.llm == 2 * LLM_FORWARD and flops.recompute == LLM_FORWARD + ATTENTION_FORWARD


def test_lora_counts_its_adapters_at_6n_over_a_back_propagating_base():
    """LoRA: the frozen base back-propagates (4·N) and its adapters train (6·N)."""
    lora = 1_000
    flops = sample_flops(CONFIG, TEXT, ["resampler", "projector"], lora_params=lora, gradient_checkpointing=True)
    assert flops.llm == 2 * LLM_FORWARD + 6 * lora * SEQ
    assert flops.recompute == LLM_FORWARD + 2 * lora * SEQ + ATTENTION_FORWARD
    # With nothing else trained the LLM still back-propagates (to its adapters); the bridge is forward only.
    alone = sample_flops(CONFIG, TEXT, [], lora_params=lora)
    assert alone.llm == 2 * LLM_FORWARD + 6 * lora * SEQ and alone.resampler == RESAMPLER_FORWARD


def test_a_trained_vit_makes_everything_above_it_back_propagate():
    """A module's pass count depends on what trains below it, not only on itself."""
    assert passes(["vision_tower"]) == {"vision_tower": 3, "resampler": 2, "projector": 2, "language_model": 2}
    assert passes(["language_model"]) == {"vision_tower": 1, "resampler": 1, "projector": 1, "language_model": 3}
    assert set(DEFAULT_TRAINABLE) == {"resampler", "projector", "language_model"}
    with pytest.raises(ValueError, match="unknown modules"):
        passes(["vit"])
