"""The GPU tier (`pytest -m gpu`, skipped without CUDA): the product's path on one GPU, as a user runs it.

Random-weight folders as users have them (a `CLIPModel` of ViT-L/14 geometry and a Llama of the 1b
shape of bench/rows.py, TinyLlama-1.1B's, both saved by transformers) and a 224-px synthetic set; then
the vicuna7b recipes, changed only where these folders and a short run need it:

    cosctl pretrain   bf16, NCCL, the lean build, `auto` micro-batches (the probe reads the allocator's
                      reserved memory), 20 steps, a checkpoint at step 10, eval loss with swapped images
                      and greedy generation (ZeRO-3) at steps 10 and 20, MFU against the GPU's named peak
    cosctl pretrain   again from the step-10 checkpoint, into another run: steps 11-20 repeat
    cosctl inflate    32 -> 528 tokens at 448 px
    cosctl finetune   4 steps, LoRA with gradient checkpointing, the bridge trained
    cosctl export     then transformers alone (a fresh process that cannot import the project) generates
                      with the export as the project's own code does; generation with `synced_gpus`
                      (what ZeRO-3 ranks use) under NCCL gives what it gives unsynced

`bash bench/gpu.sh` runs this first, then the stage-speed rows. Without a GPU,
`COSCTL_GPU_TIER_ON_CPU=1 pytest -m gpu tests/test_gpu.py` runs the same pipeline at a narrow shape (the
ViT-L/14 and Llama layouts at width 64, gloo, fp32): the check that the tier's commands work.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cosctl.data.synth import synthesize
from cosctl.plan.flops import device_peak
from tests.harness import RECIPES, REPO, cosctl, ok, steps
from tests.test_export import NO_PROJECT

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("COSCTL_GPU_TIER_ON_CPU") == "1"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not (CUDA or ON_CPU), reason="needs a CUDA device (COSCTL_GPU_TIER_ON_CPU=1: the CPU check)"),
]

CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
QUESTIONS = ["What colour is the circle?", "How many shapes are there?"]


@dataclass(frozen=True)
class TierShape:
    """The models and the sizes of the runs."""

    vision: dict  # CLIPVisionConfig fields: ViT-L/14's layout (24 blocks, patch 14, 224 px)
    llm: dict  # LlamaConfig fields
    samples_per_step: int
    budget: list[str]  # the pretrain budget's overrides
    finetune_samples: int
    finetune_tokens: int
    env: dict


def _shape() -> TierShape:
    if CUDA:
        sys.path.insert(0, str(REPO / "bench"))
        import rows  # bench/rows.py: the stage-speed shapes

        text = {k: v for k, v in rows.SHAPES["1b"].text.items() if k != "model_type"}
        return TierShape(
            vision={**rows.SHAPES["1b"].vision, "image_size": 224},
            llm={**text, "tie_word_embeddings": False},
            samples_per_step=32,
            budget=["batch.tokens_per_micro_batch=auto"],
            finetune_samples=8,
            finetune_tokens=8192,
            env={
                "DS_ACCELERATOR": "cuda",
                "OMP_NUM_THREADS": "4",
                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
            },
        )
    return TierShape(
        vision=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=24,
            num_attention_heads=4,
            patch_size=14,
            image_size=224,
        ),
        llm=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        samples_per_step=8,
        budget=["batch.tokens_per_micro_batch=auto", "batch.max_tokens_per_micro_batch=4096"],
        finetune_samples=2,
        finetune_tokens=2048,
        env={},
    )


SHAPE = _shape()
DTYPE = torch.bfloat16 if CUDA else torch.float32
DEVICE = "cuda" if CUDA else "cpu"


def _save_folders(root: Path) -> None:
    """A CLIPModel folder and a sharded Llama folder with random weights, built on the device in the
    training dtype (a 1.1B model initialises in seconds there) and saved by transformers."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        clip = CLIPModel._from_config(
            CLIPConfig(vision_config=SHAPE.vision, text_config=CLIP_TEXT, projection_dim=16), dtype=DTYPE
        )
        clip.save_pretrained(root / "clip")
        del clip
        llama = LlamaForCausalLM._from_config(LlamaConfig(**SHAPE.llm), dtype=DTYPE)
        llama.save_pretrained(root / "llm", max_shard_size="1GB")
        del llama
    if CUDA:
        torch.cuda.empty_cache()


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def _run(*args: str, root: Path, times: dict) -> subprocess.CompletedProcess:
    """`cosctl ARGS` on the device; its wall time goes to `times` under the command's output folder name."""
    started = time.monotonic()
    result = ok(cosctl(*args, tmp=root, timeout=900, env_extra=SHAPE.env))
    times[Path(args[args.index("--out") + 1 if "--out" in args else args.index("--output") + 1]).name] = round(
        time.monotonic() - started, 1
    )
    return result


