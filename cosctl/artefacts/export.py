"""`cosctl export`: one self-contained Hugging Face folder from a run's output, which transformers alone
loads and runs (`AutoModelForCausalLM` / `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(out,
trust_remote_code=True)`, and `pipeline("image-text-to-text", model=out, trust_remote_code=True)`).

SOURCE holds `adapter/` (a LoRA finetune: peft format, the bridge in `modules_to_save`, the base model
recorded in `cosctl_source.json`), or `model/` (pretrain, inflate, full finetune), or is a model folder.
Both are read as `cosctl eval` reads them (`cosctl.artefacts.loading`): every file checked against its
manifest, the adapter's base checked against the one it was trained on, and the weights exactly (a
missing, mis-shaped or foreign key is refused). An adapter is merged into its base (`merge_and_unload`);
a model folder's weights are copied as they are. The folder then gets:

    config.json             CosConfig + `auto_map` (see `cosctl.artefacts.remote_code`)
    model.safetensors
    generation_config.json  the tokenizer's bos/eos/pad ids
    <module>.py             the cos_model modules the config, model and processor import (remote code)
    processor_config.json   CosProcessor: visual tokens per image, image size, CLIP mean/std
    chat_template.jinja     the training chat template
    tokenizer.json, tokenizer_config.json

Files are world-readable (0644, folders 0755), like any published model folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cos_model import CosConfig

from ..checkpoint.layout import MANIFEST
from ..data.records import load_tokenizer
from .loading import check_model, fetch_for_eval, load_fetched
from .remote_code import write_loadable_files


def export_merged(source: str, out: Path) -> dict:
    """Write the self-contained folder for `source` (see the module docstring) and summarise it."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        summary = _write_weights(source, out, Path(scratch))
    config = CosConfig.from_pretrained(out)
    code = write_loadable_files(out, load_tokenizer(out))
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
    import torch

    fetched = fetch_for_eval(source, scratch)
    if fetched.adapter_dir is None:
        check_model(fetched)
        shutil.copytree(fetched.model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))
        return {"source": source, "merged": False}
    loaded = load_fetched(fetched, torch.float32)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return {"source": source, "base_model": fetched.base_model, "merged": True}


def _make_world_readable(out: Path) -> None:
    for path in [out, *out.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
