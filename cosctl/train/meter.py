"""What a training step measures: its loss and counts over all ranks (`StepStats`), and the per-step
record of throughput, FLOP rate, MFU and HFU with the run's loss and speed summary (`StepMeter`). A step's
FLOPs come from its own micro-batches (`step_shapes` -> `cosctl.plan.flops.step_flops`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cos_model import IGNORE_INDEX

from ..common.dist import all_reduce
from ..common.log import log
from ..plan.flops import PaddedPass, StepFlops, device_label, device_peak, peak_tflops, step_flops
from .autobatch import MemoryMeter
from .run import Run


@dataclass
class StepStats:
    loss: float  # mean over the step's label tokens, all ranks
    num_samples: int  # over all ranks
    num_tokens: int  # non-padding tokens over all ranks
    num_label_tokens: int
    num_micro_batches: int  # this rank's, the same on every rank


class StepMeter:
    """Per-step records (throughput, FLOP rate, MFU, HFU) and the run's loss and speed summary.

    A step's FLOPs are counted from its own micro-batches (`cosctl.plan.flops.step_flops`, summed over
    ranks): model FLOPs (TFLOP/s, MFU) from each trained sample's length and image, hardware FLOPs (HFU)
    from the micro-batches as run. MFU and HFU need the device's peak; without one (CPU, or a GPU
    `DEVICE_PEAKS` does not name, and no COSCTL_PEAK_TFLOPS) they are null and the log says why."""

    def __init__(self, run: Run):
        self.engine, self.world_size, self.device = run.engine, run.dist.world_size, run.dist.device
        self.config, self.spec = run.stage.cos_config, run.spec
        self.lora_params = run.trainable.get("lora", 0)
        self.peak = peak_tflops(run.dist.device)
        self.memory = MemoryMeter(run.dist.device)
        self.losses: list[float] = []
        self.timings: list[tuple[int, float]] = []  # (samples, seconds) per step
        log.info(peak_note(device_label(run.dist.device), self.peak))

    def step_flops(self, micro_batches: list[dict]) -> StepFlops:
        """This rank's FLOPs of a step's micro-batches (collated, before they move to the device)."""
        text, visual, shapes = step_shapes(micro_batches, self.config.image_token_id)
        return step_flops(
            self.config,
            text,
            visual,
            shapes,
            self.spec.model.trainable,
            lora_params=self.lora_params,
            gradient_checkpointing=self.spec.model.gradient_checkpointing,
        )

    def record(
        self, step: int, stats: StepStats, lr: float, elapsed: float, data_time: float, micro_batches: list[dict]
    ) -> dict:
        """`elapsed`: the whole step, loading included; `data_time`: the part spent waiting for this
        rank's micro-batches (images decoded in the step when `data.num_workers` is 0). Collective: the
        step's FLOPs are summed over ranks."""
        self.losses.append(stats.loss)
        self.timings.append((stats.num_samples, elapsed))
        local = self.step_flops(micro_batches)
        model_flops, hardware_flops = all_reduce([local.model, local.hardware], self.device)
        tflops, hardware = model_flops / elapsed / 1e12, hardware_flops / elapsed / 1e12
        norm = self.engine.get_global_grad_norm()
        return {
            "step": step,
            "time": time.time(),
            "loss": stats.loss,
            "lr": lr,
            "grad_norm": float(norm) if norm is not None else None,
            "samples": stats.num_samples,
            "tokens": stats.num_tokens,
            "label_tokens": stats.num_label_tokens,
            "micro_batches": stats.num_micro_batches,
            "step_time_s": elapsed,
            "data_time_s": data_time,
            "peak_mem_gib": self.memory.peak_gib(),  # the process's running peak (reserved on GPU)
            "samples_per_s": stats.num_samples / elapsed,
            "tokens_per_s": stats.num_tokens / elapsed,
            "flops": model_flops,
            "hardware_flops": hardware_flops,
            "tflops": tflops,
            "mfu": tflops / (self.peak * self.world_size) if self.peak else None,
            "hfu": hardware / (self.peak * self.world_size) if self.peak else None,
        }

    def loss_ends(self) -> dict:
        """Mean training loss of the first and last few steps (single steps are noisy with small
        token-budgeted batches)."""
        if not self.losses:
            return {"first_loss": None, "final_loss": None, "loss_window": 0}
        window = max(1, min(5, len(self.losses) // 4))
        return {
            "first_loss": sum(self.losses[:window]) / window,
            "final_loss": sum(self.losses[-window:]) / window,
            "loss_window": window,
        }

    def mean_rate(self) -> float | None:
        """Samples/s over this run's steps, skipping the first (warm-up) step when there are others."""
        timed = self.timings[1:] or self.timings
        seconds = sum(t for _, t in timed)
        return sum(n for n, _ in timed) / seconds if seconds else None

    def train_time_s(self) -> float:
        return sum(t for _, t in self.timings)


def peak_note(device_name: str, peak: float | None) -> str:
    """The log line saying what MFU and HFU are measured against, or why they are left out."""
    if peak is None:
        return (
            f"MFU and HFU not logged: no bf16 peak is known for {device_name!r} (cosctl.plan.flops.DEVICE_PEAKS "
            f"names the parts it knows); set COSCTL_PEAK_TFLOPS to the device's peak to log them"
        )
    part = device_peak(device_name)
    source = part.part if part and part.tflops == peak else "COSCTL_PEAK_TFLOPS"
    return f"MFU and HFU against {peak:g} TFLOP/s per rank ({source})"


def step_shapes(micro_batches: list[dict], image_token_id: int) -> tuple[list[int], list[int], list[PaddedPass]]:
    """A step's micro-batches as `cosctl.plan.flops.step_flops` takes them: the text and visual tokens of
    each sample that trains (has a label; not a filler's, not one whose image failed), and each
    micro-batch as run (rows x columns, images: a micro-batch without one runs a blank image)."""
    text: list[int] = []
    visual: list[int] = []
    shapes = []
    for batch in micro_batches:
        ids, labels = batch["input_ids"], batch["labels"]
        is_image = ids == image_token_id
        if "position_ids" in batch:  # packed: one row, samples back to back, positions restarting at 0
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
            bounds = list(zip(starts, [*starts[1:], ids.shape[1]], strict=True))
            lengths = [end - start for start, end in bounds]
            images = [int(is_image[0, start:end].sum()) for start, end in bounds]
            trains = [bool((labels[0, start:end] != IGNORE_INDEX).any()) for start, end in bounds]
        else:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            images = is_image.sum(dim=1).tolist()
            trains = (labels != IGNORE_INDEX).any(dim=1).tolist()
        for length, num_visual, trained in zip(lengths, images, trains, strict=True):
            if trained:
                text.append(int(length) - int(num_visual))
                visual.append(int(num_visual))
        num_images = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0
        shapes.append(PaddedPass(rows=ids.shape[0], columns=ids.shape[1], images=max(num_images, 1)))
    return text, visual, shapes