def _report(pipeline: dict, times: dict) -> None:
    """The tier's figures for bench/gpu.sh's summary, to COSCTL_GPU_TIER_REPORT when it is set: wall time
    per command, and the pre-training steps' medians."""
    path = os.environ.get("COSCTL_GPU_TIER_REPORT")
    if not path:
        return
    timed = [r for step, r in steps(pipeline["work"] / "pre").items() if step > 2]
    median = lambda key: (
        statistics.median(r[key] for r in timed) if all(r.get(key) is not None for r in timed) else None
    )
    budget = next(
        (line for line in pipeline["pretrain"].stdout.splitlines() if "tokens_per_micro_batch auto" in line), ""
    )
    Path(path).write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if CUDA else "cpu",
                "shape": "1b" if CUDA else "narrow",
                "seconds": times,
                "pretrain": {key: median(key) for key in ("step_time_s", "samples_per_s", "tflops", "mfu", "hfu")},
                "probe": budget.split("auto ->", 1)[-1].strip(),
                "peak_mem_gib": max(r["peak_mem_gib"] for r in timed),
            },
            indent=1,
        )
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Folders, data, and the five commands of the module docstring, run once."""
    root = tmp_path_factory.mktemp("gpu_tier")
    started, times = time.monotonic(), {}
    synthesize(root / "data", num_samples=200, seed=0, image_size=224)
    _save_folders(root)
    times["folders"] = round(time.monotonic() - started, 1)
    common = [
        f"data.root={root / 'data'}",
        "data.train=train.json",
        "data.eval=eval.json",
        f"data.num_workers={4 if CUDA else 0}",
        "checkpoint.every_minutes=null",
        "slurm.gpus_per_node=1",
        *([] if CUDA else ["deepspeed.precision=fp32"]),
    ]
    pretrain = [
        *common,
        f"model.vision.path={root / 'clip'}",
        f"model.text.path={root / 'llm'}",
        f"model.tokenizer={root / 'data' / 'tokenizer'}",
        "optim.num_steps=20",
        f"batch.samples_per_step={SHAPE.samples_per_step}",
        *SHAPE.budget,
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=3",
        "eval.every_steps=10",
        "eval.num_batches=2",
        "eval.swapped_images=true",
        "eval.generate_every_steps=10",
        "eval.generate_samples=8",
        "eval.generate_max_new_tokens=8",
        "eval.generate_batch_size=4",
    ]
    recipe = RECIPES / "vicuna7b"
    out, work = root / "out", root / "work"
    runs = {}
    runs["pretrain"] = _run(
        "pretrain",
        str(recipe / "pretrain.yaml"),
        *("--nproc", "1", "--run-dir", str(work / "pre"), "--output", str(out / "pre")),
        *_sets(*pretrain),
        root=root,
        times=times,
    )
    runs["resumed"] = _run(
        "pretrain",
        str(recipe / "pretrain.yaml"),
        *("--nproc", "1", "--run-dir", str(work / "resumed"), "--output", str(out / "resumed")),
        *("--resume", str(out / "pre" / "checkpoints" / "step_00000010")),
        *_sets(*pretrain),
        root=root,
        times=times,
    )
    runs["inflate"] = _run(
        "inflate",
        str(recipe / "inflate.yaml"),
        *("--run-dir", str(work / "inf"), "--output", str(out / "inf")),
        *_sets(f"source={out / 'pre'}"),
        root=root,
        times=times,
    )
    runs["finetune"] = _run(
        "finetune",
        str(recipe / "finetune.yaml"),
        *("--nproc", "1", "--run-dir", str(work / "fin"), "--output", str(out / "fin")),
        *_sets(
            *common,
            f"model.source={out / 'inf'}",
            "optim.num_steps=4",
            f"batch.samples_per_step={SHAPE.finetune_samples}",
            f"batch.tokens_per_micro_batch={SHAPE.finetune_tokens}",
            "checkpoint.every_steps=null",
            "eval.every_steps=null",
        ),
        root=root,
        times=times,
    )
    runs["export"] = _run("export", str(out / "fin"), "--out", str(root / "export"), root=root, times=times)
    pipeline = {"root": root, "out": out, "work": work, **runs}
    _report(pipeline, times)
    return pipeline


def _summary(pipeline, run: str) -> dict:
    return json.loads((pipeline["work"] / run / "summary.json").read_text())


def _resolved(pipeline, run: str) -> dict:
    return json.loads((pipeline["work"] / run / "resolved.json").read_text())


def test_pretrain_runs_the_paper_path_on_the_device(pipeline):
    """20 steps on the device: bf16 (on a GPU) from the lean build, a probed budget, finite falling-ish
    losses, the device's memory peak and, on a GPU the peak table names, MFU and HFU in every step."""
    summary, resolved = _summary(pipeline, "pre"), _resolved(pipeline, "pre")
    assert summary["steps"] == 20 and summary["world_size"] == 1 and summary["budget_origin"] == "probe"
    assert resolved["device_type"] == DEVICE and resolved["bf16"] == CUDA
    assert resolved["deepspeed"]["bf16"]["enabled"] == CUDA and resolved["deepspeed"]["zero_optimization"]["stage"] == 3
    records = steps(pipeline["work"] / "pre")
    assert sorted(records) == list(range(1, 21))
    assert all(math.isfinite(r["loss"]) and r["peak_mem_gib"] > 0 for r in records.values())
    assert "tokens_per_micro_batch auto ->" in pipeline["pretrain"].stdout
    peak = device_peak(torch.cuda.get_device_name()) if CUDA else None
    if peak is not None:
        assert f"MFU and HFU against {peak.tflops:g} TFLOP/s per rank ({peak.part})" in pipeline["pretrain"].stdout
        assert all(0 < r["mfu"] <= r["hfu"] < 1 for r in records.values())
    else:
        assert "MFU and HFU not logged" in pipeline["pretrain"].stdout
        assert all(r["mfu"] is None for r in records.values())


