"""`cosctl export`: one merged Hugging Face folder from a finetune run's output.

LoRA runs publish `adapter/` (peft format, the bridge in `modules_to_save`) plus a record of their base
model; the export loads the base, applies the adapter, merges it (`merge_and_unload`) and saves a plain
`CosForConditionalGeneration` folder. Runs without LoRA publish `model/`, which is copied as is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from cos_model import CosForConditionalGeneration

from .checkpoint import CheckpointError, fetch_published
from .data import load_tokenizer
from .stages import SOURCE_RECORD, fetch_model
from .storage import open_store


def export_merged(source: str, out: Path) -> dict:
    from peft import PeftModel

    out = Path(out)
    store = open_store(source)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        try:
            adapter = fetch_published(store, "adapter", scratch / "adapter")
        except CheckpointError:
            model_dir = fetch_model(source, None, scratch / "model")
            shutil.copytree(model_dir, out, dirs_exist_ok=True)
            return {"source": source, "merged": False, "out": str(out)}
        base_uri = json.loads((adapter / SOURCE_RECORD).read_text())["base_model"]
        base_dir = fetch_model(base_uri, None, scratch / "base")
        base = CosForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        merged.save_pretrained(out)
        load_tokenizer(adapter).save_pretrained(out)
    return {"source": source, "base_model": base_uri, "merged": True, "out": str(out),
            "visual_tokens": merged.config.num_visual_tokens}
