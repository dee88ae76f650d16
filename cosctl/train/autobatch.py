"""`batch.tokens_per_micro_batch: auto`: the largest token budget whose micro-batches fit in memory.

The budget is probed on the real engine rather than estimated from a formula, because activation memory
depends on everything at once: LLM width and depth, ViT resolution, gradient checkpointing, attention
kernels, ZeRO stage and precision. The probe:

    1. builds synthetic micro-batches shaped like the stage's samples (visual tokens + the shortest
       example's text, so a budget holds the most images it ever can);
    2. runs forward + backward with 1 and 4 samples, reads each peak, and fits
       peak(n) = fixed + per_sample * n (activations grow linearly in the number of samples);
    3. solves for the n that fills 90% of `memory_fraction` of this rank's memory (the margin), capped
       by the spec's `max_tokens_per_micro_batch` and by the rank's share of a step, and confirms that
       n with one pass; a confirming pass that reads over the capacity is refitted through and a
       smaller n confirmed once more, else the largest n measured to fit is taken. Nothing is ever
       probed upwards into an out-of-memory error: inside ZeRO-3's collectives one rank running out
       would leave the others waiting;
    4. a flat reading (CPU) has a floor on the per-sample slope, and the cap bounds the answer.

Every reading is the highest over all ranks (and the usable memory the lowest), so all ranks take the
same steps and reach the same budget; the data plan is global and must be. The probe runs before the
first optimizer step, so the AdamW state that step creates is kept free from the start
(`optimizer_state_gib`). It leaves no trace in training: RNG states are restored and the gradients it
made are dropped, so a run with `auto` trains exactly as one given the resolved number (a test checks
the losses). Memory is the GPU's (`max_memory_reserved` against its total) or, on CPU, the process's
peak RSS against what the node has available, shared among the ranks on the node.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cos_model import IGNORE_INDEX, CosConfig

from ..common.errors import UserError

PROBE_SAMPLES = (1, 4)
MARGIN = 0.9  # the count run to confirm aims at 90% of the capacity: a pass must never run out of memory
ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq
FOREACH_TEMP_BYTES = 4  # torch's foreach AdamW materialises an fp32 intermediate per parameter


class ProbeError(UserError):
    """The probe cannot find a budget (one sample does not fit, or a pass failed on some rank)."""


@dataclass(frozen=True)
class Probe:
    """What the probe measured and chose (all in samples of `sample_tokens` tokens)."""

    sample_tokens: int
    capacity_gib: float
    fixed_gib: float
    per_sample_gib: float
    num_samples: int
    checked_peak_gib: float | None

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.num_samples * self.sample_tokens

    def summary(self) -> str:
        checked = f", checked peak {self.checked_peak_gib:.2f} GiB" if self.checked_peak_gib is not None else ""
        return (
            f"tokens_per_micro_batch auto -> {self.tokens_per_micro_batch} ({self.num_samples} samples of "
            f"{self.sample_tokens} tokens; {self.fixed_gib:.2f} GiB fixed + {self.per_sample_gib:.3f} GiB "
            f"per sample of {self.capacity_gib:.1f} GiB usable{checked})"
        )


def synthetic_micro_batch(config: CosConfig, num_samples: int, num_text_tokens: int, seed: int = 0) -> dict:
    """A micro-batch in the loader's layout: a few prompt tokens, the image's visual-token slots, the
    rest of the text; the second half of the text is the labelled answer. No padding."""
    generator = torch.Generator().manual_seed(seed)
    vocab, num_visual = config.text_config.vocab_size, config.num_visual_tokens
    text = torch.randint(3, vocab - 1, (num_samples, num_text_tokens), generator=generator)
    # A tokenizer's <image> id may lie inside the vocabulary: text must never contain it.
    text = text.masked_fill(text == config.image_token_id, 3 if config.image_token_id != 3 else 4)
    prefix = min(4, num_text_tokens)
    visual = torch.full((num_samples, num_visual), config.image_token_id)
    input_ids = torch.cat([text[:, :prefix], visual, text[:, prefix:]], dim=1)
    labels = input_ids.clone()
    labels[:, : input_ids.shape[1] - num_text_tokens // 2] = IGNORE_INDEX
    size = config.image_size
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(num_samples, 3, size, size, generator=generator),
    }


def solve_num_samples(
    peaks: dict[int, float], capacity: float, max_samples: int, min_per_sample: float = 0.0
) -> tuple[float, float, int]:
    """(fixed, per-sample, n) from peak memory at several sample counts: the largest n with
    fixed + per_sample * n <= capacity, at least 1 and at most `max_samples`. The line goes through the
    smallest and the largest count measured (the farther apart, the less a reading's noise is
    magnified); its slope is at least `min_per_sample`, so a flat or noisy reading (CPU allocators can
    hide growth) cannot ask for an absurd count. Pure; units as given."""
    (n1, p1), (n2, p2) = min(peaks.items()), max(peaks.items())
    per_sample = max((p2 - p1) / (n2 - n1) if n2 > n1 else 0.0, min_per_sample, 1e-9)
    fixed = p1 - per_sample * n1
    num = max(1, int((capacity - fixed) / per_sample))
    return fixed, per_sample, min(num, max_samples)


class MemoryMeter:
    """Peak memory of this process on its device, resettable, and the memory a rank may fill."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            # Reserved, not allocated: fragmentation counts too, and a step whose reserved memory hits
            # the device's limit makes the allocator flush its cache and retry (slowly) every step.
            return torch.cuda.max_memory_reserved(self.device) / 2**30
        return _proc_status_kib("VmHWM") / 2**20

    def capacity_gib(self, fraction: float) -> float:
        """`fraction` of the device's memory (GPU) or of this rank's share of the node's available
        memory plus what the process already holds (CPU)."""
        if self.device.type == "cuda":
            return fraction * torch.cuda.mem_get_info(self.device)[1] / 2**30
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available = _meminfo_kib("MemAvailable") / local_ranks + _proc_status_kib("VmRSS")
        return fraction * available / 2**20


