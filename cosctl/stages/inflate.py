"""The inflate stage (docs/design.md §3): a pre-trained model grown to more visual tokens (32 -> 528) by
parameter inflation, in one process; publishes `<output>/model/`.

    load the source exactly (its stored dtype) -> `cos_model.inflate_state_dict` (pure) -> assign the new
    state to a model built on the meta device (nothing random-initialised only to be overwritten) -> save
    -> publish
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from cos_model import CosConfig, CosForConditionalGeneration, inflate_config, inflate_state_dict
from cos_model.building import materialize

from ..artefacts.loading import load_model_folder
from ..artefacts.published import fetch_model, save_model, source_config
from ..checkpoint.layout import publish
from ..common.log import log
from ..data.records import load_tokenizer
from ..spec.specs import InflateSpec
from ..storage import join_uri, open_store
from .base import Stage, scale_table


class InflateStage(Stage):
    """Inflation: no training; the source's config grown by the spec's plan (a preset or scales)."""

    name = "inflate"
    trains = False

    def source_config(self) -> CosConfig:
        return source_config(self.spec.source, self.spec.storage.to_settings())

    def model_config(self) -> CosConfig:
        return inflate_config(self.source_config(), self.spec.plan_arg())

    def describe(self) -> dict:
        src, dst = self.source_config(), self.model_config()
        return {
            "stage": self.name,
            "visual_tokens": dst.num_visual_tokens,
            "image_size": dst.image_size,
            "scales": scale_table(dst),
            "source_visual_tokens": src.num_visual_tokens,
            "source_image_size": src.image_size,
            "output": join_uri(self.spec.run.output, "model"),
        }


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
    plan = spec.plan_arg()
    summary = {
        "stage": "inflate",
        "source": spec.source,
        "plan": plan if isinstance(plan, str) else {**plan, "scales": [scale.to_dict() for scale in plan["scales"]]},
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
