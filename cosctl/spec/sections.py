"""The sections of a run spec that say how to train rather than what the model is: run,
optimiser, batch, DeepSpeed, checkpoint, storage, SLURM, eval, tracking and LoRA; plus `Section`, the frozen,
strict base model every section (and `cosctl.spec.specs`'s stage specs) derives from.

Each section validates its own fields; checks that span sections live on the stage specs in
`cosctl.spec.specs`, which is also where specs are loaded, overridden and hashed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ..storage.base import StoreSettings
from .frozen import FrozenDict, freeze

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Keys that the resolver derives from the spec; overriding them would make the spec lie.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
}


# A free-form mapping (config fields, DeepSpeed overrides), frozen once validated.
FreeMapping = Annotated[dict[str, Any], AfterValidator(freeze)]
# The model's top-level modules, as `model.trainable` and `optim.lr_by_module` name them.
MODULES = ("vision_tower", "resampler", "projector", "language_model")
Module = Literal["vision_tower", "resampler", "projector", "language_model"]


def _token_budget(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"expected a positive number of tokens or auto, got {value!r}")


# One message for both forms (a plain union would report one error per member).
TokenBudget = Annotated[
    Union[int, Literal["auto"]],
    PlainValidator(_token_budget),
    WithJsonSchema({"anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"const": "auto"}]}),
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __deepcopy__(self, memo: dict | None = None) -> Section:
        # Deep-copying thaws FrozenDicts; a copied spec must stay as read-only as the original.
        copied = super().__deepcopy__(memo)
        for name, value in copied.__dict__.items():
            if isinstance(value, dict) and not isinstance(value, FrozenDict):
                copied.__dict__[name] = freeze(value)
        return copied


class RunSection(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name; names the run folder.")
    output: str = Field(
        description="Where checkpoints and artefacts go: a local path, file://PATH or s3://BUCKET/PREFIX."
    )
    seed: int = Field(0, ge=0, description="Seed for weights init, data order and dropout.")

    @field_validator("output")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" in value and not value.startswith(("file://", "s3://")):
            raise ValueError(f"unsupported URI scheme in {value!r}; use a path, file:// or s3://")
        if value.startswith("s3://") and len(value[5:].split("/", 1)[0]) < 3:
            raise ValueError(f"{value!r} needs a bucket name of at least 3 characters")
        return value


class OptimSpec(Section):
    """AdamW and the learning-rate schedule (linear warm-up, cosine down)."""

    lr: float = Field(gt=0.0, description="Peak learning rate (after warm-up).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas [beta1, beta2].")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps with linear warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    grad_clip: float = Field(1.0, ge=0.0, description="Global grad-norm clip; 0 disables.")
    num_steps: int = Field(gt=0, description="Optimizer steps in the stage.")
    lr_by_module: Annotated[dict[Module, Annotated[float, Field(gt=0.0)]], AfterValidator(freeze)] = Field(
        default_factory=FrozenDict,
        description="Peak learning rates of single top-level modules, e.g. {resampler: 2.0e-5, projector: "
        "2.0e-5} (LLaVA's mm_projector_lr); the other trained modules use lr, and the schedule scales all alike.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class BatchSpec(Section):
    """An optimizer step sees `samples_per_step` samples (over all ranks), whatever the stage's visual
    tokens; the token budget only splits them into micro-batches, so accumulation follows from it."""

    samples_per_step: int = Field(
        gt=0,
        description="The global batch: samples per optimizer step over all ranks (e.g. 256). Every stage "
        "optimises with it; the token budget only decides micro-batches and accumulation.",
    )
    tokens_per_micro_batch: TokenBudget = Field(
        description="Padded tokens (visual + text) per micro-batch per rank; auto probes the largest that "
        "fits in memory_fraction of the device's memory."
    )
    memory_fraction: float = Field(0.85, gt=0.0, le=1.0, description="Share of memory that auto may fill.")
    max_tokens_per_micro_batch: int | None = Field(None, gt=0, description="Upper bound for auto.")
    packing: bool = Field(
        False,
        description="Pack several samples into one row of up to tokens_per_micro_batch tokens (each "
        "attends only to itself) instead of padding one row per sample.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_fixed_accumulation(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gradient_accumulation" in data:
            raise ValueError(
                "gradient_accumulation: removed; set samples_per_step (the global batch in samples) "
                "and the accumulation follows from it and tokens_per_micro_batch"
            )
        return data

    @model_validator(mode="after")
    def _auto_settings_need_auto(self) -> BatchSpec:
        if self.tokens_per_micro_batch != "auto" and self.max_tokens_per_micro_batch is not None:
            raise ValueError("max_tokens_per_micro_batch: only used with tokens_per_micro_batch: auto")
        return self


class DeepSpeedSpec(Section):
    template: Literal["zero3", "zero2", "zero3_offload"] = Field(
        "zero3", description="DeepSpeed config template in deepspeed_configs/ (ZeRO stage and offload)."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU.")
    zero3_fetch: Literal["block", "module"] = Field(
        "block",
        description="ZeRO-3 gathers parameters per transformer block (one gather and hook pair per "
        "block) or per module (DeepSpeed's default).",
    )
    overrides: FreeMapping = Field(default_factory=FrozenDict, description="Merged into the resolved config.")

    @field_validator("overrides")
    @classmethod
    def _not_derived(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(DERIVED_DEEPSPEED_KEYS & set(overrides))
        if clash:
            raise ValueError(f"{clash} come from the batch/optim/precision settings; set those instead")
        return overrides

    def trains_in_bf16(self, device_type: str) -> bool:
        """Whether the run trains in bf16 on this device type ("cpu", "cuda"): auto = bf16 on a GPU."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


