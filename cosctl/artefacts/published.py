"""The artefacts stages publish, as files: a `model/` folder (config, weights, tokenizer, and the code and
processor that let transformers load it alone) and a peft `adapter/` folder, which records the base it
was fine-tuned on; and finding a model folder from any URI a user gives (docs/design.md §6).

Published folders carry a manifest written last (`cosctl.checkpoint.layout.publish`), so a folder with a
manifest is complete. An adapter records its base: the URI and the sha256 of the base's manifest
(`SOURCE_RECORD`); whoever loads it checks the base is still that one (`check_adapter_base`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.checkpoint_files import ShardWriter

from ..checkpoint.layout import MANIFEST, NotPublished, fetch_published
from ..common.errors import CheckpointError
from ..common.log import log
from ..storage import ObjectNotFound, StorageError, StoreSettings, open_store
from .remote_code import write_loadable_files

SOURCE_RECORD = "cosctl_source.json"
# peft's AutoPeftModel builds the base with this class (transformers' own, so neither cos_model nor an
# `import_allowlist` is needed); the published base's `auto_map` sends it to the shipped code.
AUTO_MAPPING = {"base_model_class": "AutoModelForCausalLM", "parent_library": "transformers"}
# transformers 4's `save_pretrained` default: a 7B model in bf16 is three files, each uploaded, fetched
# and re-hashed on its own.
MAX_SHARD_BYTES = 5 * 10**9


def fetch_model(source: str, settings: StoreSettings | None, local_dir: Path) -> Path:
    """A model folder from a URI: `<source>/model/` or `<source>/` when published (verified against
    its manifest), or a plain local HF folder (config.json + weights) such as a user's own model."""
    store = open_store(source, settings)
    for prefix in ("model", ""):
        try:
            return fetch_published(store, prefix, Path(local_dir))
        except NotPublished:
            continue
    plain = Path(source.removeprefix("file://"))
    if "://" not in source.removeprefix("file://") and (plain / "config.json").is_file():
        return plain
    if store.size(f"adapter/{MANIFEST}") is not None:
        raise StorageError(
            f"{source}: holds an adapter, not a model; `cosctl export {source} --out DIR` merges it into its "
            "base, and DIR is a model folder"
        )
    raise StorageError(f"{source}: neither a published model folder (with manifest.json) nor a local model folder")


def source_config(source: str, settings: StoreSettings | None) -> CosConfig:
    """The CosConfig of a model URI (published `<source>/model/`, `<source>/`, or a local folder),
    reading config.json alone."""
    store = open_store(source, settings)
    for key in ("model/config.json", "config.json"):
        try:
            return CosConfig.from_dict(json.loads(store.get_bytes(key)))
        except ObjectNotFound:
            continue
    raise StorageError(f"{source}: no config.json (looked in model/ and the folder itself)")


def local_model_folder(source: str) -> Path | None:
    """The absolute folder `fetch_model` reads for a local `source`, None for a remote or missing one."""
    if "://" in source.removeprefix("file://"):
        return None
    root = Path(source.removeprefix("file://")).expanduser().resolve()
    for folder, marker in ((root / "model", MANIFEST), (root, MANIFEST), (root, "config.json")):
        if (folder / marker).is_file():
            return folder
    return None


def absolute_source(source: str) -> str:
    """A model URI that means the same from any working directory: local paths made absolute."""
    if "://" in source.removeprefix("file://"):
        return source
    return str(Path(source.removeprefix("file://")).expanduser().resolve())


def base_record(base_source: str, base_dir: Path | None = None) -> dict:
    """What an adapter records of its base (`SOURCE_RECORD`): the base's absolute URI, the sha256 of its
    published manifest and each file's sha256 (None and {} for a plain folder without a manifest). The
    manifest is read from `base_dir` (the fetched copy the model was loaded from) when given, else from
    the base's store."""
    if base_dir is not None:
        path = Path(base_dir) / MANIFEST
        manifest = path.read_bytes() if path.is_file() else None
    else:
        manifest = published_manifest(base_source)
    files = json.loads(manifest)["files"] if manifest is not None else {}
    return {
        "base_model": absolute_source(base_source),
        "base_manifest_sha256": None if manifest is None else hashlib.sha256(manifest).hexdigest(),
        "base_files": {name: entry["sha256"] for name, entry in files.items()},
    }


