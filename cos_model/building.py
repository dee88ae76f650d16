"""The lean build of the Chain-of-Sight model (`build_pretrained`) and of a vision tower alone
(`build_vision_tower`).

It builds the whole model on the meta device and materialises each part once: the ViT
and the LLM as the checkpoint tensors themselves (cast to the run dtype), everything without a
checkpoint with the model's own `_init_weights`, the non-persistent buffers (rotary `inv_freq`, CLIP
`position_ids`) recomputed. No weight is initialised and then overwritten, and host memory peaks at
about one copy of the model.

Partitioned (`partition`, a `Partitioner`: e.g. one that makes DeepSpeed ZeRO-3 parameters), each
parameter is handed over one at a time with a reader of flat ranges of it, so a rank reads from the
checkpoint files only the elements it keeps; only the tensors without a checkpoint (the bridge) are
initialised whole first, by the same init under the same seed (`materialize_partitioned`).

Loading and checking the checkpoints themselves is `cos_model.loading`'s.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import CLIPVisionConfig, PreTrainedModel

from .checkpoint_files import Checkpoint, CheckpointMismatchError, first_keys
from .configuration import CosConfig
from .loading import (
    LoadReport,
    TensorSource,
    checkpoint_vocab_size,
    load_language_model,
    load_vision_tower,
    parameter_groups,
    plan_language_model,
    plan_vision_tower,
    set_tensor,
)
from .modeling import CosForConditionalGeneration
from .vision import CosVisionTower

FlatReader = Callable[[int, int, torch.Tensor], torch.Tensor]


class Partitioner(Protocol):
    """Makes the parameter that stands for one whole tensor on this rank (see `materialize_partitioned`)."""

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype, read: FlatReader) -> nn.Parameter | None:
        """The parameter for tensor `name` of `shape` and `dtype`, holding only this rank's part, filled
        by `read(start, stop, out)` (writes elements start:stop of the tensor flattened row-major into
        `out`, a 1-D tensor of that many elements, and returns it); or None to keep this tensor whole."""


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


def materialize_partitioned(
    model: PreTrainedModel,
    sources: dict[str, TensorSource],
    dtype: torch.dtype | None,
    partition: Partitioner,
    seed: int | None = None,
) -> list[str]:
    """Give every parameter of `model` (built on the meta device) the form `partition` makes of it, one
    parameter at a time in registration order (tied names share one), and return the names of those the
    model's init wrote.

    A tensor named in `sources` (one name per tied group, as `cos_model.loading`'s plans give them) is
    never read whole unless `partition` keeps it whole: its reader reads only the range asked for, cast
    to `dtype` (None: as stored). Persistent buffers in `sources` are assigned whole. Every other
    tensor is initialised as `materialize` does (after `torch.manual_seed(seed)` when given), whole,
    and then handed over: the model's init sees the same tensors in the same order as without
    partitioning, so the values are the same.
    """
    groups = parameter_groups(model)
    loaded = {group[0]: next((n for n in group if n in sources), None) for group in groups}
    for group in groups:
        key = loaded[group[0]]
        if key is not None:  # a stand-in with the shape and no storage: the init skips initialised tensors
            old = model.get_parameter(group[0])
            stand_in = nn.Parameter(torch.empty((), dtype=sources[key].dtype(dtype)).expand(old.shape))
            stand_in.requires_grad_(old.requires_grad)
            for name in group:
                set_tensor(model, name, stand_in)
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    for name in [name for name in sources if name in buffers]:
        tensor = sources[name].read(dtype)
        tensor._is_hf_initialized = True
        set_tensor(model, name, tensor)
    if seed is not None:
        torch.manual_seed(seed)
    fresh = materialize(model, dtype or torch.float32)
    for group in groups:
        param, key = model.get_parameter(group[0]), loaded[group[0]]
        if key is not None:
            read = functools.partial(_read_source, sources[key], dtype)
        else:
            read = functools.partial(_flat_range, param.detach())
        placed = partition(group[0], param.shape, param.dtype, read)
        if placed is None:
            placed = param if key is None else nn.Parameter(sources[key].read(dtype))
        placed.requires_grad_(param.requires_grad)
        placed._is_hf_initialized = True
        for name in group:
            set_tensor(model, name, placed)
    return fresh


def _read_source(
    source: TensorSource, dtype: torch.dtype | None, start: int, stop: int, out: torch.Tensor
) -> torch.Tensor:
    return source.read_flat(start, stop, dtype, out)


def _flat_range(tensor: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(tensor.reshape(-1)[start:stop])


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
    partition: Partitioner | None = None,
) -> tuple[CosForConditionalGeneration, dict[str, LoadReport]]:
    """The Chain-of-Sight model, built lean: on the meta device, then the ViT from `vision_path` and
    the LLM from `text_path` (checkpoint tensors cast to `dtype`, never copied twice), and the bridge
    (resampler + projector) plus any part without a path initialised once with the model's own init
    (after `torch.manual_seed(seed)` when `seed` is given); non-persistent buffers recomputed.

    The LLM vocabulary is `max(text_config.vocab_size, checkpoint rows, vocab_size)`: pass
    `len(tokenizer)` as `vocab_size`; it never shrinks. The returned model's config records the final
    size. Returns `(model, reports)`, `reports` mapping "vision_tower" / "language_model" to the
    `LoadReport` of each loaded part.

    With `partition`, every parameter is what it makes of the tensor (`materialize_partitioned`): the
    loaded ones read range by range, never whole; the values are those of the unpartitioned build.

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
    if partition is None:
        if vision_path is not None:
            reports["vision_tower"] = load_vision_tower(model.vision_tower, vision_path, dtype)
        if text_path is not None:
            reports["language_model"] = load_language_model(model.language_model, text_path, dtype)
        if seed is not None:
            torch.manual_seed(seed)
        materialize(model, dtype)
        return model, reports
    with ExitStack() as files:
        sources: dict[str, TensorSource] = {}
        for part, path, plan in (
            ("vision_tower", vision_path, plan_vision_tower),
            ("language_model", text_path, plan_language_model),
        ):
            if path is not None:
                checkpoint = files.enter_context(Checkpoint(path))
                part_sources, reports[part] = plan(model.get_submodule(part), path, checkpoint)
                sources.update({f"{part}.{name}": source for name, source in part_sources.items()})
        materialize_partitioned(model, sources, dtype, partition, seed)
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
