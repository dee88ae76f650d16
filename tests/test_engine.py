"""cosctl.engine: which modules ZeRO-3 fetches whole, the bucket size that follows from them, and that
fetching per block changes speed only, never the numbers."""

from __future__ import annotations

import pytest

from cosctl.engine import block_classes, fetch_whole_blocks, largest_block_numel
from tests.harness import run, steps, train_command
from tests.tiny import tiny_config, tiny_model


def test_blocks_are_the_vit_resampler_and_llm_layers():
    """The block classes come from the models' _no_split_modules: CLIP layers, resampler blocks, LLaMA layers."""
    assert {"CLIPEncoderLayer", "ResamplerBlock", "LlamaDecoderLayer"} <= block_classes(tiny_model(tiny_config()))


def test_fetch_whole_blocks_marks_every_block_and_nothing_else():
    """Every module of a block class (transformer layers, and CLIP's patch embedding) becomes a ZeRO-3
    leaf; their children and the top-level modules do not."""
    model = tiny_model(tiny_config())
    fetch_whole_blocks(model)
    leaves = {name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)}
    blocks = {name for name, module in model.named_modules() if type(module).__name__ in block_classes(model)}
    assert leaves == blocks
    assert any(".encoder.layers.0" in name for name in leaves)
    assert any("language_model.model.layers.0" in name for name in leaves)


def test_largest_block_is_the_biggest_layer_of_any_kind():
    """The tiny model's biggest block is a resampler block (12,672 parameters: its MLP is 4x the ViT
    width), bigger than its LLaMA layer (10,304), CLIP embedding (9,792) and CLIP layer (8,544)."""
    model = tiny_model(tiny_config())
    assert (
        largest_block_numel(model) == sum(p.numel() for p in model.resampler.scales[0].levels[0].parameters()) == 12_672
    )


@pytest.mark.slow
@pytest.mark.multiproc
def test_block_fetch_trains_like_module_fetch(tiny_data, tmp_path):
    """2-rank ZeRO-3 runs with per-block and per-module fetching give the same losses. The first step
    (same weights) is bit-identical; later ones may differ in the last bits, because the two modes fill
    DeepSpeed's gradient buckets in another order and a token-weighted loss rounds differently per bucket."""
    for fetch in ("block", "module"):
        run(
            train_command(
                tiny_data, tmp_path / fetch, tmp_path / f"out-{fetch}", 3, 3, f"deepspeed.zero3_fetch={fetch}"
            ),
            tmp_path,
        )
    block, module = steps(tmp_path / "block"), steps(tmp_path / "module")
    assert block[1]["loss"] == module[1]["loss"]
    assert [block[s]["loss"] for s in (2, 3)] == pytest.approx([module[s]["loss"] for s in (2, 3)], rel=1e-6)