def optimizer_state_gib(engine, device: torch.device) -> float:
    """Memory this rank's AdamW will add at its first step: two fp32 moments per trainable parameter in
    its ZeRO partition, plus, on GPU, one fp32 temporary per parameter for the multi-tensor update."""
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    bytes_per_param = ADAM_STATE_BYTES + (FOREACH_TEMP_BYTES if device.type == "cuda" else 0)
    return numel / world_size * bytes_per_param / 2**30


def probe_micro_batch(
    engine,
    config: CosConfig,
    num_text_tokens: int,
    *,
    memory_fraction: float,
    max_tokens: int | None,
    max_samples: int,
    device: torch.device,
) -> Probe:
    """The token budget that fills `memory_fraction` of memory (collective: every rank calls it).
    `max_samples` is a hard cap: more samples than a rank's share of a step never help."""
    meter = MemoryMeter(device)
    num_text_tokens = max(2, num_text_tokens)  # at least one labelled token, so the loss is a number
    sample_tokens = config.num_visual_tokens + num_text_tokens
    cap = max(1, min(max_samples, max_tokens // sample_tokens if max_tokens else max_samples))
    # The optimizer's state does not exist until the first step, which comes after the probe.
    capacity = -_max_over_ranks(optimizer_state_gib(engine, device) - meter.capacity_gib(memory_fraction), device)
    # A sample's activations hold at least its token embeddings at the LLM's width, in fp32.
    min_per_sample = sample_tokens * config.text_config.hidden_size * 4 / 2**30

    def measure(num: int) -> float:
        """Peak GiB of a pass of `num` samples, the highest over all ranks. Any failure on any rank is
        agreed before anything else runs, and ends the probe with one line."""
        try:
            peak, problem = _peak_of_pass(engine, config, num, num_text_tokens, meter), None
        except (torch.OutOfMemoryError, RuntimeError) as err:  # the pass has released what it held
            peak, problem = math.inf, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        peak = _max_over_ranks(peak, device)
        if math.isinf(peak):
            raise ProbeError(
                f"batch.tokens_per_micro_batch auto: a pass of {num} samples of {sample_tokens} tokens "
                f"failed on a rank ({problem or 'on another rank'}); set a fixed budget"
            )
        return peak

    _release(engine, device)  # so the first reading does not count blocks cached while building
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        peaks = {1: measure(1)}
        if peaks[1] > capacity:
            raise ProbeError(
                f"batch.tokens_per_micro_batch auto: one sample of {sample_tokens} tokens needs "
                f"{peaks[1]:.2f} GiB, more than the {capacity:.2f} GiB usable (batch.memory_fraction "
                f"{memory_fraction}); enable model.gradient_checkpointing or use more ranks"
            )
        num = _extrapolate_and_confirm(peaks, capacity, cap, min_per_sample, measure)
    fixed, per_sample, _ = (
        solve_num_samples(peaks, capacity, cap, min_per_sample) if len(peaks) > 1 else (peaks[1], 0.0, 1)
    )
    return Probe(sample_tokens, capacity, fixed, per_sample, num, peaks.get(num) if num > PROBE_SAMPLES[1] else None)


def _extrapolate_and_confirm(peaks: dict[int, float], capacity: float, cap: int, min_per_sample: float, measure) -> int:
    """From small passes (1 and 4 samples), extrapolate the count that fills `MARGIN` of the capacity,
    and confirm it with one pass; if that pass reads over the capacity, refit through it and confirm
    one smaller count; else fall back to the largest count measured to fit. Counts are only ever run
    below a line's prediction with the margin, never probed upwards into an out-of-memory error, which
    inside ZeRO-3's collectives would leave the other ranks waiting. `peaks` gains every count run."""
    if cap > 1:
        small = min(PROBE_SAMPLES[1], cap)
        peaks[small] = measure(small)
    for _ in range(2):
        num = solve_num_samples(peaks, MARGIN * capacity, cap, min_per_sample)[2]
        if num in peaks or num <= max(peaks):
            break
        peaks[num] = measure(num)
        if peaks[num] <= capacity:
            return num
    return max(1, _largest_fit(peaks, capacity))


def _largest_fit(peaks: dict[int, float], capacity: float) -> int:
    return max((n for n, peak in peaks.items() if peak <= capacity), default=0)


def _peak_of_pass(engine, config: CosConfig, num_samples: int, num_text_tokens: int, meter: MemoryMeter) -> float:
    """Peak memory of one forward + backward; whatever it leaves (gradients, cached blocks) is
    released afterwards, also when it runs out of memory."""
    batch = synthetic_micro_batch(config, num_samples, num_text_tokens)
    device = meter.device
    meter.reset()
    try:
        loss = engine(**{k: v.to(device) for k, v in batch.items()}).loss
        engine.backward(loss)
        return meter.peak_gib()
    finally:
        loss = None
        _release(engine, device)


def _release(engine, device: torch.device) -> None:
    """Drop the probe's gradients (ZeRO keeps its own copies; `zero_grad` also resets its accumulation
    counter, so the first training step overwrites instead of adding) and free the memory."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _max_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _proc_status_kib(field: str) -> int:
    return _read_kib(Path("/proc/self/status"), field)


def _meminfo_kib(field: str) -> int:
    return _read_kib(Path("/proc/meminfo"), field)


def _read_kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{path} has no {field} line: cannot measure memory for tokens_per_micro_batch auto")
