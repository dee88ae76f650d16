"""What differs between stages: where the model and tokenizer come from, what a checkpoint stores as
its gathered trainable weights, and which artefact a stage publishes.

    pretrain  spec.model (ViT/LLM from local folders or random)   -> publishes <output>/model/   (HF folder)
    inflate   <source>/model -> cos_model.inflate_*               -> publishes <output>/model/   (HF folder)
    finetune  <source>/model + LoRA                               -> publishes <output>/adapter/ (peft folder)

Published folders carry a manifest written last, so a folder with a manifest is complete. A published
`model/` also carries the model's code (`cosctl.export.remote_code`), so transformers alone loads it
(`trust_remote_code=True`) and peft alone puts an adapter on it. An adapter records its base: the URI
and the sha256 of the base's manifest (`SOURCE_RECORD`); whoever loads it checks the base is still that
one (`check_adapter_base`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from cos_model import CosConfig, CosForConditionalGeneration, inflate_config, inflate_state_dict
from cos_model.building import materialize

from ..checkpoint.committer import retrying
from ..checkpoint.layout import MANIFEST, NotPublished, fetch_published, publish
from ..common.dist import Dist, barrier, on_main, on_node_main
from ..common.errors import CheckpointError
from ..common.log import log
from ..data.conversation import IMAGE_TOKEN
from ..data.records import load_tokenizer
from ..export.remote_code import write_loadable_files
from ..spec.specs import FinetuneSpec, InflateSpec, PretrainSpec, TrainingSpec
from ..storage import ObjectStore, StorageError, StoreSettings, join_uri, open_store
from ..train.engine import build_finetune_model, build_pretrain_model, load_model_folder, run_dtype

SOURCE_RECORD = "cosctl_source.json"
# peft's AutoPeftModel builds the base with this class (transformers' own, so neither cos_model nor an
# `import_allowlist` is needed); the published base's `auto_map` sends it to the shipped code.
AUTO_MAPPING = {"base_model_class": "AutoModelForCausalLM", "parent_library": "transformers"}


@dataclass
class Stage:
    tokenizer: object
    model: torch.nn.Module
    cos_config: CosConfig
    write_trainable: Callable  # (engine, local_dir) -> None; collective
    write_final: Callable  # (engine) -> the published artefact's key in the output store; collective


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


def _gathered(engine, params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _trainable_state(engine) -> dict[str, torch.Tensor] | None:
    """Full (gathered) trainable weights on rank 0, None elsewhere; collective."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with _gathered(engine, (p for _, p in named)):
        if dist.get_rank() == 0:
            return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
    return None


def _full_state(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered module by module under ZeRO-3); collective."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_model_folder(config: CosConfig, state: dict, tokenizer, out_dir: Path) -> None:
    """A published model folder: config, weights, tokenizer, and the code and processor transformers
    needs to load it alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    write_loadable_files(out_dir, tokenizer)


def save_model(model: CosForConditionalGeneration, tokenizer, out_dir: Path) -> None:
    """A model folder to publish, from the model itself (`save_pretrained`): as `save_model_folder`."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_loadable_files(out_dir, tokenizer)


def _publish_on_main(store: ObjectStore, local_dir: Path, prefix: str, max_outage_s: float) -> str:
    """Rank 0 publishes `local_dir` as `prefix` in the output store, retrying while the store fails
    (up to `storage.max_outage_minutes`); every rank gets the outcome. Returns the artefact's key."""
    on_main(lambda: retrying(lambda: publish(store, local_dir, prefix), f"publishing {prefix}", max_outage_s))
    return prefix


def prepare_stage(spec: TrainingSpec, store: ObjectStore, staging: Path, dist_info: Dist) -> Stage:
    """The stage's tokenizer and model (not yet in an engine) and how it writes weights to `store`;
    `write_final` returns the published artefact's key in the store (`model` or `adapter`)."""
    if isinstance(spec, PretrainSpec):
        return _pretrain_stage(spec, store, staging, dist_info)
    return _finetune_stage(spec, store, staging, dist_info)


def _pretrain_stage(spec: PretrainSpec, store: ObjectStore, staging: Path, dist_info: Dist) -> Stage:
    tokenizer = load_tokenizer(spec.model.tokenizer)
    model = build_pretrain_model(
        spec, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), run_dtype(spec, dist_info.device.type)
    )

    def write_trainable(engine, local_dir: Path) -> None:
        state = _trainable_state(engine)
        if state is not None:
            local_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(local_dir / "model.safetensors"), metadata={"format": "pt"})

    def write_final(engine) -> str:
        state = _full_state(engine)
        local = staging / "final" / "model"
        if state is not None:
            shutil.rmtree(local, ignore_errors=True)
            save_model_folder(engine.module.config, state, tokenizer, local)
        return _publish_on_main(store, local, "model", 60 * spec.storage.max_outage_minutes)

    return Stage(tokenizer, model, model.config, write_trainable, write_final)


