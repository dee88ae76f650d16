"""The lean build of the Chain-of-Sight model (`build_pretrained`) and of a vision tower alone
(`build_vision_tower`).

It builds the whole model on the meta device and materialises each part once: the ViT
and the LLM as the checkpoint tensors themselves (cast to the run dtype), everything without a
checkpoint with the model's own `_init_weights`, the non-persistent buffers (rotary `inv_freq`, CLIP
`position_ids`) recomputed. No weight is initialised and then overwritten, and host memory peaks at
about one copy of the model.

Loading and checking the checkpoints themselves is `cos_model.loading`'s.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedModel

from .checkpoint_files import CheckpointMismatchError, first_keys
from .configuration import CosConfig
from .loading import (
    LoadReport,
    checkpoint_vocab_size,
    load_language_model,
    load_vision_tower,
    parameter_groups,
    set_tensor,
)
from .modeling import CosForConditionalGeneration
from .vision import CosVisionTower


def materialize(model: PreTrainedModel, dtype: torch.dtype = torch.float32) -> list[str]:
    """Give every tensor of `model` still on the meta device real CPU storage and initialise it with
    the model's own `_init_weights` (each sub-model's); tensors already assigned are marked and left
    alone. Parameters are initialised in float32 and then cast to `dtype`; buffers keep the dtype the
    model gave them. Returns the names of the parameters initialised here.

    Raises `RuntimeError` if the model's init leaves a materialised tensor unwritten.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    fresh: list[str] = []
    for group in parameter_groups(model):
        old = model.get_parameter(group[0])
        if not old.is_meta:
            continue
        work_dtype = torch.float32 if old.is_floating_point() else old.dtype
        new = nn.Parameter(_sentinel(old.shape, work_dtype), requires_grad=old.requires_grad)
        for name in group:
            set_tensor(model, name, new)
        fresh.append(group[0])
    buffers = [name for name, buffer in model.named_buffers(remove_duplicate=False) if buffer.is_meta]
    for name in buffers:
        buffer = model.get_buffer(name)
        set_tensor(model, name, _sentinel(buffer.shape, buffer.dtype))
    model.initialize_weights()
    unwritten = [name for name in fresh if _is_sentinel(model.get_parameter(name))]
    unwritten += [name for name in buffers if _is_sentinel(model.get_buffer(name))]
    if unwritten:
        raise RuntimeError(
            f"the model's _init_weights left {len(unwritten)} tensors unwritten: {first_keys(unwritten)}"
        )
    for name in fresh:
        param = model.get_parameter(name)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return fresh


def _sentinel(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose every element marks 'never written': NaN, or the smallest integer."""
    if dtype.is_floating_point or dtype.is_complex:
        return torch.full(shape, float("nan"), dtype=dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype)
    return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype)


def _is_sentinel(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0 or tensor.dtype == torch.bool:
        return False
    if tensor.is_floating_point() or tensor.is_complex():
        return bool(torch.isnan(tensor).any())
    return bool((tensor == torch.iinfo(tensor.dtype).min).any())


def build_pretrained(
    config: CosConfig,
    vision_path: str | Path | None = None,
    text_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    vocab_size: int | None = None,
    seed: int | None = None,
) -> tuple[CosForConditionalGeneration, dict[str, LoadReport]]:
    """The Chain-of-Sight model, built lean: on the meta device, then the ViT from `vision_path` and
    the LLM from `text_path` (checkpoint tensors cast to `dtype`, never copied twice), and the bridge
    (resampler + projector) plus any part without a path initialised once with the model's own init
    (after `torch.manual_seed(seed)` when `seed` is given); non-persistent buffers recomputed.

    The LLM vocabulary is `max(text_config.vocab_size, checkpoint rows, vocab_size)`: pass
    `len(tokenizer)` as `vocab_size`; it never shrinks. The returned model's config records the final
    size. Returns `(model, reports)`, `reports` mapping "vision_tower" / "language_model" to the
    `LoadReport` of each loaded part.

    Raises `CheckpointMismatchError` when a checkpoint does not fit (see `load_vision_tower`,
    `load_language_model`).
    """
    config = copy.deepcopy(config)
    with torch.device("meta"):
        model = CosForConditionalGeneration(config)
    rows = config.text_config.vocab_size
    if text_path is not None:
        rows = max(rows, checkpoint_vocab_size(text_path, model.language_model))
    if vocab_size is not None:
        rows = max(rows, vocab_size)
    if rows != config.text_config.vocab_size:
        config.text_config.vocab_size = rows
        with torch.device("meta"):
            model = CosForConditionalGeneration(config)
    reports = {}
    if vision_path is not None:
        reports["vision_tower"] = load_vision_tower(model.vision_tower, vision_path, dtype)
    if text_path is not None:
        reports["language_model"] = load_language_model(model.language_model, text_path, dtype)
    if seed is not None:
        torch.manual_seed(seed)
    materialize(model, dtype)
    return model, reports


def build_vision_tower(
    folder: str | Path,
    num_blocks: int | None = None,
    *,
    config: CLIPVisionConfig | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[CosVisionTower, LoadReport]:
    """A `CosVisionTower` with `num_blocks` blocks (default: all of `config`), built on the meta device
    and loaded from `folder` with `load_vision_tower`; `config` defaults to the folder's vision config.
    Raises `CheckpointMismatchError`."""
    folder = Path(folder)
    if config is None:
        if not (folder / "config.json").is_file():
            raise CheckpointMismatchError(f"{folder}: no config.json to build the vision tower from")
        config = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        tower = CosVisionTower(config, num_blocks=num_blocks)
    report = load_vision_tower(tower, folder, dtype)
    materialize(tower, dtype or torch.float32)
    return tower.eval(), report