class CheckpointSpec(Section):
    every_steps: int | None = Field(None, gt=0, description="Save every N optimizer steps.")
    every_minutes: float | None = Field(
        None, gt=0.0, description="Save when this much time passed since the last save."
    )
    keep_last: int = Field(
        2, gt=0, description="Committed checkpoints kept; older ones are deleted after a newer commits."
    )


class StorageSpec(Section):
    """How to reach the S3-compatible store of `s3://` URIs (credentials come from the environment)."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO/Ceph); default: AWS_ENDPOINT_URL(_S3) or AWS."
    )
    region: str | None = Field(None, description="S3 region; default: the AWS profile's, else us-east-1.")
    path_style: bool = Field(False, description="Path-style addressing (most MinIO/Ceph setups).")
    max_concurrency: int = Field(8, gt=0, le=64, description="Parallel part uploads/downloads.")
    multipart_chunk_mb: int = Field(16, ge=5, le=5120, description="Multipart part size in MiB (S3 minimum 5).")
    timeout_s: float = Field(
        120.0,
        gt=0.0,
        description="A request that gets no answer (all its retries) fails "
        "within this many seconds, saying the endpoint does not answer.",
    )
    max_outage_minutes: float = Field(
        30.0,
        gt=0.0,
        description="How long checkpoint uploads may keep failing "
        "while training goes on; past it the run stops at a step boundary with exit "
        "75 so the scheduler requeues it.",
    )
    stop_grace_s: float = Field(
        120.0,
        ge=0.0,
        description="On SIGTERM or Ctrl-C with no save due, how long the run waits for a checkpoint "
        "upload already queued or in flight to commit before it exits; 0 abandons it at once.",
    )

    def to_settings(self) -> StoreSettings:
        """The plain settings the storage package takes (it never sees the spec)."""
        return StoreSettings(**self.model_dump(exclude={"max_outage_minutes", "stop_grace_s"}))


class SlurmSpec(Section):
    """The batch job `cosctl slurm` renders: resources, time, and the preemption warning's lead."""

    nodes: int = Field(1, gt=0, description="Nodes to allocate (sbatch --nodes).")
    gpus_per_node: int = Field(8, ge=0, description="0 = a CPU job (gloo).")
    ranks_per_node: int | None = Field(
        None,
        gt=0,
        description="Training processes per node (torchrun --nproc_per_node); default gpus_per_node, "
        "or 1 without GPUs.",
    )
    cpus_per_task: int = Field(16, gt=0, description="CPUs for the one task per node that runs all its ranks.")
    mem: str = Field("0", description="Memory per node (sbatch --mem); 0 = all of it.")
    time: str = Field(
        "24:00:00", pattern=r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$", description="Time limit (sbatch --time), [D-]HH:MM:SS."
    )
    partition: str | None = Field(None, description="sbatch --partition; default: the cluster's.")
    account: str | None = Field(None, description="sbatch --account.")
    qos: str | None = Field(None, description="sbatch --qos.")
    signal_lead_s: int = Field(300, gt=0, description="Seconds before the time limit to warn the job.")
    rendezvous_port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="torchrun rendezvous port on the first node; default derived from the job id.",
    )
    extra_sbatch: tuple[str, ...] = Field((), description="Extra `#SBATCH` option lines.")
    setup: tuple[str, ...] = Field((), description="Shell lines run before launching (modules, venv).")

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> SlurmSpec:
        if self.gpus_per_node and self.ranks_per_node and self.ranks_per_node > self.gpus_per_node:
            raise ValueError(
                f"ranks_per_node: is {self.ranks_per_node}, but gpus_per_node gives only "
                f"{self.gpus_per_node} GPUs (one rank per GPU)"
            )
        return self

    def num_ranks_per_node(self) -> int:
        """torchrun processes per node: `ranks_per_node`, else one per GPU, else one (CPU)."""
        return self.ranks_per_node or self.gpus_per_node or 1


