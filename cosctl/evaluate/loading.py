"""The model `cosctl eval` evaluates, from any artefact the pipeline writes, through the store
abstraction (a local path, file:// or s3://):

    finetune run output  <uri>/adapter/ (published, peft)  -> its base (`cosctl_source.json`) + the adapter, merged
    published adapter    <uri>/ = an adapter folder        -> the same
    pretrain/inflate run <uri>/model/ (published)          -> that model
    published model      <uri>/ with manifest.json         -> that model
    export / HF folder   a local folder with config.json   -> that model (`cosctl export` output)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import MANIFEST, fetch_published
from ..data import load_tokenizer
from ..errors import StorageError
from ..stages import SOURCE_RECORD, fetch_model
from ..storage import StoreSettings, open_store

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedModel:
    """A model ready for generation, its tokenizer, and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    kind: str  # "adapter" (merged into its base) or "model"
    base_model: str | None = None


def adapter_prefix(source: str, settings: StoreSettings | None = None) -> str | None:
    """The key prefix of the published adapter `source` holds ("adapter" or "" for an adapter folder
    itself), or None when it holds no adapter."""
    store = open_store(source, settings)
    if store.size(f"adapter/{MANIFEST}") is not None:
        return "adapter"
    if store.size(MANIFEST) is not None and store.size(ADAPTER_CONFIG) is not None:
        return ""
    return None


def check_source(source: str, settings: StoreSettings | None = None) -> None:
    """Raise a one-line `StorageError` unless `source` holds something `load_for_eval` can read; cheap
    (a few size look-ups), so the CLI checks before it starts ranks."""
    if adapter_prefix(source, settings) is not None:
        return
    store = open_store(source, settings)
    if any(store.size(key) is not None for key in (f"model/{MANIFEST}", MANIFEST, "config.json")):
        return
    raise StorageError(
        f"{source}: holds no model to evaluate (expected adapter/ or model/ with {MANIFEST}, "
        f"a published folder, or an exported model folder with config.json)"
    )


@dataclass(frozen=True)
class Fetched:
    """Local folders of a fetched artefact: the model (for an adapter: its base) and the adapter."""

    source: str
    model_dir: Path
    adapter_dir: Path | None = None
    base_model: str | None = None


def fetch_for_eval(source: str, scratch: Path, settings: StoreSettings | None = None) -> Fetched:
    """Fetch the artefact `source` names into `scratch`, each file verified against its manifest (a
    local model folder without one is read where it is)."""
    scratch = Path(scratch)
    prefix = adapter_prefix(source, settings)
    if prefix is None:
        return Fetched(source, fetch_model(source, settings, scratch / "model"))
    adapter = fetch_published(open_store(source, settings), prefix, scratch / "adapter")
    record = adapter / SOURCE_RECORD
    if not record.is_file():
        raise StorageError(f"{source}: the adapter has no {SOURCE_RECORD} naming its base model")
    base_uri = json.loads(record.read_text())["base_model"]
    return Fetched(source, fetch_model(base_uri, settings, scratch / "base"), adapter, base_uri)


def load_fetched(fetched: Fetched, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model in eval mode and its tokenizer; an adapter is applied to its base with peft and merged
    (`merge_and_unload`)."""
    from peft import PeftModel

    from cos_model import CosForConditionalGeneration

    model = CosForConditionalGeneration.from_pretrained(fetched.model_dir, dtype=dtype)
    if fetched.adapter_dir is None:
        return LoadedModel(model.eval(), load_tokenizer(fetched.model_dir), fetched.source, "model")
    merged = PeftModel.from_pretrained(model, fetched.adapter_dir).merge_and_unload()
    return LoadedModel(
        merged.eval(), load_tokenizer(fetched.adapter_dir), fetched.source, "adapter", fetched.base_model
    )


def load_for_eval(
    source: str, scratch: Path, *, dtype: torch.dtype = torch.float32, settings: StoreSettings | None = None
) -> LoadedModel:
    """`fetch_for_eval` then `load_fetched`: the model `source` names, files under `scratch`."""
    return load_fetched(fetch_for_eval(source, scratch, settings), dtype)
