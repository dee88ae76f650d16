"""`cosctl export`: one self-contained Hugging Face folder from a run's output, which transformers alone
loads and runs (`AutoModelForCausalLM` / `AutoProcessor.from_pretrained(out, trust_remote_code=True)`).

SOURCE holds `adapter/` (a LoRA finetune: peft format, the bridge in `modules_to_save`, the base model
recorded in `cosctl_source.json`), or `model/` (pretrain, inflate, full finetune), or is a model folder.
An adapter is merged into its base (`merge_and_unload`); a model folder's weights are copied as they are.
The folder then gets:

    config.json             CosConfig + `auto_map` (AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor)
    model.safetensors
    generation_config.json  the tokenizer's bos/eos/pad ids
    <module>.py             the cos_model modules the config, model and processor import (remote code)
    processor_config.json   CosProcessor: visual tokens per image, image size, CLIP mean/std
    chat_template.jinja     the training chat template
    tokenizer.json, tokenizer_config.json

Files are world-readable (0644, folders 0755), like any published model folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.utils import PROCESSOR_NAME

import cos_model
from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.processing import CosImageProcessor, CosProcessor

from .checkpoint import MANIFEST, fetch_published
from .data import load_tokenizer
from .remote_code import module_sources, write_sources
from .stages import SOURCE_RECORD, fetch_model
from .storage import open_store

AUTO_CLASSES = {
    "AutoConfig": CosConfig,
    "AutoModel": CosForConditionalGeneration,
    "AutoModelForCausalLM": CosForConditionalGeneration,
    "AutoProcessor": CosProcessor,
    "AutoImageProcessor": CosImageProcessor,
}


def class_reference(cls: type) -> str:
    """`module.Class` as `auto_map` names a class of a remote-code folder."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def export_merged(source: str, out: Path) -> dict:
    """Write the self-contained folder for `source` (see the module docstring) and summarise it."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        summary = _write_weights(source, out, Path(scratch))
    config = CosConfig.from_pretrained(out)
    code = _write_code(out)
    tokenizer = load_tokenizer(out)
    _write_processor(out, config, tokenizer)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(out)
    _make_world_readable(out)
    return {
        **summary,
        "out": str(out),
        "visual_tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "code": code,
    }


def _write_weights(source: str, out: Path, scratch: Path) -> dict:
    """Config, weights and tokenizer into `out`: the adapter merged into its base, or the model as is."""
    from peft import PeftModel

    store = open_store(source)
    if store.size(f"adapter/{MANIFEST}") is None:
        model_dir = fetch_model(source, None, scratch / "model")
        shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        return {"source": source, "merged": False}
    adapter = fetch_published(store, "adapter", scratch / "adapter")
    base_uri = json.loads((adapter / SOURCE_RECORD).read_text())["base_model"]
    base_dir = fetch_model(base_uri, None, scratch / "base")
    base = CosForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    load_tokenizer(adapter).save_pretrained(out)
    return {"source": source, "base_model": base_uri, "merged": True}


def _write_code(out: Path) -> list[str]:
    """The modules defining the auto classes (and what they import) + `auto_map` in config.json."""
    roots = sorted({cls.__module__.rsplit(".", 1)[-1] for cls in AUTO_CLASSES.values()})
    files = write_sources(module_sources(Path(cos_model.__file__).parent, roots), out)
    auto_map = {name: class_reference(cls) for name, cls in AUTO_CLASSES.items() if name != "AutoImageProcessor"}
    _update_json(out / "config.json", lambda config: config.update(auto_map=auto_map))
    return files


def _write_processor(out: Path, config: CosConfig, tokenizer) -> None:
    image_processor = CosImageProcessor(image_size=config.image_size)
    processor = CosProcessor(image_processor, tokenizer, num_visual_tokens=config.num_visual_tokens)
    processor.save_pretrained(out)

    def add_auto_map(saved: dict) -> None:
        saved["auto_map"] = {"AutoProcessor": class_reference(CosProcessor)}
        saved["image_processor"]["auto_map"] = {"AutoImageProcessor": class_reference(CosImageProcessor)}

    _update_json(out / PROCESSOR_NAME, add_auto_map)


def _update_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _make_world_readable(out: Path) -> None:
    for path in [out, *out.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