class EvalSpec(Section):
    every_steps: int | None = Field(None, gt=0, description="Eval loss every N steps (needs data.eval).")
    num_batches: int = Field(4, gt=0, description="Held-out micro-batches averaged per eval.")
    swapped_images: bool = Field(
        True,
        description="Also the eval loss with each record given another record's image: the gap to the "
        "eval loss is how much the model uses the image.",
    )
    generate_every_steps: int | None = Field(
        None,
        gt=0,
        description="Greedy generation on held-out records every N steps, scored per task as "
        "`cosctl eval` scores them (VQA accuracy, exact match, acc@IoU 0.5, CIDEr); needs data.eval.",
    )
    generate_samples: int = Field(64, gt=0, description="Held-out records generated for at each such eval.")
    generate_max_new_tokens: int = Field(32, gt=0, description="Tokens generated per record at most.")
    generate_batch_size: int = Field(8, gt=0, description="Records generated together per rank.")


class MlflowSpec(Section):
    """An MLflow tracking server the run reports to. Credentials come from the environment only
    (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)."""

    tracking_uri: str = Field(
        description="http(s)://HOST:PORT of an MLflow server, or a store MLflow opens itself (sqlite:///PATH)."
    )
    experiment: str = Field("cosctl", min_length=1, description="Experiment name; created when missing.")
    run_name: str | None = Field(None, min_length=1, description="The tracked run's name; default run.name.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError(
                "holds credentials (user:password@); specs are logged and saved, so give them as "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
            )
        return value


class WandbSpec(Section):
    """A Weights & Biases project the run reports to. The API key comes from the environment only
    (WANDB_API_KEY, or `wandb login`); a self-hosted server from WANDB_BASE_URL."""

    project: str = Field(min_length=1, description="W&B project.")
    entity: str | None = Field(None, min_length=1, description="W&B team or user; default: the key's.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: everything is kept under the run folder's wandb/ for `wandb sync`."
    )
    run_name: str | None = Field(None, min_length=1, description="The tracked run's name; default run.name.")


class TrackingSpec(Section):
    """Where rank 0 reports the run: the spec, every step and eval record, the report figures and the
    summary. A tracker that is down never stops or slows training (docs/design.md §6)."""

    tensorboard: bool = Field(True, description="TensorBoard scalars under the run folder's tensorboard/.")
    mlflow: MlflowSpec | None = Field(None, description="An MLflow tracking server (pip install 'cosctl[mlflow]').")
    wandb: WandbSpec | None = Field(None, description="A W&B project (pip install 'cosctl[wandb]').")
    flush_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="At the end of a run (or a stop), how long rank 0 waits for the trackers to take "
        "what is still queued; what they have not taken by then is left out, with one line saying so.",
    )

    def missing_packages(self) -> list[str]:
        """One line per configured tracker whose package is not installed."""
        import importlib.util

        wanted = {"mlflow": self.mlflow, "wandb": self.wandb}
        return [
            f"tracking.{name}: the {name} package is not installed: pip install 'cosctl[{name}]'"
            for name, section in wanted.items()
            if section is not None and importlib.util.find_spec(name) is None
        ]


class LoraSpec(Section):
    """LoRA on the LLM's projections (peft), for finetune."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = Field(
        tuple(LORA_TARGETS), min_length=1, description="LLM projection names that get adapters (attention and MLP)."
    )
