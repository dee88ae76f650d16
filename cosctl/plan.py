"""`cosctl plan`: what a spec will do before it runs — tokens, scales, parameters, DeepSpeed config,
memory and FLOP estimates, predicted step time and samples/s, and the checkpoint it would resume from.
Builds the model on the meta device (no weights, no memory), reads at most config.json and the
tokenizer from local folders.

The prediction is the FLOP model (`cosctl.metrics.flops_per_sample`) over the device's peak times
`cosctl.metrics.ASSUMED_MFU`; without a known peak (CPU, unless COSCTL_PEAK_TFLOPS is set) it is null.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cos_model import CosConfig, CosForConditionalGeneration

from .checkpoint import find_latest
from .batching import samples_per_micro_batch
from .data import IMAGE_TOKEN, load_tokenizer
from .errors import DataError
from .deepspeed_config import load_template, resolve_deepspeed, use_bf16
from .engine import largest_block_numel, set_trainable
from .metrics import ASSUMED_MFU, flops_per_sample, peak_tflops, predict_step_seconds
from .spec import FinetuneSpec, InflateSpec, PretrainSpec
from .storage import ObjectNotFound, StorageError, StoreSettings, join_uri, open_store

ADAM_BYTES_PER_PARAM = 12  # fp32 master weight + two fp32 moments


def source_config(source: str, settings: StoreSettings | None) -> CosConfig:
    """The CosConfig of a model URI (published `<source>/model/`, `<source>/`, or a local folder)."""
    store = open_store(source, settings)
    for key in ("model/config.json", "config.json"):
        try:
            return CosConfig.from_dict(json.loads(store.get_bytes(key)))
        except ObjectNotFound:
            continue
    raise StorageError(f"{source}: no config.json (looked in model/ and the folder itself)")


def _pretrain_config(spec: PretrainSpec) -> CosConfig:
    vocab = spec.model.text.config.get("vocab_size", 32000)
    image_token = 0
    try:
        tokenizer = load_tokenizer(spec.model.tokenizer)
        vocab, image_token = len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    except DataError:
        pass  # the plan still works before the tokenizer folder exists
    try:
        return spec.model.to_config(vocab_size=vocab, image_token_id=image_token)
    except OSError as err:  # transformers' answer to a model.vision.path / model.text.path that is not there
        paths = ", ".join(p for p in (spec.model.vision.path, spec.model.text.path) if p)
        raise ValueError(f"model: cannot read the config of the local model folders ({paths}): {err}") from None


def lora_params(model: torch.nn.Module, targets: list[str], rank: int) -> int:
    total = 0
    for name, module in model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += rank * (module.in_features + module.out_features)
    return total


def scale_table(config: CosConfig) -> list[dict]:
    return [
        {"window": s.window, "queries_per_window": s.queries_per_window, "windows": s.num_windows(config.grid_size),
         "tokens": s.num_tokens(config.grid_size)}
        for s in config.scales
    ]


def device_peak_tflops(device_type: str) -> float | None:
    """Per-rank peak for predictions: COSCTL_PEAK_TFLOPS, else this machine's GPU if it has one (a
    plan made on a login node for `--device cuda` has no GPU to name, so no peak)."""
    if os.environ.get("COSCTL_PEAK_TFLOPS") or (device_type == "cuda" and torch.cuda.is_available()):
        return peak_tflops(torch.device(device_type))
    return None


def _speed(flops_per_step: float, samples_per_step: int, world_size: int, device_type: str) -> dict:
    """Predicted step time and samples/s from the FLOP model (independent of how a step is split into
    micro-batches)."""
    peak = device_peak_tflops(device_type)
    step_s = predict_step_seconds(flops_per_step, peak, world_size)
    return {
        "peak_tflops": peak,
        "assumed_mfu": ASSUMED_MFU,
        "predicted_step_s": step_s,
        "predicted_samples_per_s": samples_per_step / step_s if step_s else None,
    }


def batch_plan(spec, num_visual_tokens: int, text_tokens: int, world_size: int) -> dict:
    """Samples per step (the spec's), and how a rank's share splits into micro-batches at the assumed
    length (unknown for an `auto` budget, which is probed at start); steps per epoch when the training
    records can be counted."""
    samples_per_step = spec.batch.samples_per_step
    share = -(-samples_per_step // world_size)
    budget = spec.batch.tokens_per_micro_batch
    micro = None if budget == "auto" else min(share, samples_per_micro_batch(num_visual_tokens, text_tokens, budget))
    return {
        "samples_per_step": samples_per_step,
        "samples_per_micro_batch": micro,
        "micro_batches_per_step": -(-share // micro) if micro else None,
        "steps_per_epoch": _steps_per_epoch(spec),
    }


def _steps_per_epoch(spec) -> int | None:
    path = Path(spec.data.root) / spec.data.train
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return len(records) // spec.batch.samples_per_step if isinstance(records, list) else None


def build_plan(spec, world_size: int = 1, device_type: str = "cpu") -> dict:
    if isinstance(spec, InflateSpec):
        from cos_model import inflate_config

        src = source_config(spec.source, spec.storage.to_settings())
        dst = inflate_config(src, spec.plan_arg())
        return {
            "stage": "inflate", "visual_tokens": dst.num_visual_tokens, "image_size": dst.image_size,
            "scales": scale_table(dst), "source_visual_tokens": src.num_visual_tokens,
            "source_image_size": src.image_size, "output": join_uri(spec.run.output, "model"),
        }
    config = _pretrain_config(spec) if isinstance(spec, PretrainSpec) else source_config(spec.model.source, spec.storage.to_settings())
    with torch.device("meta"):
        model = CosForConditionalGeneration(config)
    set_trainable(model, list(spec.model.trainable))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(spec, FinetuneSpec) and spec.lora is not None:
        trainable += lora_params(model, spec.lora.target_modules, spec.lora.r)
    text_tokens = spec.data.max_text_tokens // 2  # assumed mean; the run measures the real one
    batch = batch_plan(spec, config.num_visual_tokens, text_tokens, world_size)
    micro = batch["samples_per_micro_batch"]
    ds_config = resolve_deepspeed(
        load_template(spec.deepspeed.template), spec, world_size=world_size, micro_batch_size=micro or 1,
        device_type=device_type, hidden_size=config.text_config.hidden_size, block_numel=largest_block_numel(model),
    )
    bytes_per_param = 2 if use_bf16(spec.deepspeed.precision, device_type) else 4
    sample_flops = flops_per_sample(config, text_tokens)
    samples_per_step = spec.batch.samples_per_step
    store = open_store(spec.run.output, spec.storage.to_settings())
    latest = find_latest(store)
    return {
        "stage": spec.stage,
        "visual_tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "scales": scale_table(config),
        "trainable_params": trainable,
        "total_params": total,
        **batch,
        "assumed_text_tokens": text_tokens,
        "flops_per_sample": sample_flops,
        "flops_per_step": sample_flops * samples_per_step,
        **_speed(sample_flops * samples_per_step, samples_per_step, world_size, device_type),
        "memory_per_rank_gib": {
            "weights": total * bytes_per_param / world_size / 2**30,
            "optimizer": trainable * (ADAM_BYTES_PER_PARAM + bytes_per_param) / world_size / 2**30,
        },
        "resume": (
            {"uri": join_uri(store.uri, "checkpoints", latest.name), "step": latest.step} if latest else None
        ),
        "deepspeed": ds_config,
    }


def format_plan(plan: dict) -> str:
    lines = [f"stage          {plan['stage']}",
             f"visual tokens  {plan['visual_tokens']} per image at {plan['image_size']} px"]
    for s in plan["scales"]:
        lines.append(f"  scale        window {s['window']:>3}: {s['windows']:>4} windows x {s['queries_per_window']} queries"
                     f" = {s['tokens']} tokens")
    if plan["stage"] == "inflate":
        lines.append(f"from           {plan['source_visual_tokens']} tokens at {plan['source_image_size']} px")
        lines.append(f"output         {plan['output']}")
        return "\n".join(lines)
    memory = plan["memory_per_rank_gib"]
    lines += [
        f"parameters     {plan['trainable_params']:,} trainable of {plan['total_params']:,}",
        _format_micro_batch(plan),
        f"FLOPs          {plan['flops_per_sample']:.3g} per sample"
        + (f", {plan['flops_per_step']:.3g} per step" if plan["flops_per_step"] else ""),
        f"step time      {_format_speed(plan)}",
        f"memory/rank    {memory['weights']:.2f} GiB weights + {memory['optimizer']:.2f} GiB optimizer (+ activations)",
        f"resume from    {plan['resume']['uri'] + ' (step ' + str(plan['resume']['step']) + ')' if plan['resume'] else 'nothing: starts fresh'}",
        "deepspeed      " + json.dumps(plan["deepspeed"], sort_keys=True),
    ]
    return "\n".join(lines)


def _format_micro_batch(plan: dict) -> str:
    epoch = f", {plan['steps_per_epoch']} steps per epoch" if plan["steps_per_epoch"] is not None else ""
    step = f"step           {plan['samples_per_step']} samples (all ranks){epoch}\n"
    if plan["samples_per_micro_batch"] is None:
        return step + "micro-batch    auto: probed on the device at start to fill its memory"
    return step + (f"micro-batch    ~{plan['samples_per_micro_batch']} samples, ~{plan['micro_batches_per_step']} "
                   f"per step per rank (assuming {plan['assumed_text_tokens']} text tokens)")


def _format_speed(plan: dict) -> str:
    if plan.get("predicted_samples_per_s") is None:
        return "unknown: no device peak (plan on the GPU machine with --device cuda, or set COSCTL_PEAK_TFLOPS)"
    step = f"~{plan['predicted_step_s']:.3g} s/step, " if plan["predicted_step_s"] is not None else ""
    return (f"{step}~{plan['predicted_samples_per_s']:.4g} samples/s "
            f"(FLOP model at {plan['assumed_mfu']:.0%} MFU of {plan['peak_tflops']:g} TFLOP/s per rank)")
