"""Run specs: strict pydantic models of the YAML files in `recipes/`, one per stage.

`load_spec(path, overrides)` is the only way in: YAML -> `--set key=value` overrides -> validation; any
problem becomes one `SpecError` whose lines read `<file>: <yaml.key.path>: <what is wrong>`. Specs are
deeply immutable: sections are frozen models, list fields are tuples and the free-form mappings
(`model.*.config`, `deepspeed.overrides`) are `FrozenDict`s, so `spec_hash` cannot drift after loading.
Secrets never live in specs (storage and tracker credentials come from the environment or an AWS profile). The
sections that say how to train (data, optim, batch, DeepSpeed, checkpoint, storage, SLURM, eval, tracking, LoRA)
live in `cosctl.spec.sections`, the model sections in `cosctl.spec.model`; this module holds the stage
specs and the loading. A stage object (`cosctl.stages`) makes the model config from a spec.

Loading a spec never imports torch or transformers: the model sub-configs are checked by
`cosctl.spec.subconfigs` and the geometry by `cos_model.scales.check_layout`, both plain Python, so
`cosctl validate` answers in a fraction of a second. `cosctl.spec.paths.check_paths(spec)` is the
separate pre-flight that looks at the files a spec names (data, tokenizer, model folders and their
config.json).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from cos_model import PRESETS

from ..common.errors import SpecError
from .data import DataSpec
from .model import FinetuneModelSpec, PositiveScale, PretrainModelSpec
from .sections import (
    BatchSpec,
    CheckpointSpec,
    DeepSpeedSpec,
    EvalSpec,
    LoraSpec,
    OptimSpec,
    RunSection,
    Section,
    SlurmSpec,
    StorageSpec,
    TrackingSpec,
)

InflatePreset = Literal[tuple(PRESETS)]  # the names cos_model defines; nothing to keep in sync here
INFLATE_PRESETS: tuple[str, ...] = get_args(InflatePreset)
_PLAN_ERROR = f"must be one of {', '.join(INFLATE_PRESETS)} or a mapping with image_size and scales"
_STAGES = ("pretrain", "inflate", "finetune")


class TrainingSpec(Section):
    """What the training stages (pretrain, finetune) share."""

    run: RunSection = Field(description="Run name, output URI and seed.")
    data: DataSpec = Field(description="Training and held-out records.")
    optim: OptimSpec = Field(description="AdamW and the learning-rate schedule.")
    batch: BatchSpec = Field(description="How samples are grouped into micro-batches and optimizer steps.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed template and overrides.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="When to save and how many to keep.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint settings for s3:// URIs.")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="Batch-job resources for `cosctl slurm`.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Periodic held-out evaluation.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment trackers: TensorBoard, MLflow, W&B."
    )

    @model_validator(mode="after")
    def _eval_needs_data(self) -> TrainingSpec:
        for key in ("every_steps", "generate_every_steps"):
            if getattr(self.eval, key) is not None and self.data.eval is None:
                raise ValueError(f"eval.{key}: is set, but data.eval names no held-out records")
        return self

    @model_validator(mode="after")
    def _lr_for_trained_modules(self) -> TrainingSpec:
        untrained = sorted(set(self.optim.lr_by_module) - self.trained_modules())
        if untrained:
            raise ValueError(
                f"optim.lr_by_module: {', '.join(untrained)} does not train in this stage (model.trainable); "
                "leave it out of lr_by_module"
            )
        return self

    def trained_modules(self) -> set[str]:
        """The top-level modules whose parameters the optimizer updates."""
        return set(self.model.trainable)


class PretrainSpec(TrainingSpec):
    """A pretrain run: a new model from the towers the spec names, trained with the few-token chain."""

    stage: Literal["pretrain"] = Field(description="Which stage this spec runs.")
    model: PretrainModelSpec = Field(description="The model to build: towers, resolution, resampler scales.")


class FinetuneSpec(TrainingSpec):
    """A finetune run: the inflated model at `model.source`, LoRA on the LLM (or the whole LLM)."""

    stage: Literal["finetune"] = Field(description="Which stage this spec runs.")
    model: FinetuneModelSpec = Field(description="The inflated model to fine-tune and what trains.")
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="null = no LoRA (full LLM if trainable).")

    @model_validator(mode="after")
    def _lora_xor_full_llm(self) -> FinetuneSpec:
        if self.lora is not None and "language_model" in self.model.trainable:
            raise ValueError("model.trainable: language_model trains through lora; remove it or set lora: null")
        return self

    def trained_modules(self) -> set[str]:
        return set(self.model.trainable) | ({"language_model"} if self.lora is not None else set())


class InflatePlan(Section):
    image_size: int = Field(gt=0, description="Resolution of the inflated model in pixels.")
    scales: tuple[PositiveScale, ...] = Field(min_length=1, description="Scales of the inflated model, global first.")


# `plan` is a preset name or a mapping; the input's type picks the branch, so an error names one of them
# only. The tags are internal and never appear in messages (see `_yaml_loc`).
_PLAN_TAGS = ("preset", "mapping")


def _plan_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "preset" if value in INFLATE_PRESETS else None
    if isinstance(value, (dict, InflatePlan)):
        return "mapping"
    return None


Plan = Annotated[
    Union[Annotated[InflatePreset, Tag("preset")], Annotated[InflatePlan, Tag("mapping")]],
    Discriminator(_plan_kind, custom_error_type="inflate_plan", custom_error_message=_PLAN_ERROR),
]


class InflateSpec(Section):
    """An inflate run: the model at `source` grown by `plan` (a preset or scales at a resolution)."""

    stage: Literal["inflate"] = Field(description="Which stage this spec runs.")
    run: RunSection = Field(description="Run name, output URI and seed.")
    source: str = Field(description="Pretrain run output or model folder (path, file:// or s3://).")
    plan: Plan = Field(description=f"A preset ({', '.join(INFLATE_PRESETS)}) or {{image_size, scales}}.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint settings for s3:// URIs.")

    def plan_arg(self) -> str | dict:
        """The plan in the form `cos_model.inflate_config` takes."""
        if isinstance(self.plan, str):
            return self.plan
        return {"image_size": self.plan.image_size, "scales": list(self.plan.scales)}


RunSpec = Annotated[Union[PretrainSpec, InflateSpec, FinetuneSpec], Field(discriminator="stage")]
_ADAPTER = TypeAdapter(RunSpec)


def _yaml_loc(loc: tuple) -> tuple:
    """A pydantic error location as YAML keys: without the stage tag, the `plan` union's tags and
    pydantic's `[key]` marker."""
    if loc and loc[0] in _STAGES:
        loc = loc[1:]
    if len(loc) >= 2 and loc[0] == "plan" and loc[1] in _PLAN_TAGS:
        loc = loc[:1] + loc[2:]
    if loc and loc[-1] == "[key]":  # a mapping's key is wrong, not its value: the key names it
        loc = loc[:-1]
    return loc


