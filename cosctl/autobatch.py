"""`batch.tokens_per_micro_batch: auto`: the largest token budget whose micro-batches fit in memory.

The budget is probed on the real engine rather than estimated from a formula, because activation memory
depends on everything at once: LLM width and depth, ViT resolution, gradient checkpointing, attention
kernels, ZeRO stage and precision. The probe:

    1. builds synthetic micro-batches shaped like the stage's samples (visual tokens + the shortest
       example's text, so a budget holds the most images it ever can);
    2. runs forward + backward with 1 and 4 samples, reads each peak, and fits
       peak(n) = fixed + per_sample * n (activations grow linearly in the number of samples);
    3. solves for the n that fills `memory_fraction` of this rank's memory, capped by the spec's
       `max_tokens_per_micro_batch`, and runs that n; the line is refitted through the new, farther
       point and the next n run until the answer settles (a few passes at most: memory is not quite
       linear, e.g. allocator rounding, and the first two points are close together); a pass that
       runs out of memory bounds n from above, and the next try goes halfway below it;
    4. takes the largest n measured to fit.

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

PROBE_SAMPLES = (1, 4)
MAX_CHECKS = 4  # passes at the chosen size, each refitting with what the last one measured
ADAM_STATE_BYTES = 8  # fp32 exp_avg + exp_avg_sq
FOREACH_TEMP_BYTES = 4  # torch's foreach AdamW materialises an fp32 intermediate per parameter
REFIT_GAIN = 0.05  # stop refitting once the next count is within 5% of one measured to fit


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
        return (f"tokens_per_micro_batch auto -> {self.tokens_per_micro_batch} ({self.num_samples} samples of "
                f"{self.sample_tokens} tokens; {self.fixed_gib:.2f} GiB fixed + {self.per_sample_gib:.3f} GiB "
                f"per sample of {self.capacity_gib:.1f} GiB usable{checked})")


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


def solve_num_samples(peaks: dict[int, float], capacity: float, max_samples: int | None) -> tuple[float, float, int]:
    """(fixed, per-sample, n) from peak memory at several sample counts: the largest n with
    fixed + per_sample * n <= capacity, at least 1 and at most `max_samples`. The line goes through the
    smallest and the largest count measured (the farther apart, the less a reading's noise is
    magnified). Pure; units as given."""
    (n1, p1), (n2, p2) = min(peaks.items()), max(peaks.items())
    per_sample = max((p2 - p1) / (n2 - n1), 1e-9)  # a flat or noisy (CPU) reading must not divide by 0
    fixed = p1 - per_sample * n1
    num = max(1, int((capacity - fixed) / per_sample))
    return fixed, per_sample, min(num, max_samples) if max_samples else num


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


def probe_micro_batch(engine, config: CosConfig, num_text_tokens: int, *, memory_fraction: float,
                      max_tokens: int | None, device: torch.device) -> Probe:
    """The token budget that fills `memory_fraction` of memory (collective: every rank calls it)."""
    meter = MemoryMeter(device)
    num_text_tokens = max(2, num_text_tokens)  # at least one labelled token, so the loss is a number
    sample_tokens = config.num_visual_tokens + num_text_tokens
    max_samples = max(1, max_tokens // sample_tokens) if max_tokens else None
    # The optimizer's state does not exist until the first step, which comes after the probe.
    capacity = -_max_over_ranks(optimizer_state_gib(engine, device) - meter.capacity_gib(memory_fraction), device)

    def measure(num: int) -> float | None:
        """Peak GiB of a pass of `num` samples, the highest over all ranks; None when any rank ran out
        of memory. Agreed readings make every rank take the same next step and the same answer."""
        try:
            peak = _peak_of_pass(engine, config, num, num_text_tokens, meter)
        except torch.OutOfMemoryError:  # the pass has already released what it held
            peak = math.inf
        peak = _max_over_ranks(peak, device)
        return None if math.isinf(peak) else peak

    _release(engine, device)  # so the first reading does not count blocks cached while building
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        first = measure(PROBE_SAMPLES[0])
        if first is None:
            raise torch.OutOfMemoryError(f"tokens_per_micro_batch auto: one sample of {sample_tokens} tokens "
                                         "does not fit in memory")
        peaks = {PROBE_SAMPLES[0]: first}
        num = _fit_and_check(peaks, capacity, max_samples, measure)
    fixed, per_sample, _ = solve_num_samples(peaks, capacity, max_samples) if len(peaks) > 1 else (first, 0.0, 1)
    checked = peaks.get(num) if num not in PROBE_SAMPLES else None
    return Probe(sample_tokens, capacity, fixed, per_sample, num, checked)


def _fit_and_check(peaks: dict[int, float], capacity: float, max_samples: int | None, measure) -> int:
    """From one measured count: measure the second probe count, then repeatedly fit a line through the
    smallest and the largest count measured, and run the count it solves for. Each run is a point
    farther out, so the next line is better; it stops once the answer moves by less than `REFIT_GAIN`.
    A count that runs out of memory becomes an upper bound, halfway to which the next try goes.
    `peaks` gains every count measured."""
    out_of_memory: int | None = None
    candidates = [PROBE_SAMPLES[1]]
    for _ in range(MAX_CHECKS + 1):
        largest_fit = _largest_fit(peaks, capacity)
        num = candidates.pop() if candidates else solve_num_samples(peaks, capacity, max_samples)[2]
        if out_of_memory is not None:
            num = min(num, (largest_fit + out_of_memory) // 2)
        if num <= largest_fit:  # a larger count was measured to fit, so this one does
            return num
        if len(peaks) > 1 and num <= largest_fit * (1 + REFIT_GAIN):
            return largest_fit  # close enough: another pass would gain little
        if num in peaks:  # measured and over capacity: the fit cannot improve
            break
        peak = measure(num)
        if peak is None:
            out_of_memory = num
        else:
            peaks[num] = peak
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
