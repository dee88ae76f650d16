"""The FLOP model of `cosctl.plan.flops`, checked against counts worked out by hand for a tiny config: per
sample (the prediction), per step from the step's own samples and padded micro-batches, and the device peaks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cos_model import IGNORE_INDEX, CosConfig
from cosctl.plan.flops import (
    DEFAULT_TRAINABLE,
    DevicePeak,
    PaddedPass,
    device_peak,
    flops_per_sample,
    passes,
    peak_tflops,
    sample_flops,
    step_flops,
)
from tests.harness import tiny_spec

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


# ---------------------------------------------------------------------------------------------------
# A step's FLOPs from its own micro-batches (`step_flops`), and the device peaks


def test_one_unpadded_sample_with_an_image_costs_what_the_prediction_says():
    """A step of one sample with its image, run unpadded, is `sample_flops` of that sample: model and
    hardware FLOPs (with checkpointing's recomputation in the latter)."""
    one = step_flops(CONFIG, [TEXT], [32], [PaddedPass(rows=1, columns=SEQ, images=1)], gradient_checkpointing=True)
    predicted = sample_flops(CONFIG, TEXT, gradient_checkpointing=True)
    assert (one.model, one.hardware) == (predicted.model, predicted.hardware)


def test_a_text_only_sample_costs_no_vision_tower_or_bridge():
    """A sample without an image is counted for the LLM alone: the ViT, resampler and projector are
    neither in its model FLOPs nor in those of a step of image and text-only samples."""
    text_only = step_flops(CONFIG, [SEQ], [0], [PaddedPass(1, SEQ, 1)])
    assert text_only.model == 3 * LLM_FORWARD + 3 * ATTENTION_FORWARD
    mixed = step_flops(CONFIG, [TEXT, SEQ], [32, 0], [PaddedPass(2, SEQ, 1)])
    assert mixed.model == sample_flops(CONFIG, TEXT).model + text_only.model
    # The device still ran one image (the blank one a micro-batch without images runs): hardware only.
    assert text_only.hardware == text_only.model + VIT_FORWARD + 3 * RESAMPLER_FORWARD + 3 * PROJECTOR_FORWARD


def test_attention_counts_each_samples_square_not_the_means():
    """Two samples of 8 and 72 tokens: attention from 8² + 72², not twice the square of their mean 40;
    the matmuls depend on the total only."""
    short, long = step_flops(CONFIG, [8], [0], []), step_flops(CONFIG, [72], [0], [])
    both = step_flops(CONFIG, [8, 72], [0, 0], [])
    per_square = ATTENTION_FORWARD / SEQ**2  # forward attention FLOPs per squared token
    assert both.model == short.model + long.model
    assert both.model == 3 * 2 * N_LLM * 80 + 3 * per_square * (8**2 + 72**2)
    at_the_mean = step_flops(CONFIG, [40, 40], [0, 0], [])
    assert both.model - at_the_mean.model == 3 * per_square * (8**2 + 72**2 - 2 * 40**2)


def test_padding_and_fillers_count_in_hardware_flops_only():
    """Padding the rows to 64 columns and a filler micro-batch (nothing trains in it) add hardware FLOPs:
    every padded token's matmuls and attention, and the filler's image; the model FLOPs stay those of
    the trained samples."""
    samples = ([TEXT, TEXT + 4], [32, 32])
    tight = step_flops(CONFIG, *samples, [PaddedPass(2, SEQ + 4, 2)])
    padded = step_flops(CONFIG, *samples, [PaddedPass(2, 64, 2)])
    with_filler = step_flops(CONFIG, *samples, [PaddedPass(2, 64, 2), PaddedPass(1, SEQ, 1)])
    assert tight.model == padded.model == with_filler.model
    per_square = ATTENTION_FORWARD / SEQ**2
    extra = 2 * (3 * 2 * N_LLM * (64 - SEQ - 4) + 3 * per_square * (64**2 - (SEQ + 4) ** 2))
    assert padded.hardware - tight.hardware == pytest.approx(extra)
    assert with_filler.hardware - padded.hardware == pytest.approx(sample_flops(CONFIG, TEXT).hardware)
    assert padded.hardware > padded.model


@pytest.mark.parametrize(
    ("name", "part", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.4),
        ("NVIDIA H200 NVL", "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100-SXM4-40GB", "A100", 312.0),
        ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA L40S", "L40S", 362.05),
    ],
)
def test_device_names_map_to_their_parts_peak(name, part, peak):
    """Each name as `torch.cuda.get_device_name` reports it gives its own part's dense bf16 peak (an
    H100 PCIe is not an SXM)."""
    assert device_peak(name) == DevicePeak(part, peak)


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-32GB", "NVIDIA A10G", ""])
def test_unknown_devices_have_no_peak(name, monkeypatch):
    """A part the table does not name, a bare "H100" among them, gets no peak: MFU is omitted, not guessed."""
    assert device_peak(name) is None
    monkeypatch.delenv("COSCTL_PEAK_TFLOPS", raising=False)
    assert peak_tflops(torch.device("cpu")) is None
    monkeypatch.setenv("COSCTL_PEAK_TFLOPS", "123.5")
    assert peak_tflops(torch.device("cpu")) == 123.5


