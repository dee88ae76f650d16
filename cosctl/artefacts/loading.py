"""The model `cosctl eval` (and `cosctl export`) reads, from any artefact the pipeline writes, through
the store abstraction (a local path, file:// or s3://):

    finetune run output  <uri>/adapter/ (published, peft)  -> its base (`cosctl_source.json`) + the adapter, merged
    published adapter    <uri>/ = an adapter folder        -> the same
    pretrain/inflate run <uri>/model/ (published)          -> that model
    published model      <uri>/ with manifest.json         -> that model
    export / HF folder   a local folder with config.json   -> that model (`cosctl export` output)

Every load is exact (`cos_model.saved`): a model folder with a missing, mis-shaped or foreign key and an
adapter that does not fit its base are refused in one line naming the folder and the first keys. An
adapter's base must be the one it was trained on (`cosctl.artefacts.published.check_adapter_base`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.layout import MANIFEST, fetch_published
from ..common.errors import CheckpointError, StorageError
from ..data.records import load_tokenizer
from ..storage import ObjectNotFound, StoreSettings, open_store
from .published import SOURCE_RECORD, check_adapter_base, fetch_model, published_manifest, read_source_record

ADAPTER_CONFIG = "adapter_config.json"


def load_model_folder(model_dir: str, dtype: torch.dtype | str = torch.float32, partition=None):
    """A Chain-of-Sight model folder (a published `model/`, an export), every tensor loaded exactly
    (`cos_model.saved`; `dtype="auto"` keeps the stored dtype; `partition`: each rank only its part) or
    one `CheckpointError` naming the folder and the first missing, mis-shaped or foreign keys:
    transformers' `from_pretrained` only logs missing keys and initialises them at random."""
    from cos_model.checkpoint_files import CheckpointMismatchError
    from cos_model.saved import load_model_folder as load_exactly

    try:
        return load_exactly(model_dir, None if dtype == "auto" else dtype, partition)
    except CheckpointMismatchError as err:
        raise CheckpointError(str(err)) from None


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
    """Raise a one-line `UserError` unless `source` holds something `load_for_eval` can read (an
    adapter: on the base it was trained on); cheap (a few small reads), so the CLI checks before it
    starts ranks."""
    prefix = adapter_prefix(source, settings)
    if prefix is not None:
        store = open_store(source, settings)
        key = f"{prefix}/{SOURCE_RECORD}" if prefix else SOURCE_RECORD
        try:
            record = read_source_record(store.get_bytes(key), f"{store.uri}/{key}")
        except ObjectNotFound:
            raise StorageError(f"{source}: the adapter has no {SOURCE_RECORD} naming its base model") from None
        check_adapter_base(source, record, published_manifest(record["base_model"], settings))
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

    def named(self, err: Exception) -> CheckpointError:
        """`err` as a `CheckpointError` that names the URIs the user gave, not the scratch folders."""
        message = str(err).replace(str(self.model_dir), self.base_model or self.source)
        if self.adapter_dir is not None:
            message = message.replace(str(self.adapter_dir), self.source)
        return CheckpointError(message)


def fetch_for_eval(source: str, scratch: Path, settings: StoreSettings | None = None) -> Fetched:
    """Fetch the artefact `source` names into `scratch`, each file verified against its manifest (a
    local model folder without one is read where it is); an adapter's base must be the one it was
    trained on."""
    scratch = Path(scratch)
    prefix = adapter_prefix(source, settings)
    if prefix is None:
        return Fetched(source, fetch_model(source, settings, scratch / "model"))
    adapter = fetch_published(open_store(source, settings), prefix, scratch / "adapter")
    path = adapter / SOURCE_RECORD
    if not path.is_file():
        raise StorageError(f"{source}: the adapter has no {SOURCE_RECORD} naming its base model")
    record = read_source_record(path.read_bytes(), f"{source}/{SOURCE_RECORD}")
    base_dir = fetch_model(record["base_model"], settings, scratch / "base")
    manifest = base_dir / MANIFEST
    check_adapter_base(source, record, manifest.read_bytes() if manifest.is_file() else None)
    return Fetched(source, base_dir, adapter, record["base_model"])


def check_model(fetched: Fetched) -> None:
    """Raise a one-line `CheckpointError` unless the fetched model folder holds exactly its model's
    weights (keys and shapes; no tensor is read)."""
    from cos_model.checkpoint_files import CheckpointMismatchError
    from cos_model.saved import check_model_folder

    try:
        check_model_folder(fetched.model_dir)
    except CheckpointMismatchError as err:
        raise fetched.named(err) from None


def load_fetched(fetched: Fetched, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model in eval mode and its tokenizer, loaded exactly; an adapter is applied to its base with
    peft (every adapter key checked) and merged (`merge_and_unload`). A folder that does not fit raises a
    one-line `CheckpointError`."""
    from cos_model.checkpoint_files import CheckpointMismatchError
    from cos_model.saved import load_adapter

    try:
        model = load_model_folder(str(fetched.model_dir), dtype)
        if fetched.adapter_dir is None:
            return LoadedModel(model, load_tokenizer(fetched.model_dir), fetched.source, "model")
        merged = load_adapter(model, fetched.adapter_dir).merge_and_unload()
    except (CheckpointError, CheckpointMismatchError) as err:
        raise fetched.named(err) from None
    return LoadedModel(
        merged.eval(), load_tokenizer(fetched.adapter_dir), fetched.source, "adapter", fetched.base_model
    )


def load_for_eval(
    source: str, scratch: Path, *, dtype: torch.dtype = torch.float32, settings: StoreSettings | None = None
) -> LoadedModel:
    """`fetch_for_eval` then `load_fetched`: the model `source` names, files under `scratch`."""
    return load_fetched(fetch_for_eval(source, scratch, settings), dtype)
