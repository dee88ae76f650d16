"""Folders this model was saved to, loaded exactly or not at all: a Chain-of-Sight model folder
(`save_pretrained`: config.json + weights) and a peft adapter folder on it.

`CosForConditionalGeneration.from_pretrained` only warns about a missing key and initialises it at random,
and `PeftModel.from_pretrained` only warns about a missing adapter key (a missing `modules_to_save` one
not even that). Here every persistent tensor of the model comes from the folder, with its shape, and every
stored tensor has a place in the model; anything else raises `CheckpointMismatchError`, one line naming
the folder and the first offending keys. The checks read only the files' headers, so a caller can check a
folder without loading it (`check_model_folder`).

    check_model_folder(folder)          -> CosConfig                 keys and shapes, no tensor read
    load_model_folder(folder, dtype)    -> CosForConditionalGeneration  built on meta, tensors assigned
                                           (or partitioned, `partition`: read range by range)
    load_adapter(model, folder)         -> peft.PeftModel            the adapter's keys and shapes checked first
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .building import Partitioner, materialize, materialize_partitioned
from .checkpoint_files import Checkpoint, CheckpointMismatchError, first_keys
from .configuration import CosConfig
from .loading import STALE_BUFFERS, TensorSource, _assign, _expected, _match_keys, _raise_mismatch, read_sources
from .modeling import CosForConditionalGeneration

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_config(folder: str | Path) -> CosConfig:
    """The folder's `CosConfig`; a folder without one (or with another model's) raises
    `CheckpointMismatchError`."""
    folder = Path(folder)
    path = folder / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise CheckpointMismatchError(f"{folder}: no readable config.json ({type(err).__name__})") from None
    if model_type != CosConfig.model_type:
        raise CheckpointMismatchError(
            f"{folder}: config.json is a {model_type!r} model, not a Chain-of-Sight one ({CosConfig.model_type!r})"
        )
    return CosConfig.from_pretrained(folder, local_files_only=True)


def _plan(folder: Path, model: CosForConditionalGeneration, checkpoint: Checkpoint) -> dict[str, str]:
    """{model tensor name: checkpoint key} for every persistent tensor, or `CheckpointMismatchError`
    for a missing key, a shape mismatch or a stored key the model has no place for."""
    shapes, aliases = _expected(model)
    source, known = _match_keys(shapes, aliases, checkpoint)
    missing = [name for name in shapes if name not in source]
    mismatched = [
        f"{key} {tuple(checkpoint.shape(key))} vs {tuple(shapes[name])}"
        for name, key in source.items()
        if checkpoint.shape(key) != shapes[name]
    ]
    _raise_mismatch(folder, "model", missing, mismatched)
    unexpected = [key for key in checkpoint.keys() if key not in known and not STALE_BUFFERS.search(key)]
    if unexpected:
        raise CheckpointMismatchError(
            f"{folder}: {len(unexpected)} stored keys this model has no place for (another model's folder?): "
            f"{first_keys(unexpected)}"
        )
    return source


def check_model_folder(folder: str | Path) -> CosConfig:
    """Check that `folder` holds exactly the weights of the model its config.json describes (keys and
    shapes, from the file headers) and return that config. Raises `CheckpointMismatchError`."""
    folder = Path(folder)
    config = read_config(folder)
    with torch.device("meta"):
        model = CosForConditionalGeneration(config)
    with Checkpoint(folder) as checkpoint:
        _plan(folder, model, checkpoint)
    return config


def load_model_folder(
    folder: str | Path, dtype: torch.dtype | None = None, partition: Partitioner | None = None
) -> CosForConditionalGeneration:
    """The model saved in `folder`, in eval mode: built on the meta device, every persistent tensor
    assigned from the checkpoint (floating ones cast to `dtype`; None keeps the stored dtype), the
    non-persistent buffers recomputed. With `partition`, each parameter is what it makes of its tensor,
    read range by range (`cos_model.building.materialize_partitioned`). Raises
    `CheckpointMismatchError` before any tensor is read when a key is missing, mis-shaped or has no
    place in the model."""
    folder = Path(folder)
    config = read_config(folder)
    with torch.device("meta"):
        model = CosForConditionalGeneration(config)
    with Checkpoint(folder) as checkpoint:
        sources = {name: TensorSource(checkpoint, key) for name, key in _plan(folder, model, checkpoint).items()}
        if partition is None:
            values = read_sources(sources, dtype)
            _assign(model, values)
            stored = next((v.dtype for v in values.values() if v.is_floating_point()), torch.float32)
            materialize(model, dtype or stored)  # only the non-persistent buffers are left on meta
        else:
            materialize_partitioned(model, sources, dtype, partition)
    model.name_or_path = model.config._name_or_path = str(folder)
    return model.eval()


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from peft.utils import load_peft_weights

    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise CheckpointMismatchError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} in the adapter folder")
    return load_peft_weights(str(folder), device="cpu")


def load_adapter(model: torch.nn.Module, folder: str | Path):
    """`model` wrapped in peft's `PeftModel` with the adapter saved in `folder`, for inference (nothing
    trainable). Before loading, the adapter's stored keys and shapes must equal those peft gives the
    model for this adapter config (LoRA matrices and `modules_to_save`): a truncated adapter, one with a
    mis-shaped tensor or one made for another model raises `CheckpointMismatchError`. `model` is
    modified in place (peft injects the LoRA layers)."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise CheckpointMismatchError(f"{folder}: no {ADAPTER_CONFIG}; not a peft adapter folder")
    stored = _adapter_weights(folder)
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    peft_model = PeftModel(model, config)
    expected = {key: value.shape for key, value in get_peft_model_state_dict(peft_model).items()}
    missing = [key for key in expected if key not in stored]
    mismatched = [
        f"{key} {tuple(stored[key].shape)} vs {tuple(shape)}"
        for key, shape in expected.items()
        if key in stored and stored[key].shape != shape
    ]
    _raise_mismatch(folder, "adapter", missing, mismatched)
    unexpected = [key for key in stored if key not in expected]
    if unexpected:
        raise CheckpointMismatchError(
            f"{folder}: {len(unexpected)} adapter keys the model has no place for (an adapter of another "
            f"model?): {first_keys(unexpected)}"
        )
    result = set_peft_model_state_dict(peft_model, stored)
    if result.unexpected_keys:  # every key was checked above; peft disagreeing is a bug, not the user's
        raise RuntimeError(f"{folder}: peft did not place {first_keys(result.unexpected_keys)}")
    return peft_model.eval()


__all__ = ["check_model_folder", "load_adapter", "load_model_folder", "read_config"]