def _finetune_stage(spec: FinetuneSpec, store: ObjectStore, staging: Path, dist_info: Dist) -> Stage:
    # One download per node (its local rank 0) into that node's own folder: a run dir on a shared
    # filesystem would otherwise have every node delete and rewrite the same files at once.
    node_folder = staging / f"node_{dist_info.node:04d}" / "source"
    found = None
    if dist_info.local_rank == 0:
        found = str(fetch_model(spec.model.source, spec.storage.to_settings(), node_folder))
    barrier()
    model_dir = Path(on_node_main(found, dist_info))
    tokenizer = load_tokenizer(model_dir)
    model = build_finetune_model(spec, str(model_dir), run_dtype(spec, dist_info.device.type))
    cos_config = CosConfig.from_pretrained(model_dir)
    uses_lora = spec.lora is not None

    def write_adapter(engine, local_dir: Path) -> None:
        # Under ZeRO-3 adapters are partitioned ([0]-shaped): gather them, or peft saves empty tensors.
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        with _gathered(engine, trainable):
            if dist.get_rank() == 0:
                state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in engine.module.state_dict().items()
                    if "lora_" in k or "modules_to_save" in k
                }
                save_adapter(engine.module, state, tokenizer, spec.model.source, local_dir, model_dir)

    def write_trainable(engine, local_dir: Path) -> None:
        if uses_lora:
            return write_adapter(engine, local_dir)
        state = _trainable_state(engine)
        if state is not None:
            local_dir.mkdir(parents=True, exist_ok=True)
            save_file(state, str(local_dir / "model.safetensors"), metadata={"format": "pt"})

    def write_final(engine) -> str:
        local = staging / "final" / ("adapter" if uses_lora else "model")
        if dist.get_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
        dist.barrier()
        if uses_lora:
            write_adapter(engine, local)
        else:
            state = _full_state(engine)
            if state is not None:
                save_model_folder(cos_config, state, tokenizer, local)
        return _publish_on_main(store, local, local.name, 60 * spec.storage.max_outage_minutes)

    return Stage(tokenizer, model, cos_config, write_trainable, write_final)


def run_inflate(spec: InflateSpec, *, run_dir: Path, output: str) -> dict:
    """Load the pretrained model (full weights, one process, in its stored dtype), inflate it into a
    destination built on the meta device (no random init of weights that inflation provides), publish."""
    started = time.monotonic()
    run_dir = Path(run_dir)
    settings = spec.storage.to_settings()
    source_dir = fetch_model(spec.source, settings, run_dir / "staging" / "source")
    src_config = CosConfig.from_pretrained(source_dir)
    dst_config = inflate_config(src_config, spec.plan_arg())
    source = load_model_folder(str(source_dir), dtype="auto")
    state = inflate_state_dict(source.state_dict(), src_config, dst_config)
    del source
    with torch.device("meta"):
        model = CosForConditionalGeneration(dst_config)
    model.load_state_dict(state, strict=True, assign=True)
    materialize(model, dtype=next(iter(state.values())).dtype)  # the non-persistent buffers (rotary, ids)
    local = run_dir / "staging" / "model"
    shutil.rmtree(local, ignore_errors=True)
    save_model(model, load_tokenizer(source_dir), local)
    publish(open_store(output, settings), local, "model")
    summary = {
        "stage": "inflate",
        "source": spec.source,
        "plan": spec.plan_arg(),
        "visual_tokens": {"from": src_config.num_visual_tokens, "to": dst_config.num_visual_tokens},
        "image_size": {"from": src_config.image_size, "to": dst_config.image_size},
        "num_params": sum(p.numel() for p in model.parameters()),
        "time_s": time.monotonic() - started,
        "artefact": join_uri(output, "model"),
    }
    log.info(
        f"{src_config.num_visual_tokens} -> {dst_config.num_visual_tokens} visual tokens, "
        f"{src_config.image_size} -> {dst_config.image_size} px ({spec.plan_arg()}): new windows, queries and "
        f"position table initialised from the source's; {summary['num_params']:,} parameters in "
        f"{summary['artefact']} ({summary['time_s']:.1f} s)"
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