def published_manifest(source: str, settings: StoreSettings | None = None) -> bytes | None:
    """The manifest of the model published at `source` (`model/` or the folder itself), None for a
    plain folder."""
    store = open_store(source, settings)
    for key in (f"model/{MANIFEST}", MANIFEST):
        if store.size(key) is not None:
            return store.get_bytes(key)
    return None


def read_source_record(data: bytes, where: str) -> dict:
    """An adapter's `SOURCE_RECORD`, or a one-line `CheckpointError` naming `where`."""
    try:
        record = json.loads(data)
        if not isinstance(record.get("base_model"), str):
            raise ValueError("no base_model")
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{where}: not a readable record of the adapter's base ({err})") from None
    return record


def check_adapter_base(adapter: str, record: dict, manifest: bytes | None) -> None:
    """Refuse, in one line, an adapter whose base (`manifest`: the base's manifest now, None for a plain
    folder) is not the one it was fine-tuned on. An adapter from before bases were recorded is used as
    it is, with a warning."""
    base = record["base_model"]
    if "base_manifest_sha256" not in record:
        log.warning(f"{adapter}: the adapter does not record which version of {base} it was trained on; used unchecked")
        return
    expected = record["base_manifest_sha256"]
    if expected is None:
        return  # trained on a plain folder: there was no manifest to record
    if manifest is None:
        raise CheckpointError(
            f"{adapter}: was fine-tuned on the published model at {base}, which now holds no manifest.json: "
            f"point the adapter at the original base, or re-run finetune on the new one"
        )
    now = hashlib.sha256(manifest).hexdigest()
    if now == expected:
        return
    then_files, now_files = record.get("base_files", {}), json.loads(manifest)["files"]
    changed = [
        name
        for name in sorted(set(then_files) | set(now_files))
        if then_files.get(name) != now_files.get(name, {}).get("sha256")
    ]
    raise CheckpointError(
        f"{adapter}: its base {base} changed since fine-tuning ({', '.join(changed) or 'the manifest'} differ; "
        f"manifest sha256 {expected[:12]} then, {now[:12]} now): re-run finetune on the new base, or restore "
        f"the original base at {base}"
    )


def save_adapter(
    peft_model, state: dict, tokenizer, base_source: str, out_dir: Path, base_dir: Path | None = None
) -> None:
    """A finetune's adapter folder: peft weights (`state`), the tokenizer, and the base model: in
    `SOURCE_RECORD` (its URI and manifest sha256, see `base_record`, for `cosctl export`/`eval`), in
    `adapter_config.json` (`base_model_name_or_path`: the base's local folder, and `auto_mapping`, for
    peft's `AutoPeftModel`) and in peft's README.md (`base_model`: the base's URI, not the folder the
    model was staged in)."""
    record = base_record(base_source, base_dir)
    base_folder = local_model_folder(base_source)
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = str(base_folder) if base_folder else record["base_model"]
    base_config = peft_model.get_base_model().config
    staged_name = base_config._name_or_path
    base_config._name_or_path = record["base_model"]  # what peft's model card names as `base_model`
    try:
        peft_model.save_pretrained(out_dir, state_dict=state)
    finally:
        base_config._name_or_path = staged_name
    config_path = Path(out_dir) / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    if saved.get("auto_mapping") is not None:
        saved["auto_mapping"] = AUTO_MAPPING
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / SOURCE_RECORD).write_text(json.dumps(record, indent=1))


def save_model_folder(
    config: CosConfig,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    weights: Iterable[tuple[str, torch.Tensor]],
    tokenizer,
    out_dir: Path,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """A published model folder: config, weights, tokenizer, and the code and processor transformers
    needs to load it alone. The weights (`layout`: name, dtype and shape of each, in order) are written
    as `weights` yields them, each straight to its safetensors shard (`cos_model.checkpoint_files.
    ShardWriter`: one `model.safetensors`, or shards of at most `max_shard_bytes` and their index, as
    transformers' `save_pretrained` lays them out), so they are never all in memory at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    with ShardWriter(out_dir, layout, max_shard_bytes) as writer:
        for name, tensor in weights:
            writer.write(name, tensor)
            del tensor  # before the next is made: a gathered tensor's storage goes with its last reference
    tokenizer.save_pretrained(out_dir)
    write_loadable_files(out_dir, tokenizer)


def save_model(model: CosForConditionalGeneration, tokenizer, out_dir: Path) -> None:
    """A model folder to publish, from the model itself (`save_pretrained`): as `save_model_folder`."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_loadable_files(out_dir, tokenizer)
