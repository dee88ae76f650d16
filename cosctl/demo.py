"""`cosctl demo`: the whole Chain-of-Sight pipeline on CPU with tiny random models, in minutes.

    data synth -> pretrain (32 visual tokens, 64 px) -> inflate (32to528, 128 px) -> finetune (528, LoRA)

Runs the same code as the stage commands, on `recipes/tiny/*.yaml`, one rank in this process, and
writes `OUT/summary.json` with per-stage tokens, steps, first/final loss, samples/s and artefacts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .spec import load_spec
from .stages import run_inflate
from .synth import synthesize
from .train import run_training

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
STAGE_KEYS = (
    "visual_tokens",
    "image_size",
    "steps",
    "first_loss",
    "final_loss",
    "loss_window",
    "first_eval_loss",
    "final_eval_loss",
    "samples_per_s",
    "train_time_s",
)


def run_demo(out: Path, num_samples: int = 1200, seed: int = 0) -> dict:
    started = time.monotonic()
    out = Path(out).resolve()
    data = out / "data"
    synth = synthesize(data, num_samples=num_samples, seed=seed, image_size=128)
    outputs = {stage: out / "runs" / stage for stage in ("pretrain", "inflate", "finetune")}

    pretrain = load_spec(
        RECIPES / "pretrain.yaml",
        [
            f"data.root={data}",
            f"model.tokenizer={data / 'tokenizer'}",
            f"run.output={outputs['pretrain']}",
            f"run.seed={seed}",
        ],
    )
    pre = run_training(
        pretrain, run_dir=out / "work" / "pretrain", output=str(outputs["pretrain"]), resume="never", overwrite=True
    )
    inflate = load_spec(RECIPES / "inflate.yaml", [f"source={outputs['pretrain']}", f"run.output={outputs['inflate']}"])
    inf = run_inflate(inflate, run_dir=out / "work" / "inflate", output=str(outputs["inflate"]))
    finetune = load_spec(
        RECIPES / "finetune.yaml",
        [
            f"data.root={data}",
            f"model.source={outputs['inflate']}",
            f"run.output={outputs['finetune']}",
            f"run.seed={seed}",
        ],
    )
    fin = run_training(
        finetune, run_dir=out / "work" / "finetune", output=str(outputs["finetune"]), resume="never", overwrite=True
    )

    summary = {
        "data": {"root": str(data), "num_samples": num_samples, "seed": seed, "tasks": synth["tasks"]},
        "pretrain": {**{k: pre[k] for k in STAGE_KEYS}, "artefact": pre["artefact"]},
        "inflate": {
            "visual_tokens": inf["visual_tokens"]["to"],
            "image_size": inf["image_size"]["to"],
            "time_s": inf["time_s"],
            "artefact": inf["artefact"],
        },
        "finetune": {**{k: fin[k] for k in STAGE_KEYS}, "artefact": fin["artefact"]},
        "total_time_s": time.monotonic() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