def test_resuming_the_step_10_checkpoint_repeats_steps_11_to_20(pipeline):
    """A new run from the step-10 checkpoint trains steps 11-20 on the same data with the same budget and
    learning rates; step 11's loss (the restored weights on the restored data position) is the same to
    the last bit, later steps within what non-deterministic GPU backward kernels allow."""
    straight, resumed = steps(pipeline["work"] / "pre"), steps(pipeline["work"] / "resumed")
    assert sorted(resumed) == list(range(11, 21)) and _summary(pipeline, "resumed")["budget_origin"] == "checkpoint"
    for step in range(11, 21):
        for key in ("lr", "samples", "tokens", "label_tokens", "micro_batches"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert resumed[11]["loss"] == straight[11]["loss"]
    for step in range(12, 21):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-2 if CUDA else 1e-6), step


def test_evals_log_the_swapped_image_loss_and_generation_scores(pipeline):
    """At steps 10 and 20 the eval loss comes with the swapped-image loss, and greedy generation of the
    held-out records (through the ZeRO-3 engine) is scored per task."""
    records = steps(pipeline["work"] / "pre")
    for step in (10, 20):
        record = records[step]
        assert math.isfinite(record["eval_loss"]) and math.isfinite(record["eval_loss_swapped_images"])
        assert any(key.startswith("eval/") for key in record), sorted(record)


def test_inflate_and_finetune_reach_528_tokens_with_lora(pipeline):
    """Inflation gives 528 tokens at 448 px; fine-tuning runs its 4 steps there with LoRA adapters and
    the bridge trained, gradient checkpointing on, and publishes an adapter."""
    assert json.loads(pipeline["inflate"].stdout)["visual_tokens"] == {"from": 32, "to": 528}
    summary = _summary(pipeline, "fin")
    assert (summary["steps"], summary["visual_tokens"], summary["image_size"]) == (4, 528, 448)
    assert set(summary["trainable_params"]) == {"lora", "resampler", "projector"}
    assert (pipeline["out"] / "fin" / "adapter" / "adapter_config.json").is_file()
    assert all(math.isfinite(r["loss"]) for r in steps(pipeline["work"] / "fin").values())


