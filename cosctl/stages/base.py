"""What every stage object is and shares (docs/design.md §4): the stage's model config before any weight
exists, its trainable set, its build, and what it writes at a save and at the end.

A training stage (pretrain, finetune) is used in two ways:

    stage = stage_for(spec)
    stage.model_config(), stage.trainable_groups(), stage.plan_model()  # no weights: `cosctl plan`
    stage.build(staging, dist, partition)   # tokenizer, model (not yet in an engine; under ZeRO-3
                                            # already partitioned), cos_config, on every rank
    stage.write_trainable(engine, local_dir)   # a checkpoint's gathered trainable weights; collective
    stage.write_final(engine, store)           # the published artefact; collective; returns its key

Adding a stage means adding one subclass and one line in `cosctl.stages.STAGES`; nothing else asks which
stage a spec is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.building import Partitioner

from ..artefacts.published import save_model_folder
from ..checkpoint.committer import retrying
from ..checkpoint.layout import publish
from ..common.dist import Dist, on_main
from ..spec.sections import MODULES
from ..storage import ObjectStore


def set_trainable(model: nn.Module, modules: list[str]) -> None:
    """Freeze everything, then unfreeze the named top-level modules."""
    for name in modules:
        if name not in MODULES:
            raise ValueError(f"unknown module {name!r}; modules are {MODULES}")
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".")[0] in modules


def run_dtype(spec, device_type: str) -> torch.dtype:
    """The dtype weights are built in: bf16 when the run trains in bf16 (GPU by default), else fp32."""
    return torch.bfloat16 if spec.deepspeed.trains_in_bf16(device_type) else torch.float32


def num_params(parameters) -> int:
    """Parameters counted at their full size (under ZeRO-3 a partitioned one is [0]-shaped locally)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in parameters)


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count per top-level module (LoRA adapters counted as `lora`)."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.removeprefix("base_model.model.").split(".")
        group = "lora" if "lora_" in name else parts[0]
        counts[group] = counts.get(group, 0) + getattr(param, "ds_numel", param.numel())
    return counts


def gathered(params):
    """ZeRO-3's partitioned parameters whole for the `with` block (a no-op for plain parameters)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def trainable_state(engine) -> dict[str, torch.Tensor] | None:
    """Full (gathered) trainable weights on rank 0, None elsewhere; collective."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with gathered(p for _, p in named):
        if dist.get_rank() == 0:
            return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
    return None


def persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's persistent tensors as its state dict names them, one name per shared (tied) tensor:
    what a published folder holds. Under ZeRO-3 the parameters are the partitioned ones ([0]-shaped)."""
    seen: set[int] = set()
    named = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            named.append((name, tensor))
    return named


def stream_weights(engine, named: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for `named`, one at a time: under ZeRO-3 each parameter is gathered for its
    turn and partitioned again when the consumer asks for the next, so a rank holds its partition and
    one whole tensor, never the gathered model. Collective: every rank must run it to the end."""
    if engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()  # parameters left gathered by the last forward are released first
    for name, tensor in named:
        with gathered([tensor]) if hasattr(tensor, "ds_id") else nullcontext():
            yield name, tensor.detach()


def write_model_weights(engine, tokenizer, config: CosConfig, out_dir: Path) -> None:
    """The published model folder (`save_model_folder`) with the engine's weights streamed into it
    (`stream_weights`): rank 0 writes; collective. Every rank runs the gathers to the end also when rank
    0's writing fails, and then every rank raises rank 0's error (`on_main`), so none waits in a
    collective the others left."""
    named = persistent_tensors(engine.module)
    weights = stream_weights(engine, named)
    problem: Exception | None = None
    if dist.get_rank() == 0:
        layout = [(name, tensor.dtype, tuple(getattr(tensor, "ds_shape", tensor.shape))) for name, tensor in named]
        try:
            save_model_folder(config, layout, weights, tokenizer, out_dir)
        except Exception as err:  # raised below, on every rank
            problem = err
    for _ in weights:
        pass

    def outcome() -> None:
        if problem is not None:
            raise problem

    on_main(outcome)


def write_trainable_weights(engine, local_dir: Path) -> None:
    """The gathered trainable weights as one safetensors file (rank 0 writes); collective."""
    state = trainable_state(engine)
    if state is not None:
        local_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(local_dir / "model.safetensors"), metadata={"format": "pt"})


def publish_on_main(store: ObjectStore, local_dir: Path, prefix: str, max_outage_s: float) -> str:
    """Rank 0 publishes `local_dir` as `prefix` in the output store, retrying while the store fails
    (up to `storage.max_outage_minutes`); every rank gets the outcome. Returns the artefact's key."""
    on_main(lambda: retrying(lambda: publish(store, local_dir, prefix), f"publishing {prefix}", max_outage_s))
    return prefix


def scale_table(config: CosConfig) -> list[dict]:
    """Each scale's window, queries per window, windows and tokens on the config's patch grid."""
    return [
        {
            "window": s.window,
            "queries_per_window": s.queries_per_window,
            "windows": s.num_windows(config.grid_size),
            "tokens": s.num_tokens(config.grid_size),
        }
        for s in config.scales
    ]


class Stage(ABC):
    """One stage of the pipeline, made from its spec. `trains`: whether it runs the training loop."""

    name: ClassVar[str]
    trains: ClassVar[bool] = True

    def __init__(self, spec):
        self.spec = spec

    @abstractmethod
    def model_config(self) -> CosConfig:
        """The model's config from the spec and the sources it names, reading no weights."""

    def describe(self) -> dict:
        """What `cosctl plan` says of a stage that does not train (visual tokens, scales, sources)."""
        raise NotImplementedError(f"{self.name} trains: `cosctl plan` resolves it in full")


class TrainingStage(Stage):
    """A stage that trains: it builds its tokenizer and model, and writes weights at saves and at the end.
    After `build`, `tokenizer`, `model` and `cos_config` are set."""

    artefact: ClassVar[str] = "model"  # the published folder's name in the output store
    tokenizer: object
    model: nn.Module
    cos_config: CosConfig

    def trainable_groups(self) -> set[str]:
        """The parameter groups (`trainable_summary`'s keys) the spec says train."""
        return set(self.spec.model.trainable)

    @abstractmethod
    def tokenizer_folder(self) -> Path:
        """The local folder of the tokenizer the stage tokenises with (`cosctl data prepare`)."""

    def plan_model(self) -> tuple[nn.Module, int]:
        """The model on the meta device with the spec's trainable modules, and the LoRA parameters the
        run adds: what `cosctl plan` counts, without weights or memory."""
        with torch.device("meta"):
            model = CosForConditionalGeneration(self.model_config())
        set_trainable(model, list(self.spec.model.trainable))
        return model, 0

    @abstractmethod
    def build(self, staging: Path, dist_info: Dist, partition: Partitioner | None = None) -> TrainingStage:
        """Load the tokenizer and build the model in the run's dtype (every rank); with `partition`
        (ZeRO-3: `cosctl.train.engine.zero3_partition`) each parameter is built as it makes it, so a
        rank reads and keeps only its part. Returns self."""

    def write_trainable(self, engine, local_dir: Path) -> None:
        """A checkpoint's gathered trainable weights under `local_dir`; collective."""
        write_trainable_weights(engine, local_dir)

    @abstractmethod
    def write_final(self, engine, store: ObjectStore, staging: Path) -> str:
        """Publish the stage's artefact in `store`; collective; returns its key (`model` or `adapter`)."""
