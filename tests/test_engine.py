"""cosctl.train.engine: which modules ZeRO-3 fetches whole, the bucket size that follows from them, and that
fetching per block changes speed only, never the numbers (also where a trained block's inputs need no gradient)."""

from __future__ import annotations

import pytest

from cosctl.plan.resolve import block_classes, largest_block_numel
from cosctl.stages.base import set_trainable
from cosctl.train.engine import fetch_whole_blocks, leaf_classes, param_groups
from tests.harness import RECIPES, cosctl, ok, run, steps, train_command
from tests.test_stages import published_tiny_model
from tests.tiny import tiny_config, tiny_model


def test_blocks_are_the_vit_resampler_and_llm_layers():
    """The block classes come from the models' _no_split_modules: CLIP layers, resampler blocks, LLaMA layers."""
    assert {"CLIPEncoderLayer", "ResamplerBlock", "LlamaDecoderLayer"} <= block_classes(tiny_model(tiny_config()))


def test_fetch_whole_blocks_marks_every_block_and_nothing_else():
    """Every transformer layer becomes a ZeRO-3 leaf; CLIP's embedding (fed pixels, which need no
    gradient) does not, nor do the blocks' children or the top-level modules."""
    model = tiny_model(tiny_config())
    fetch_whole_blocks(model)
    leaves = {name for name, module in model.named_modules() if getattr(module, "_z3_leaf", False)}
    blocks = {name for name, module in model.named_modules() if type(module).__name__ in leaf_classes(model)}
    assert leaves == blocks
    assert "CLIPVisionEmbeddings" in block_classes(model) and "CLIPVisionEmbeddings" not in leaf_classes(model)
    assert not any(name.endswith("embeddings") for name in leaves)
    assert any(".encoder.layers.0" in name for name in leaves)
    assert any("language_model.model.layers.0" in name for name in leaves)


def test_param_groups_give_named_modules_their_own_lr():
    """With lr_by_module, each named module's trained parameters form a group at its lr and the rest
    one group first (the logged lr); frozen parameters are in no group; without it, one plain list."""
    model = tiny_model(tiny_config())
    set_trainable(model, ["resampler", "projector", "language_model"])
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in param_groups(model, {})} == trained

    groups = param_groups(model, {"resampler": 2e-5, "projector": 1e-5, "vision_tower": 3e-5})
    assert [group.get("lr") for group in groups] == [None, 1e-5, 2e-5]  # the ViT is frozen: no group
    named = dict(model.named_parameters())
    members = [{n for n, p in named.items() if any(p is q for q in group["params"])} for group in groups]
    assert all(n.startswith("language_model.") for n in members[0])
    assert all(n.startswith("projector.") for n in members[1]) and members[1]
    assert all(n.startswith("resampler.") for n in members[2]) and members[2]
    assert sum(map(len, members)) == len(trained)


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


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_trains_the_vision_tower(tiny_data, tmp_path):
    """A 2-rank ZeRO-3 pretrain that trains the ViT too runs its steps (a leaf embedding once crashed
    backward) and the ViT's patch embedding moves."""
    from safetensors.torch import load_file

    trainable = "model.trainable=[vision_tower,resampler,projector,language_model]"
    for num_steps in (1, 2):
        run(
            train_command(
                tiny_data, tmp_path / f"run{num_steps}", tmp_path / f"out{num_steps}", num_steps, 1, trainable
            ),
            tmp_path,
        )
    key = "vision_tower.embeddings.patch_embedding.weight"
    one, two = (load_file(tmp_path / f"out{n}" / "model" / "model.safetensors")[key] for n in (1, 2))
    assert steps(tmp_path / "run2")[2]["loss"] > 0
    assert (two - one).abs().max() > 1e-5  # the second step's update; a frozen ViT would not move


def tiny_finetune(tmp_path, name: str, sets: list[str]):
    """`cosctl finetune` of the tiny recipe with `sets`, run folder `tmp_path/name`, artefact
    `tmp_path/out-name`; requires exit 0."""
    overrides = [arg for setting in sets for arg in ("--set", setting)]
    output = ["--run-dir", str(tmp_path / name), "--output", str(tmp_path / f"out-{name}")]
    return ok(cosctl("finetune", str(RECIPES / "tiny" / "finetune.yaml"), *output, *overrides, tmp=tmp_path))


@pytest.mark.slow
def test_zero3_finetunes_lora_with_a_frozen_bridge_like_zero2(tiny_data, tmp_path):
    """ZeRO-3 LoRA fine-tuning with nothing trained in full (`model.trainable=[]`: the LLM's first block
    reads hidden states that need no gradient) runs its steps with ZeRO-2's losses, and its LoRA B
    matrices move; its first backward once met released (size-0) partitions and crashed."""
    from safetensors.torch import load_file

    source = published_tiny_model(tiny_data, tmp_path / "source")
    sets = [
        f"model.source={source}",
        f"data.root={tiny_data}",
        "model.trainable=[]",
        "optim.lr_by_module={}",
        "optim.num_steps=3",
        "checkpoint.every_steps=null",
        "eval.every_steps=null",
        "batch.samples_per_step=4",
        "batch.tokens_per_micro_batch=2048",
    ]
    for template in ("zero3", "zero2"):
        tiny_finetune(tmp_path, template, [*sets, f"deepspeed.template={template}"])
    zero3, zero2 = steps(tmp_path / "zero3"), steps(tmp_path / "zero2")
    assert [zero3[s]["loss"] for s in (1, 2, 3)] == pytest.approx([zero2[s]["loss"] for s in (1, 2, 3)], rel=1e-5)
    weights = load_file(tmp_path / "out-zero3" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained, not the zero init
    assert not any("resampler" in k or "projector" in k for k in weights)  # nothing in full


@pytest.mark.slow
def test_zero3_lora_finetune_trains_the_bridge_at_its_own_lr(tiny_data, tmp_path):
    """A ZeRO-3 LoRA fine-tune with the bridge at a near-zero lr_by_module leaves the bridge where it
    was while LoRA trains; the same run with the bridge at the LoRA lr moves it (the groups reach the
    optimizer)."""
    from safetensors.torch import load_file

    source = published_tiny_model(tiny_data, tmp_path / "source")
    before = load_file(source / "model" / "model.safetensors")
    sets = [
        f"model.source={source}",
        f"data.root={tiny_data}",
        "optim.num_steps=2",
        "checkpoint.every_steps=null",
        "eval.every_steps=null",
        "batch.samples_per_step=4",
        "batch.tokens_per_micro_batch=2048",
    ]
    slow_bridge = "optim.lr_by_module={resampler: 1.0e-12, projector: 1.0e-12}"
    outputs = {
        name: tiny_finetune(tmp_path, name, [*sets, extra])
        for name, extra in (("plain", "optim.lr_by_module={}"), ("slow", slow_bridge))
    }
    moved = {}
    for name in ("plain", "slow"):
        adapter = load_file(tmp_path / f"out-{name}" / "adapter" / "adapter_model.safetensors")
        bridge = {k: v for k, v in adapter.items() if ".resampler." in k or ".projector." in k}
        assert bridge and any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
        moved[name] = max((v - before[k.split("base_model.model.")[-1]]).abs().max().item() for k, v in bridge.items())
    assert moved["plain"] > 1e-4 and moved["slow"] < 1e-8
    logged = outputs["slow"].stdout + outputs["slow"].stderr
    assert "peak learning rates: projector 1e-12, resampler 1e-12, the rest 0.002" in logged
    assert steps(tmp_path / "slow")[1]["lr"] == steps(tmp_path / "plain")[1]["lr"]  # the LLM's lr is logged