def _yaml_key(loc: tuple) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


# Keys whose absence most likely means a spec written for an older cosctl: say what they are.
MISSING_HINTS = {
    "batch.samples_per_step": " (the global batch: samples per optimizer step over all ranks, e.g. 256; every "
    "stage optimises with it, and tokens_per_micro_batch now only splits it into micro-batches)",
}


def _format_errors(source: str, err: ValidationError) -> str:
    errors = err.errors()
    locs = [e["loc"] for e in errors]
    lines = []
    for e in errors:
        loc = e["loc"]
        if e["type"] == "too_short" and any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs):
            continue  # pydantic's tuples also count their invalid items as missing; the item's error says it
        key, message = _yaml_key(_yaml_loc(loc)), e["msg"].removeprefix("Value error, ")
        # List fields are tuples (immutable); in YAML they are lists.
        if e["type"] == "tuple_type":
            message = "Input should be a valid list"
        elif e["type"] in ("too_short", "too_long"):
            message = message.replace("Tuple ", "List ", 1)
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key, message = "stage", f"must be one of {', '.join(_STAGES)}"
        elif e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's key, a Scale's
            message = "unknown key (check the spelling; see `cosctl spec schema`)"
        elif e["type"] == "missing":
            message = "required key is missing" + MISSING_HINTS.get(_yaml_key(_yaml_loc(loc)), "")
        else:
            # Cross-field checks name their own key relative to the section: "scales[0].window: ...",
            # one problem per line.
            parts = message.splitlines() if all(_has_key(part) for part in message.splitlines()) else [message]
            for part in parts[:-1]:
                inner, _, rest = part.partition(": ")
                lines.append(f"{source}: {f'{key}.{inner}' if key else inner}: {rest}")
            message = parts[-1]
            inner, sep, rest = message.partition(": ")
            if sep and " " not in inner:
                key, message = (f"{key}.{inner}" if key else inner), rest
        message = " ".join(message.splitlines())
        lines.append(f"{source}: {key or '(top level)'}: {message}")
    return "\n".join(lines)


