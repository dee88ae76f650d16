"""Pretrained weights into the Chain-of-Sight model, exactly or not at all.

transformers 5 renames checkpoint keys through conversion mappings looked up by model class name:
`CLIPVisionModel` strips the `vision_model.` prefix of a CLIP checkpoint, a subclass such as
`CosVisionTower` gets no mapping, matches no key and keeps its random init without an error. This
module does not rely on any such mapping. It reads a local Hugging Face folder tensor by tensor
(`cos_model.checkpoint_files.Checkpoint`), maps the keys itself, checks every required key and shape, and raises
`CheckpointMismatchError` naming the folder and the first offending keys when anything does not fit.

Vocabulary rule: the LLM's embedding (and untied output head) has `max(checkpoint rows, vocab_size)`
rows, where `vocab_size` is `len(tokenizer)` after `<image>` was added: it grows, never shrinks. The
checkpoint rows are copied untouched; each new row is the mean of the checkpoint rows (computed in
float64), as LLaVA initialises the embeddings of the tokens it adds.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionConfig, PreTrainedModel

from .checkpoint_files import Checkpoint, CheckpointMismatchError, first_keys, read_checkpoint
from .vision import CosVisionTower, resize_position_embedding

logger = logging.getLogger(__name__)

# Buffers older checkpoints stored and current models recompute (transformers drops them the same way).
STALE_BUFFERS = re.compile(r"(rotary_emb\.inv_freq$|(^|\.)position_ids$)")
# The parts of a `CLIPModel` checkpoint the vision tower never uses.
CLIP_NOT_VISION = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)")
# Inside the vision model: the post-LN (only feeds the pooled output) and the blocks past the last built one.
VISION_POST_LN = re.compile(r"^post_layernorm\.")
VISION_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
VISION_PREFIX = "vision_model."
POSITION_TABLE = "embeddings.position_embedding.weight"

# Config fields the weights were trained with that tensor shapes do not reveal.
VISION_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
)
TEXT_ARCH_FIELDS = (
    "model_type",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "tie_word_embeddings",
)


@dataclass
class LoadReport:
    """What loading one folder did. `loaded`: the module's keys filled from the checkpoint;
    `unexpected`: checkpoint keys that fit nothing and are not deliberately left out; `messages`: one
    line per notable event (a resized position table, a grown vocabulary, unexpected keys)."""

    folder: str
    loaded: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        self.messages.append(message)
        logger.info("%s: %s", self.folder, message)


@dataclass(frozen=True)
class TensorSource:
    """Where one model tensor's values come from: `key` of an open `checkpoint`, as stored or through
    `make(stored tensor, dtype)` (a tensor computed whole from the stored one: grown rows, a resized
    position table). Floating tensors are cast to the `dtype` a read asks for (None keeps the stored one)."""

    checkpoint: Checkpoint
    key: str
    make: Callable[[torch.Tensor, torch.dtype | None], torch.Tensor] | None = None

    def dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """The dtype a read with `dtype` returns (from the file header)."""
        stored = self.checkpoint.dtype(self.key)
        return dtype if dtype is not None and stored.is_floating_point else stored

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor."""
        if self.make is None:
            return self.checkpoint.tensor(self.key, dtype)
        return self.make(self.checkpoint.tensor(self.key), dtype)

    def read_flat(
        self, start: int, stop: int, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Elements `start:stop` of the flattened tensor (into `out` when given, as `Checkpoint.flat`);
        of a stored tensor only those are read (a computed one is made whole first)."""
        if self.make is None:
            return self.checkpoint.flat(self.key, start, stop, dtype, out)
        part = self.read(dtype).reshape(-1)[start:stop]
        return part if out is None else out.copy_(part)


def read_sources(sources: dict[str, TensorSource], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every source read whole, one checkpoint shard after another ({name: tensor})."""
    values = {}
    for checkpoint in {id(s.checkpoint): s.checkpoint for s in sources.values()}.values():
        name_of = {source.key: name for name, source in sources.items() if source.checkpoint is checkpoint}
        for key in checkpoint.in_shard_order(name_of):
            values[name_of[key]] = sources[name_of[key]].read(dtype)
    return values


# ----------------------------------------------------------------------------------- module surgery


def parameter_groups(module: nn.Module) -> list[list[str]]:
    """Parameter names grouped by tensor (tied weights share one group), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(groups.values())


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer")


def _assign(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Make `values` the module's tensors (no copy); tied parameters get the same new parameter.
    `values` holds one name per tied group; every tensor is marked as initialised."""
    group_of = {name: group for group in parameter_groups(module) for name in group}
    for name, tensor in values.items():
        if name in group_of:
            new = nn.Parameter(tensor, requires_grad=module.get_parameter(name).requires_grad)
            new._is_hf_initialized = True
            for alias in group_of[name]:
                set_tensor(module, alias, new)
        else:
            tensor._is_hf_initialized = True
            set_tensor(module, name, tensor)


def _expected(module: nn.Module) -> tuple[dict[str, torch.Size], dict[str, list[str]]]:
    """Shapes of the persistent state (one name per tied group), and each name's tied aliases."""
    state = module.state_dict(keep_vars=True)
    groups = {name: group for group in parameter_groups(module) for name in group}
    shapes, aliases = {}, {}
    for name, tensor in state.items():
        group = groups.get(name, [name])
        if group[0] != name and group[0] in state:
            continue
        shapes[name] = tensor.shape
        aliases[name] = [n for n in group if n != name and n in state]
    return shapes, aliases


def _match_keys(shapes: dict, aliases: dict[str, list[str]], checkpoint) -> tuple[dict[str, str], set[str]]:
    """({model tensor name: the first of its name and tied aliases the checkpoint holds}, every key the
    model has a place for)."""
    source: dict[str, str] = {}
    for name in shapes:
        found = [key for key in [name, *aliases[name]] if key in checkpoint]
        if found:
            source[name] = found[0]
    return source, {key for name in shapes for key in [name, *aliases[name]]}


def _check_architecture(folder: Path, source: object, target: object, fields: tuple[str, ...], what: str) -> None:
    differing = [
        f"{name}={getattr(source, name)!r} (model has {getattr(target, name)!r})"
        for name in fields
        if hasattr(source, name) and hasattr(target, name) and getattr(source, name) != getattr(target, name)
    ]
    if differing:
        raise CheckpointMismatchError(f"{folder}: the {what} checkpoint's config differs: {first_keys(differing)}")


def _raise_mismatch(folder: Path, what: str, missing: list[str], mismatched: list[str]) -> None:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {first_keys(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {first_keys(mismatched)}")
    if parts:
        raise CheckpointMismatchError(f"{folder}: cannot load the {what} exactly: " + "; ".join(parts))


# ------------------------------------------------------------------------------------- vision tower


def load_vision_tower(tower: CosVisionTower, folder: str | Path, dtype: torch.dtype | None = None) -> LoadReport:
    """Assign a CLIP checkpoint's vision weights to `tower` (usually built on the meta device).

    Accepts a `CLIPModel` folder and a `CLIPVisionModel` one, with (transformers 4) or without
    (transformers 5) the `vision_model.` prefix. Required: the embeddings, the pre-LN and the tower's
    blocks 0..num_blocks-1. Left out on purpose: the text tower, both projections, `logit_scale`, the
    post-LN, the blocks past the tower's last and stale `position_ids` buffers; any other key is
    reported as unexpected. A position table for another image size is resized with
    `resize_position_embedding` (reported). Floating tensors are cast to `dtype` when given.

    Raises `CheckpointMismatchError` for a missing key, a shape mismatch or a vision config that
    differs in a field the shapes do not show (heads, activation, LN epsilon).
    """
    with Checkpoint(folder) as checkpoint:
        sources, report = plan_vision_tower(tower, folder, checkpoint)
        _assign(tower, read_sources(sources, dtype))
    return report


def plan_vision_tower(
    tower: CosVisionTower, folder: str | Path, checkpoint: Checkpoint
) -> tuple[dict[str, TensorSource], LoadReport]:
    """`load_vision_tower`'s checks, reading file headers only: {tower tensor name: its source in the
    open `checkpoint` of `folder`} and the report. Raises `CheckpointMismatchError` as it does."""
    folder = Path(folder)
    report = LoadReport(str(folder))
    if (folder / "config.json").is_file():
        source_config = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)
        _check_architecture(folder, source_config, tower.config, VISION_ARCH_FIELDS, "vision")
    shapes, _ = _expected(tower)
    keys = checkpoint.keys()
    prefixed = any(key.startswith(VISION_PREFIX) for key in keys)
    bare = any(key.startswith(("embeddings.", "encoder.", "pre_layrnorm.")) for key in keys)
    if prefixed and bare:
        raise CheckpointMismatchError(
            f"{folder}: vision keys both with and without the '{VISION_PREFIX}' prefix; cannot tell which to load"
        )
    prefix = VISION_PREFIX if prefixed else ""
    source: dict[str, str] = {}  # tower key -> checkpoint key
    for key in keys:
        if not key.startswith(prefix):
            if not CLIP_NOT_VISION.search(key):
                report.unexpected.append(key)
            continue
        name = key[len(prefix) :]
        layer = VISION_LAYER.match(name)
        if name in shapes:
            source[name] = key
        elif CLIP_NOT_VISION.search(key) or VISION_POST_LN.match(name) or STALE_BUFFERS.search(name):
            continue
        elif layer and int(layer.group(1)) >= tower.num_blocks:
            continue
        else:
            report.unexpected.append(key)
    missing = [f"{prefix}{name}" for name in shapes if name not in source]
    mismatched, resize_to = [], None
    for name, key in source.items():
        shape = checkpoint.shape(key)
        if shape == shapes[name]:
            continue
        resizable = _square_table(shape) and _square_table(shapes[name]) and shape[1:] == shapes[name][1:]
        if name == POSITION_TABLE and resizable:
            resize_to = _square_table(shapes[name])
            continue
        mismatched.append(f"{key} {tuple(shape)} vs {tuple(shapes[name])}")
    _raise_mismatch(folder, "vision tower", missing, mismatched)
    sources = {name: TensorSource(checkpoint, key) for name, key in source.items()}
    if resize_to is not None:
        old = _square_table(checkpoint.shape(source[POSITION_TABLE]))
        sources[POSITION_TABLE] = TensorSource(
            checkpoint,
            source[POSITION_TABLE],
            lambda table, dtype: resize_position_embedding(table, resize_to).to(dtype or table.dtype),
        )
        report.note(
            f"position table resized from {old}x{old} to {resize_to}x{resize_to} patches "
            "(bicubic, align_corners=True, CLS row kept)"
        )
    report.loaded = sorted(sources)
    _note_unexpected(report)
    return sources, report


def _note_unexpected(report: LoadReport) -> None:
    if report.unexpected:
        message = f"{len(report.unexpected)} unexpected keys not loaded: {first_keys(report.unexpected)}"
        report.messages.append(message)
        logger.warning("%s: %s", report.folder, message)


def _square_table(shape: torch.Size) -> int | None:
    """Patches per side of a (1 + G*G, C) position table, or None."""
    if len(shape) != 2:
        return None
    grid = int(round((shape[0] - 1) ** 0.5))
    return grid if grid >= 1 and grid * grid + 1 == shape[0] else None


# ------------------------------------------------------------------------------------ language model


def _embedding_names(model: PreTrainedModel) -> tuple[str | None, str | None]:
    """State-dict names of the input embedding and of an untied output head (None where absent)."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    inputs = model.get_input_embeddings()
    outputs = model.get_output_embeddings()
    input_name = by_id.get(id(inputs.weight)) if inputs is not None else None
    output_name = None
    if outputs is not None and outputs.weight is not (inputs.weight if inputs is not None else None):
        output_name = by_id.get(id(outputs.weight))
    return input_name, output_name


def checkpoint_vocab_size(folder: str | Path, model: PreTrainedModel) -> int:
    """Rows of the input embedding in `folder`'s checkpoint (read from the header only)."""
    input_name, _ = _embedding_names(model)
    with Checkpoint(folder) as checkpoint:
        if input_name not in checkpoint:
            raise CheckpointMismatchError(f"{folder}: no input embedding {input_name} in the checkpoint")
        return checkpoint.shape(input_name)[0]


def grow_rows(source: torch.Tensor, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`source` (V, ...) extended to `rows` >= V rows: rows 0..V-1 untouched, each new row the mean of
    the source rows (computed in float64). Raises `ValueError` if `rows` < V (never shrinks)."""
    dtype = dtype or source.dtype
    if rows < source.shape[0]:
        raise ValueError(f"embedding: cannot shrink {source.shape[0]} rows to {rows}")
    out = torch.empty((rows, *source.shape[1:]), dtype=dtype)
    out[: source.shape[0]] = source
    if rows > source.shape[0]:
        out[source.shape[0] :] = source.double().mean(dim=0).to(dtype)
    return out


def load_language_model(model: PreTrainedModel, folder: str | Path, dtype: torch.dtype | None = None) -> LoadReport:
    """Assign a causal-LM checkpoint (single file or sharded) to `model` (usually built on the meta
    device), key for key: the folder must hold the same architecture (`LlamaForCausalLM` for a Llama
    or Vicuna folder). Tied weights may be stored under either name. When the model's vocabulary is
    larger than the checkpoint's (an added `<image>` token), the embedding and untied head grow with
    `grow_rows`. Stale `rotary_emb.inv_freq` / `position_ids` buffers are skipped; other extra keys are
    reported as unexpected. Floating tensors are cast to `dtype` when given.

    Raises `CheckpointMismatchError` for a missing key, a shape mismatch (including a checkpoint with
    more vocabulary rows than the model: build the model with at least that many) or a config that
    differs in a field the shapes do not show.
    """
    with Checkpoint(folder) as checkpoint:
        sources, report = plan_language_model(model, folder, checkpoint)
        _assign(model, read_sources(sources, dtype))
    return report


def plan_language_model(
    model: PreTrainedModel, folder: str | Path, checkpoint: Checkpoint
) -> tuple[dict[str, TensorSource], LoadReport]:
    """`load_language_model`'s checks, reading file headers only: {model tensor name: its source in the
    open `checkpoint` of `folder`} and the report. Raises `CheckpointMismatchError` as it does."""
    folder = Path(folder)
    report = LoadReport(str(folder))
    if (folder / "config.json").is_file():
        source_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        _check_architecture(folder, source_config, model.config, TEXT_ARCH_FIELDS, "language model")
    shapes, aliases = _expected(model)
    growable = [name for name in _embedding_names(model) if name is not None]
    source, known = _match_keys(shapes, aliases, checkpoint)
    report.unexpected = [key for key in checkpoint.keys() if key not in known and not STALE_BUFFERS.search(key)]
    missing = [name for name in shapes if name not in source]
    mismatched, grow = [], {}
    for name, key in source.items():
        shape = checkpoint.shape(key)
        if shape == shapes[name]:
            continue
        if name in growable and shape[1:] == shapes[name][1:] and shape[0] < shapes[name][0]:
            grow[name] = shape[0]
            continue
        mismatched.append(f"{key} {tuple(shape)} vs {tuple(shapes[name])}")
    _raise_mismatch(folder, "language model", missing, mismatched)
    sources = {}
    for name, key in source.items():
        if name in grow:
            rows = shapes[name][0]
            sources[name] = TensorSource(
                checkpoint, key, lambda stored, dtype, rows=rows: grow_rows(stored, rows, dtype)
            )
            report.note(f"{name} grown from {grow[name]} to {rows} rows (new rows = mean of the checkpoint rows)")
        else:
            sources[name] = TensorSource(checkpoint, key)
    report.loaded = sorted(sources)
    _note_unexpected(report)
    return sources, report


__all__ = [
    "Checkpoint",
    "CheckpointMismatchError",
    "LoadReport",
    "checkpoint_vocab_size",
    "grow_rows",
    "TensorSource",
    "load_language_model",
    "load_vision_tower",
    "plan_language_model",
    "plan_vision_tower",
    "read_checkpoint",
]
