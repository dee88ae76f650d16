"""Building the model and its DeepSpeed engine: model per stage, trainability, LoRA, ZeRO-3 fetching.

Everything here is collective-safe: every rank runs the same calls in the same order. CPU runs use the
gloo backend and fp32 with torch's AdamW (nothing JIT-compiles); GPU runs use nccl and bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel

from cos_model import CosForConditionalGeneration
from cos_model.building import build_pretrained
from cos_model.loading import CheckpointMismatchError

from ..common.dist import Dist
from ..common.errors import CheckpointError
from ..common.log import log
from ..plan.deepspeed_config import load_template, resolve_deepspeed, use_bf16
from ..spec.sections import LoraSpec
from ..spec.specs import MODULES, FinetuneSpec, PretrainSpec, TrainingSpec

LORA_MODULE_PATTERN = r"(.*\.)?language_model\..*\.({targets})"


def num_params(parameters) -> int:
    # Under ZeRO-3 a partitioned parameter's local numel is 0; ds_numel is its full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def set_trainable(model: nn.Module, modules: list[str]) -> None:
    """Freeze everything, then unfreeze the named top-level modules."""
    for name in modules:
        if name not in MODULES:
            raise ValueError(f"unknown module {name!r}; modules are {MODULES}")
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".")[0] in modules


def run_dtype(spec: TrainingSpec, device_type: str) -> torch.dtype:
    """The dtype weights are built in: bf16 when the run trains in bf16 (GPU by default), else fp32."""
    return torch.bfloat16 if use_bf16(spec.deepspeed.precision, device_type) else torch.float32


def build_pretrain_model(
    spec: PretrainSpec, vocab_size: int, image_token_id: int, dtype: torch.dtype = torch.float32
) -> CosForConditionalGeneration:
    """A fresh Chain-of-Sight model, built lean (`cos_model.building.build_pretrained`): ViT and LLM
    loaded exactly from their local folders straight into `dtype`, random where a component has no
    folder, the bridge initialised once; the vocabulary grows to the tokenizer's (`vocab_size`)."""
    config = spec.model.to_config(vocab_size=vocab_size, image_token_id=image_token_id)
    try:
        model, reports = build_pretrained(
            config, spec.model.vision.path, spec.model.text.path, dtype, vocab_size=vocab_size, seed=spec.run.seed
        )
    except CheckpointMismatchError as err:
        raise CheckpointError(str(err)) from None
    for part, report in reports.items():
        for message in report.messages:
            log.info(f"{part}: {message}")
    set_trainable(model, list(spec.model.trainable))
    if spec.model.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable()
    return model


def load_model_folder(model_dir: str, dtype: torch.dtype | str = torch.float32) -> CosForConditionalGeneration:
    """A Chain-of-Sight model folder (a published `model/`, an export), every tensor loaded exactly
    (`cos_model.saved`; `dtype="auto"` keeps the stored dtype) or one `CheckpointError` naming the
    folder and the first missing, mis-shaped or foreign keys: transformers' `from_pretrained` only logs
    missing keys and initialises them at random."""
    from cos_model.saved import load_model_folder as load_exactly

    try:
        return load_exactly(model_dir, None if dtype == "auto" else dtype)
    except CheckpointMismatchError as err:
        raise CheckpointError(str(err)) from None


def build_finetune_model(spec: FinetuneSpec, model_dir: str, dtype: torch.dtype = torch.float32):
    """The inflated model from a local folder, with LoRA (or full LLM training) as the spec says."""
    model = load_model_folder(model_dir, dtype)
    if spec.model.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable()
    if spec.lora is None:
        set_trainable(model, list(spec.model.trainable))
        return model
    return apply_lora(model, spec.lora, list(spec.model.trainable), spec.run.seed)


def apply_lora(model: CosForConditionalGeneration, lora: LoraSpec, trainable: list[str], seed: int):
    """Wrap the model with peft LoRA on the LLM's projections; the trainable bridge modules go to
    `modules_to_save`, so one peft folder holds everything fine-tuning changed."""
    from peft import LoraConfig, get_peft_model

    set_trainable(model, [])
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=LORA_MODULE_PATTERN.format(targets="|".join(lora.target_modules)),
        modules_to_save=list(trainable) or None,
    )
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same init on every rank and run
    peft_model = get_peft_model(model, config)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise ValueError(f"lora.target_modules: {lora.target_modules} match no module of the language model")
    return peft_model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per top-level module (LoRA adapters counted as `lora`)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.removeprefix("base_model.model.").split(".")
        group = "lora" if "lora_" in name else parts[0]
        counts[group] = counts.get(group, 0) + getattr(param, "ds_numel", param.numel())
    return counts


def expected_trainable_groups(spec: TrainingSpec) -> set[str]:
    groups = set(spec.model.trainable)
    if isinstance(spec, FinetuneSpec) and spec.lora is not None:
        groups.add("lora")
    return groups


def cosine_schedule(num_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warm-up, then cosine down to `min_lr_ratio`."""
    num_warmup = int(round(warmup_ratio * num_steps))

    def multiplier(step: int) -> float:
        if step < num_warmup:
            return (step + 1) / (num_warmup + 1)
        progress = (step - num_warmup) / max(1, num_steps - num_warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks in the model: the ones transformers never splits across
    devices (`_no_split_modules`), of the model itself and of its LLM."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or [])
    return names


def largest_block_numel(model: nn.Module) -> int | None:
    classes = block_classes(model)
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in classes]
    return max(sizes, default=None)


def leaf_classes(model: nn.Module) -> list[str]:
    """The block classes ZeRO-3 may fetch whole: every one but the embeddings (CLIP's patch and
    position embedding).

    NOTE: DeepSpeed releases a leaf's parameters from its full backward hook. For a module none of
    whose inputs needs a gradient (pixels, token ids) that hook fires as soon as the output's gradient
    exists, before the module's own weight gradients are accumulated: a trainable vision tower then
    fails in backward with "size of tensor a (0) must match". Embeddings are small; fetching them per
    module costs nothing that matters.
    """
    return sorted(name for name in block_classes(model) if not name.endswith("Embeddings"))


def fetch_whole_blocks(model: nn.Module) -> None:
    """Make each transformer block a ZeRO-3 leaf: its parameters are gathered in one go when the block
    runs, and its sub-modules get no hooks of their own.

    NOTE: per-module fetching puts a pre- and post-hook pair and a gather on every Linear and norm
    (~10 per block); that Python overhead is paid every forward and backward, on every rank.
    """
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, leaf_classes(model), raise_if_not_found=False)


def build_engine(model: nn.Module, spec: TrainingSpec, dist_info: Dist, micro_batch_size: int):
    """deepspeed.initialize with the resolved config, torch AdamW and our cosine schedule."""
    import deepspeed

    device_type = dist_info.device.type
    hidden = getattr(getattr(model, "config", None), "text_config", None)
    ds_config = resolve_deepspeed(
        load_template(spec.deepspeed.template),
        spec,
        world_size=dist_info.world_size,
        micro_batch_size=micro_batch_size,
        device_type=device_type,
        hidden_size=getattr(hidden, "hidden_size", None),
        block_numel=largest_block_numel(model),
    )
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and spec.deepspeed.zero3_fetch == "block":
        fetch_whole_blocks(model)
    schedule = cosine_schedule(spec.optim.num_steps, spec.optim.warmup_ratio, spec.optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine, scheduler, ds_config