# Greedy answers of the export, by transformers alone, on the device in the training dtype.
FRESH_GENERATE = (
    NO_PROJECT
    + r"""
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

folder, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
images, questions = json.loads(sys.argv[4]), json.loads(sys.argv[5])
dtype = torch.bfloat16 if device == "cuda" else torch.float32
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device).eval()
prompts = [processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
    for q in questions]
inputs = processor(images=[Image.open(p) for p in images], text=prompts, return_tensors="pt").to(device)
generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
torch.save({k: v.cpu() for k, v in inputs.items()}, out / "inputs.pt")
(out / "report.json").write_text(json.dumps({
    "generated": generated.cpu().tolist(),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("cos_model", "cosctl")),
}))
"""
)


def _fresh(script: str, out: Path, *args: str) -> None:
    """`script OUT ARGS` in a fresh interpreter outside the repository (carried packages stay on the path)."""
    out.mkdir()
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_MODULES_CACHE": str(out / "hf_modules")}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=out, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_transformers_alone_generates_with_the_export_as_the_project_does(pipeline):
    """The export, loaded by transformers' Auto classes in a process that cannot import the project,
    generates on the device what `cos_model` generates from the same folder and inputs."""
    from cos_model import CosForConditionalGeneration

    root = pipeline["root"]
    records = json.loads((root / "data" / "eval.json").read_text())[: len(QUESTIONS)]
    images = json.dumps([str(root / "data" / r["image"]) for r in records])
    out = root / "fresh"
    _fresh(FRESH_GENERATE, out, str(root / "export"), str(out), DEVICE, images, json.dumps(QUESTIONS))
    report = json.loads((out / "report.json").read_text())
    assert report["project_modules"] == []
    inputs = {k: v.to(DEVICE) for k, v in torch.load(out / "inputs.pt").items()}
    model = CosForConditionalGeneration.from_pretrained(root / "export", dtype=DTYPE).to(DEVICE).eval()
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert generated.cpu().tolist() == report["generated"]
    assert all(len(row) > inputs["input_ids"].shape[1] for row in report["generated"])


# Greedy generation with transformers' synced_gpus (the setting ZeRO-3 ranks generate with) against
# unsynced, on the published pre-trained model, in a one-rank process group of the device's backend.
SYNCED = r"""
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist
from cosctl.artefacts.loading import load_for_eval
from cosctl.evaluate.generation import batch_pixels, generate_batch
from cosctl.evaluate.records import build_prompt, image_source, load_eval_records

source, data, out, device = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[5])
dist.init_process_group("nccl" if device == "cuda" else "gloo")
loaded = load_for_eval(source, out / "scratch", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
model, tokenizer = loaded.model.to(device).eval(), loaded.tokenizer
images = image_source(data)
records = load_eval_records(data / "eval.json", images, limit=4)
prompts = [build_prompt(r, tokenizer, model.config.num_visual_tokens, images.root) for r in records]
pixels = batch_pixels(images, records, model.config.image_size)
texts = {
    str(synced): generate_batch(
        model, tokenizer, prompts, pixels, max_new_tokens=8, device=torch.device(device), synced=synced
    )
    for synced in (True, False)
}
(out / "synced.json").write_text(json.dumps({"backend": dist.get_backend(), **texts}))
dist.destroy_process_group()
"""


def test_synced_gpus_generation_gives_what_unsynced_generation_gives(pipeline):
    """Generation with `synced_gpus` (every decoding step agreed over the process group, as ZeRO-3 ranks
    generate) under NCCL gives the texts unsynced generation gives."""
    import socket

    root = pipeline["root"]
    out = root / "synced"
    out.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = [sys.executable, "-c", SYNCED, str(pipeline["out"] / "pre"), str(root / "data"), str(out), DEVICE, port]
    env = {**os.environ, **SHAPE.env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    texts = json.loads((out / "synced.json").read_text())
    assert texts["backend"] == ("nccl" if CUDA else "gloo")
    assert texts["True"] == texts["False"] and len(texts["True"]) == 4