def _text_only_copy(data: Path, out: Path, every: int = 3) -> Path:
    """The synthetic set copied with every `every`-th training record made text-only (no image, no
    `<image>` in its turns), as ShareGPT records are in LLaVA's mix."""
    shutil.copytree(data, out)
    records = json.loads((out / "train.json").read_text())
    for record in records[::every]:
        del record["image"]
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "").strip()
    (out / "train.json").write_text(json.dumps(records))
    return out


def _expected_step(config, batches: list[dict], trainable, checkpointing: bool) -> tuple[float, float, int, int]:
    """(model, hardware FLOPs, text-only samples, padded tokens) of a step's collated micro-batches,
    counted row by row with `sample_flops`: a trained row at its own length (the LLM alone without an
    image), every row at its padded length and every image run for the hardware."""
    model = hardware = 0.0
    text_only = padding = 0
    visual = config.num_visual_tokens
    for batch in batches:
        rows, columns = batch["input_ids"].shape
        for row in range(rows):
            length = int(batch["attention_mask"][row].sum())
            images = int((batch["input_ids"][row] == config.image_token_id).sum()) // visual
            one = sample_flops(config, length - visual, trainable)
            if (batch["labels"][row] != IGNORE_INDEX).any():
                model += one.model if images else one.llm + one.llm_attention
                text_only += not images
            padded = sample_flops(config, columns - visual, trainable, gradient_checkpointing=checkpointing)
            hardware += padded.llm + padded.llm_attention + padded.recompute
            padding += columns - length
        image = sample_flops(config, 0, trainable)
        hardware += max(batch["pixel_values"].shape[0], 1) * (image.vision + image.resampler + image.projector)
    return model, hardware, text_only, padding


@pytest.mark.slow
def test_the_loop_logs_mfu_and_hfu_of_each_steps_own_samples(tiny_data, tmp_path, in_process, monkeypatch):
    """A 3-step run on a set with text-only records logs, per step, the model FLOPs of the samples it
    trained on (each at its own length, text-only ones without the vision cost) and the hardware FLOPs
    of its micro-batches as run (padding and the checkpointed forward included); MFU and HFU are those
    over the step time and the peak."""
    from cosctl.train.loader import StepLoader

    monkeypatch.setenv("COSCTL_PEAK_TFLOPS", "0.5")
    data = _text_only_copy(tiny_data, tmp_path / "data")
    spec = tiny_spec(data, tmp_path / "out", 3, "model.gradient_checkpointing=true", "batch.samples_per_step=24")
    seen: list[list[dict]] = []
    next_step = StepLoader.next_step
    monkeypatch.setattr(StepLoader, "next_step", lambda self: seen.append(next_step(self)) or seen[-1])
    in_process(spec, tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == len(seen) == 3
    config = CosConfig.from_pretrained(tmp_path / "out" / "model")
    text_only = padding = 0
    for record, batches in zip(steps, seen, strict=True):
        model, hardware, num_text_only, num_padding = _expected_step(config, batches, spec.model.trainable, True)
        text_only, padding = text_only + num_text_only, padding + num_padding
        assert record["flops"] == pytest.approx(model, rel=1e-9)
        assert record["hardware_flops"] == pytest.approx(hardware, rel=1e-9)
        assert record["tflops"] == pytest.approx(model / record["step_time_s"] / 1e12)
        assert record["mfu"] == pytest.approx(record["tflops"] / 0.5)
        assert record["hfu"] == pytest.approx(hardware / record["step_time_s"] / 1e12 / 0.5)
        assert record["hfu"] > record["mfu"]
    assert text_only > 0 and padding > 0  # both effects were in the steps measured