def _has_key(line: str) -> bool:
    inner, sep, _ = line.partition(": ")
    return bool(sep and inner and " " not in inner)


def _copy_tree(value: Any, path: frozenset = frozenset()) -> Any:
    """A copy of the dicts and lists in a YAML tree (YAML aliases become separate copies)."""
    if isinstance(value, (dict, list)):
        if id(value) in path:
            raise SpecError("the spec contains a recursive YAML alias")
        path = path | {id(value)}
        if isinstance(value, dict):
            return {key: _copy_tree(item, path) for key, item in value.items()}
        return [_copy_tree(item, path) for item in value]
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a raw spec dict, returning a new dict."""
    if not isinstance(raw, dict):
        raise SpecError(f"the spec must be a YAML mapping, got {type(raw).__name__}")
    result = _copy_tree(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise SpecError(f"--set {item!r}: expected key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"--set {item!r}: the value is not valid YAML") from None
        node = result
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {item!r}: {'.'.join(parts[:depth])} is not a mapping")
            node = child
        node[parts[-1]] = parsed
    return result


def parse_spec(raw: Any, source: str = "<spec>") -> PretrainSpec | InflateSpec | FinetuneSpec:
    if raw is None:
        raise SpecError(f"{source}: the spec is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the spec must be a YAML mapping, got {type(raw).__name__}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise SpecError(_format_errors(source, err)) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> PretrainSpec | InflateSpec | FinetuneSpec:
    """Read, override and validate a YAML run spec; raise `SpecError` naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the spec file: {getattr(err, 'strerror', None) or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raise SpecError(f"{path}: the spec file is empty")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping, got {type(raw).__name__}")
    if overrides:
        try:
            raw = apply_overrides(raw, list(overrides))
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None
    return parse_spec(raw, str(path))


# ---------------------------------------------------------------------------------------------------
# The files a spec names


# S3 bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
def spec_to_dict(spec: BaseModel) -> dict:
    """The spec as plain JSON data (lists, dicts, scalars); `parse_spec` reads it back to an equal spec."""
    return spec.model_dump(mode="json")


def spec_hash(spec: BaseModel) -> str:
    """Stable hash of the resolved spec (written into checkpoint manifests): SHA-256 of the canonical
    JSON dump (sorted keys), so it depends only on the values, never on key order or container types."""
    return hashlib.sha256(json.dumps(spec_to_dict(spec), sort_keys=True).encode()).hexdigest()[:16]


def json_schema() -> dict:
    """The JSON schema of run specs (`cosctl spec schema`, for editor completion)."""
    return _ADAPTER.json_schema()
