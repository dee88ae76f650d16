"""What a training spec resolves to on a world of ranks, before anything runs: the one place these numbers
are computed. `setup_run` resolves the run it starts (and logs it, and writes `resolved.json`), and
`cosctl plan` prints the same `Resolved` for the same inputs, so what the plan says is by construction
what the run does (docs/design.md §5, §8).

    resolve(spec, model: ModelShape, world: World, lengths: LengthStats | None, num_records) -> Resolved

    samples_per_step         the spec's global batch (every stage optimises with it)
    samples_per_rank         the busiest rank's share of a step: ceil(samples_per_step / world size)
    tokens_per_micro_batch   the spec's budget, or "auto" (probed on the engine at start)
    samples_per_micro_batch  how many samples of the mean length the budget holds, at most a rank's share
                             (None for auto); DeepSpeed's batch bookkeeping gets it (or 1)
    micro_batches_per_step   a rank's share over it (None for auto)
    steps_per_epoch          records // samples_per_step (a partial step is dropped)
    deepspeed                the DeepSpeed config, resolved (`deepspeed_config.resolve_deepspeed`)
    flops                    model and hardware FLOPs per sample of the mean length (`flops.sample_flops`)

Lengths are the prepared training split's (`cosctl.data.records.length_stats`); without them (a plan made
before the data is on this machine) the mean text length is assumed to be half of
`data.max_text_tokens`, and `lengths_measured` says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn
from transformers import PreTrainedModel

from cos_model import CosConfig

from .deepspeed_config import load_template, resolve_deepspeed
from .flops import SampleFlops, sample_flops


@dataclass(frozen=True)
class World:
    """The ranks a run uses and the device they train on ("cpu" or "cuda")."""

    size: int = 1
    device_type: str = "cpu"


@dataclass(frozen=True)
class ModelShape:
    """What the resolver needs of a model: its config, the parameters of its largest transformer block
    (ZeRO bucket sizes), the modules that train, and the parameters LoRA adds."""

    config: CosConfig
    block_numel: int | None
    trainable: tuple[str, ...]
    lora_params: int = 0
    gradient_checkpointing: bool = False


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks in the model: the ones transformers never splits across
    devices (`_no_split_modules`), of the model itself and of its LLM."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or [])
    return names


def largest_block_numel(model: nn.Module) -> int | None:
    """Parameters of the model's largest transformer block (None when it has none); a ZeRO-3 partitioned
    parameter counts at its full size."""
    classes = block_classes(model)
    sizes = [
        sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters())
        for m in model.modules()
        if type(m).__name__ in classes
    ]
    return max(sizes, default=None)


def model_shape(model: nn.Module, config: CosConfig, spec, lora_params: int = 0) -> ModelShape:
    """The shape of `model` (real, or on the meta device) trained as `spec` says."""
    return ModelShape(
        config,
        largest_block_numel(model),
        tuple(spec.model.trainable),
        lora_params,
        spec.model.gradient_checkpointing,
    )


def samples_per_micro_batch(num_visual_tokens: int, num_text_tokens: int, tokens_per_micro_batch: int) -> int:
    """How many samples of this length fit a micro-batch of `tokens_per_micro_batch` padded tokens."""
    sample_length = num_visual_tokens + num_text_tokens
    if sample_length <= 0 or tokens_per_micro_batch <= 0:
        raise ValueError(f"lengths and budget must be positive, got {sample_length} and {tokens_per_micro_batch}")
    return tokens_per_micro_batch // sample_length


def steps_per_epoch(num_examples: int, samples_per_step: int) -> int:
    """Optimizer steps in one pass over `num_examples` (a partial step is dropped)."""
    return num_examples // samples_per_step


def samples_per_rank(samples_per_step: int, world_size: int) -> int:
    """The busiest rank's share of a step's samples (steps are dealt to ranks; some get one more)."""
    return -(-samples_per_step // world_size)


def deepspeed_config(spec, model: ModelShape, world: World, micro_batch_size: int) -> dict:
    """The run's DeepSpeed config: the spec's template filled for this model, world and micro-batch."""
    return resolve_deepspeed(
        load_template(spec.deepspeed.template),
        spec,
        world_size=world.size,
        micro_batch_size=micro_batch_size,
        device_type=world.device_type,
        hidden_size=model.config.text_config.hidden_size,
        block_numel=model.block_numel,
    )


@dataclass(frozen=True)
class Resolved:
    """A training spec's numbers on a world of ranks (see the module docstring)."""

    world_size: int
    device_type: str
    samples_per_step: int
    samples_per_rank: int
    tokens_per_micro_batch: int | str
    visual_tokens: int
    mean_text_tokens: int
    lengths_measured: bool
    samples_per_micro_batch: int | None
    micro_batches_per_step: int | None
    steps_per_epoch: int | None
    bf16: bool
    deepspeed: dict
    flops: SampleFlops

    def to_dict(self) -> dict:
        """Plain JSON data (what `resolved.json` and `cosctl plan --json` hold)."""
        return {**asdict(self), "flops": self.flops.to_dict()}


def resolve(spec, model: ModelShape, world: World, lengths=None, num_records: int | None = None) -> Resolved:
    """The numbers a training spec resolves to (module docstring); pure. `lengths` is a `LengthStats` of
    the training split, or None to assume half of `data.max_text_tokens` per sample."""
    if world.size < 1:
        raise ValueError(f"world size must be >= 1, got {world.size}")
    visual = model.config.num_visual_tokens
    text = lengths.mean_text_tokens if lengths is not None else spec.data.max_text_tokens // 2
    share = samples_per_rank(spec.batch.samples_per_step, world.size)
    budget = spec.batch.tokens_per_micro_batch
    micro = None if budget == "auto" else max(1, min(share, samples_per_micro_batch(visual, text, budget)))
    return Resolved(
        world_size=world.size,
        device_type=world.device_type,
        samples_per_step=spec.batch.samples_per_step,
        samples_per_rank=share,
        tokens_per_micro_batch=budget,
        visual_tokens=visual,
        mean_text_tokens=text,
        lengths_measured=lengths is not None,
        samples_per_micro_batch=micro,
        micro_batches_per_step=None if micro is None else -(-share // micro),
        steps_per_epoch=None if num_records is None else steps_per_epoch(num_records, spec.batch.samples_per_step),
        bf16=spec.deepspeed.trains_in_bf16(world.device_type),
        deepspeed=deepspeed_config(spec, model, world, micro or 1),
        flops=sample_flops(
            model.config,
            text,
            model.trainable,
            lora_params=model.lora_params,
            gradient_checkpointing=model.gradient_checkpointing,
        ),
    )
