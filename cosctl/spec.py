"""Run specs: strict pydantic models of the YAML files in `recipes/`, one per stage.

`load_spec(path, overrides)` is the only way in: YAML -> `--set key=value` overrides -> validation; any
problem becomes one `SpecError` whose lines read `<file>: <yaml.key.path>: <what is wrong>`. Specs are
deeply immutable: sections are frozen models, list fields are tuples and the free-form mappings
(`model.*.config`, `deepspeed.overrides`) are `FrozenDict`s, so `spec_hash` cannot drift after loading.
Secrets never live in specs (storage credentials come from the environment or an AWS profile).
`PretrainModelSpec.to_config()` is the only bridge from a spec into `cos_model`. The sections that say
how to train (data, optim, batch, DeepSpeed, checkpoint, storage, SLURM, eval, LoRA) live in
`cosctl.spec_sections`; this module holds the model sections, the stage specs and the loading.

Loading a spec never imports torch or transformers: the model sub-configs are checked by
`cosctl.subconfigs` and the geometry by `cos_model.scales.check_layout`, both plain Python, so
`cosctl validate` answers in a fraction of a second. `check_paths(spec)` is the separate pre-flight that
looks at the files a spec names (data, tokenizer, model folders and their config.json).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

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

from cos_model import DEFAULT_SCALES, PRESETS, Scale
from cos_model.scales import check_layout

from .errors import SpecError
from .frozen import FrozenDict, thaw
from .spec_sections import (
    BatchSpec,
    CheckpointSpec,
    DataSpec,
    DeepSpeedSpec,
    EvalSpec,
    FreeMapping,
    LoraSpec,
    OptimSpec,
    RunSection,
    Section,
    SlurmSpec,
    StorageSpec,
)
from .subconfigs import (
    KNOWN_FIELDS,
    VISION_MODEL_TYPE,
    coerce_floats,
    describe,
    field_problems,
    fields_for,
    resolve,
    shape_problems,
)

if TYPE_CHECKING:
    from cos_model import CosConfig

MODULES = ("vision_tower", "resampler", "projector", "language_model")
Module = Literal["vision_tower", "resampler", "projector", "language_model"]
InflatePreset = Literal[tuple(PRESETS)]  # the names cos_model defines; nothing to keep in sync here
INFLATE_PRESETS: tuple[str, ...] = get_args(InflatePreset)
_PLAN_ERROR = f"must be one of {', '.join(INFLATE_PRESETS)} or a mapping with image_size and scales"
_STAGES = ("pretrain", "inflate", "finetune")


class ComponentSpec(Section):
    path: str | None = Field(
        None, description="Local folder of a pretrained checkpoint; null = random init from `config`.")
    config: FreeMapping = Field(default_factory=FrozenDict, description="Config fields (random init) or overrides.")


class ScaleItem(Section):
    """One resampler scale as YAML writes it; `to_scale()` gives the `cos_model.Scale` it describes."""

    window: int = Field(gt=0, description="Window side in patches.")
    queries_per_window: int = Field(gt=0, description="Learned queries per window.")
    parent: int | None = Field(None, ge=0, description="Source scale this one was inflated from (inflate plans).")

    def to_scale(self) -> Scale:
        return Scale(self.window, self.queries_per_window, self.parent)


class PretrainModelSpec(Section):
    vision: ComponentSpec = Field(description="CLIP vision tower.")
    text: ComponentSpec = Field(description="Causal LM (config needs model_type when random).")
    tokenizer: str = Field(description="Local tokenizer folder (the LLM's, or the synthetic set's).")
    image_size: int = Field(224, gt=0, description="Input resolution in pixels.")
    feature_layers: tuple[int, ...] = Field((15, 22), description="0-indexed ViT blocks read.")
    scales: tuple[ScaleItem, ...] = Field(
        default_factory=lambda: tuple(ScaleItem(**s.to_dict()) for s in DEFAULT_SCALES),
        description="Resampler scales, global first: window (patches per side) and queries per window; the "
        "default is the 32-token chain [{16, 16}, {4, 1}].")
    resampler_num_heads: int = Field(16, gt=0, description="Attention heads of every resampler cross-attention.")
    trainable: tuple[Module, ...] = Field(("resampler", "projector"), description="Top-level modules that train.")
    gradient_checkpointing: bool = Field(False, description="Recompute LLM activations in the backward pass.")

    @model_validator(mode="after")
    def _components_are_buildable(self) -> PretrainModelSpec:
        problems = _model_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def to_config(self, vocab_size: int, image_token_id: int) -> CosConfig:
        """The CosConfig this spec describes (reads config.json from local paths; builds no weights)."""
        from transformers import AutoConfig, CLIPVisionConfig

        from cos_model import CosConfig

        vision = _local_config(CLIPVisionConfig, self.vision.path, "model.vision.path")
        vision.update(coerce_floats(thaw(self.vision.config), KNOWN_FIELDS[VISION_MODEL_TYPE]),
                      image_size=self.image_size, model_type=VISION_MODEL_TYPE)
        text = _local_config(AutoConfig, self.text.path, "model.text.path")
        overrides = thaw(self.text.config)
        model_type = overrides.get("model_type", text.get("model_type"))
        text.update(coerce_floats(overrides, fields_for(model_type) if isinstance(model_type, str) else None))
        if self.text.path is None:
            text["vocab_size"] = vocab_size
        try:
            return CosConfig(
                vision_config=vision,
                text_config=text,
                feature_layers=list(self.feature_layers),
                scales=[s.to_scale() for s in self.scales],
                resampler_num_heads=self.resampler_num_heads,
                image_token_id=image_token_id,
            )
        except Exception as err:  # transformers' strict configs raise their own error types
            if not isinstance(err, (ValueError, TypeError)) and type(err).__module__.split(".")[0] != "huggingface_hub":
                raise
            raise ValueError(_config_error_message(err)) from None


def _config_error_message(err: Exception) -> str:
    """One line naming the spec key for an error of CosConfig or a transformers config class."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[-1] if lines else type(err).__name__
    if type(err).__module__.split(".")[0] == "huggingface_hub":
        return f"model: {message}"
    # The resolution is model.image_size in the spec, not a vision config field.
    return message.replace("vision_config.image_size", "image_size").replace("vision_config.", "vision.config.")


def _model_problems(model: PretrainModelSpec) -> list[str]:
    """Every problem of the model section as `key: problem` lines (keys relative to `model`), checked
    in plain Python: field names and value types first, then the shapes (heads, geometry) of whatever
    the spec alone determines. Shapes that depend on a model folder's config.json are `check_paths`'s."""
    if not model.trainable:
        return ["trainable: at least one module must train"]
    vision, text = model.vision.config, model.text.config
    vision_fields = KNOWN_FIELDS[VISION_MODEL_TYPE]
    problems = []
    if "image_size" in vision:
        problems.append("vision.config.image_size: set the resolution with model.image_size instead")
    if vision.get("model_type", VISION_MODEL_TYPE) != VISION_MODEL_TYPE:
        problems.append(f"vision.config.model_type: the vision tower is a CLIP ViT ({VISION_MODEL_TYPE}), "
                        f"got {describe(vision['model_type'])}")
    problems += field_problems({k: v for k, v in vision.items() if k != "image_size"}, vision_fields, "vision.config")
    model_type, text_fields = text.get("model_type"), None
    if model_type is None:
        if model.text.path is None:
            problems.append("text.config.model_type: required when text.path is null (e.g. llama)")
    elif not isinstance(model_type, str):
        problems.append(f"text.config.model_type: unknown model type {model_type!r}")
    else:
        text_fields = fields_for(model_type)
        if text_fields is None:
            problems.append(f"text.config.model_type: unknown model type {model_type!r}")
    if model_type is None or text_fields is not None:
        problems += field_problems(text, text_fields, "text.config")
    if problems:
        return problems
    if model.text.path is None:
        problems += shape_problems(resolve(text, text_fields), text_fields, "text.config")
    if model.vision.path is None:
        resolved = resolve(vision, vision_fields)
        problems += shape_problems(resolved, vision_fields, "vision.config") or _layout_problems(model, resolved)
    return problems


def _layout_problems(model: PretrainModelSpec, vision: Mapping) -> list[str]:
    """The geometry rule of `CosConfig` (resolution, feature blocks, scales, resampler heads) for a
    resolved vision config, as `key: problem` lines relative to `model`."""
    for key in ("patch_size", "num_hidden_layers", "hidden_size"):
        value = vision.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # possible in a folder's config.json
            return [f"vision.config.{key}: must be a positive integer, got {describe(value)}"]
    try:
        check_layout(
            image_size=model.image_size, patch_size=vision["patch_size"], vision_layers=vision["num_hidden_layers"],
            vision_width=vision["hidden_size"], feature_layers=model.feature_layers,
            scales=[s.to_scale() for s in model.scales], resampler_num_heads=model.resampler_num_heads,
        )
    except ValueError as err:
        return [_config_error_message(err)]
    return []


def _local_config(config_class, path: str | None, key: str) -> dict:
    """config.json of a local model folder as a dict ({} for none); nothing is ever downloaded."""
    if path is None:
        return {}
    if not (Path(path) / "config.json").is_file():
        raise SpecError(f"{key}: {path} is not a local model folder with a config.json")
    try:
        return config_class.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError) as err:
        raise SpecError(f"{key}: cannot read {path}/config.json: {err}") from None


class FinetuneModelSpec(Section):
    source: str = Field(description="URI of an inflated model folder (the inflate stage's output).")
    trainable: tuple[Module, ...] = Field(
        ("resampler", "projector"), description="Top-level modules trained in full (the LLM trains through lora).")
    gradient_checkpointing: bool = Field(False, description="Recompute LLM activations in the backward pass.")


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

    @model_validator(mode="after")
    def _eval_needs_data(self) -> TrainingSpec:
        for key in ("every_steps", "generate_every_steps"):
            if getattr(self.eval, key) is not None and self.data.eval is None:
                raise ValueError(f"eval.{key}: is set, but data.eval names no held-out records")
        return self


class PretrainSpec(TrainingSpec):
    stage: Literal["pretrain"] = Field(description="Which stage this spec runs.")
    model: PretrainModelSpec = Field(description="The model to build: towers, resolution, resampler scales.")


class FinetuneSpec(TrainingSpec):
    stage: Literal["finetune"] = Field(description="Which stage this spec runs.")
    model: FinetuneModelSpec = Field(description="The inflated model to fine-tune and what trains.")
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="null = no LoRA (full LLM if trainable).")

    @model_validator(mode="after")
    def _lora_xor_full_llm(self) -> FinetuneSpec:
        if self.lora is not None and "language_model" in self.model.trainable:
            raise ValueError("model.trainable: language_model trains through lora; remove it or set lora: null")
        return self


class InflatePlan(Section):
    image_size: int = Field(gt=0, description="Resolution of the inflated model in pixels.")
    scales: tuple[ScaleItem, ...] = Field(min_length=1, description="Scales of the inflated model, global first.")


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
    stage: Literal["inflate"] = Field(description="Which stage this spec runs.")
    run: RunSection = Field(description="Run name, output URI and seed.")
    source: str = Field(description="Pretrain run output or model folder (path, file:// or s3://).")
    plan: Plan = Field(description=f"A preset ({', '.join(INFLATE_PRESETS)}) or {{image_size, scales}}.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint settings for s3:// URIs.")

    def plan_arg(self) -> str | dict:
        """The plan in the form `cos_model.inflate_config` takes."""
        if isinstance(self.plan, str):
            return self.plan
        return {"image_size": self.plan.image_size, "scales": [s.to_scale() for s in self.plan.scales]}


RunSpec = Annotated[Union[PretrainSpec, InflateSpec, FinetuneSpec], Field(discriminator="stage")]
_ADAPTER = TypeAdapter(RunSpec)


def _yaml_loc(loc: tuple) -> tuple:
    """A pydantic error location as YAML keys: without the stage tag and the `plan` union's tags."""
    if loc and loc[0] in _STAGES:
        loc = loc[1:]
    if len(loc) >= 2 and loc[0] == "plan" and loc[1] in _PLAN_TAGS:
        loc = loc[:1] + loc[2:]
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
        if e["type"] == "too_short" and any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs):
            continue  # pydantic's tuples also count their invalid items as missing; the item's error says it
        key, message = _yaml_key(_yaml_loc(loc)), e["msg"].removeprefix("Value error, ")
        # List fields are tuples (immutable); in YAML they are lists.
        if e["type"] == "tuple_type":
            message = "Input should be a valid list"
        elif e["type"] in ("too_short", "too_long"):
            message = message.replace("Tuple ", "List ", 1)
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            key, message = "stage", f"must be one of {', '.join(_STAGES)}"
        elif e["type"] == "extra_forbidden":
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
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_paths(spec: PretrainSpec | InflateSpec | FinetuneSpec) -> list[str]:
    """What is missing among the local files a valid spec names, as `key: problem` lines (empty when
    nothing is): the data root and its train/eval JSON files (an `s3://` root only for its syntax), the
    tokenizer folder, and the model folders with their config.json, whose shapes are then checked with
    the spec's overrides as `cosctl validate` checks a random-init spec. Reads no weights, imports no
    torch: the pre-flight of `cosctl validate`, for training commands to run before launching ranks."""
    problems: list[str] = []
    if isinstance(spec, TrainingSpec):
        problems += _data_problems(spec.data)
    if isinstance(spec, PretrainSpec):
        problems += _model_folder_problems(spec.model)
    return problems


def _data_problems(data: DataSpec) -> list[str]:
    root = data.root
    if root.startswith("s3://"):
        bucket = root[len("s3://"):].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            return [f"data.root: {root!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                    "dots and hyphens)"]
        return []
    if "://" in root and not root.startswith("file://"):
        return [f"data.root: unsupported URI scheme in {root!r}; use a path, file:// or s3://"]
    folder = Path(root.removeprefix("file://"))
    if not folder.is_dir():
        return [f"data.root: {root} {'is not a folder' if folder.exists() else 'does not exist'}"]
    return [
        f"data.{key}: {folder / name} {'is not a file' if (folder / name).exists() else 'does not exist'}"
        for key, name in (("train", data.train), ("eval", data.eval))
        if name is not None and not (folder / name).is_file()
    ]


def _model_folder_problems(model: PretrainModelSpec) -> list[str]:
    tokenizer = Path(model.tokenizer)
    if not tokenizer.is_dir():
        state = "is not a folder" if tokenizer.exists() else "does not exist"
        found = [f"model.tokenizer: {model.tokenizer} {state} (a local tokenizer folder)"]
    else:
        found = []
    problems: list[str] = []
    folders: dict[str, dict] = {}
    for name, component in (("vision", model.vision), ("text", model.text)):
        if component.path is None:
            continue
        config_file = Path(component.path) / "config.json"
        if not config_file.is_file():
            problems.append(f"model.{name}.path: {component.path} is not a local model folder with a config.json")
            continue
        try:
            folders[name] = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"model.{name}.path: cannot read {config_file}: {err}")
            continue
        if not isinstance(folders[name], dict):
            problems.append(f"model.{name}.path: {config_file} is not a JSON object")
            del folders[name]
    if folders and not problems:
        problems += _folder_shape_problems(model, folders)
    return found + problems


def _folder_shape_problems(model: PretrainModelSpec, folders: dict[str, dict]) -> list[str]:
    """The shapes of components built from a folder's config.json plus the spec's overrides."""
    problems = []
    vision_fields = KNOWN_FIELDS[VISION_MODEL_TYPE]
    if "vision" in folders:
        stored = folders["vision"]
        if stored.get("model_type") == "clip":  # a whole CLIP model's config: the tower's part
            stored = stored.get("vision_config") or {}
        vision = resolve({**{k: v for k, v in stored.items() if k in vision_fields}, **model.vision.config},
                         vision_fields)
        where = f"{model.vision.path}/config.json"
        found = shape_problems(vision, vision_fields, "vision.config") or _layout_problems(model, vision)
        problems += [_blame(line, model.vision.config, where, "vision") for line in found]
    if "text" in folders:
        model_type = model.text.config.get("model_type", folders["text"].get("model_type"))
        text_fields = fields_for(model_type) if isinstance(model_type, str) else None
        where = f"{model.text.path}/config.json"
        if text_fields is None:
            return problems + [f"model.text.path: {where}: unknown model_type {model_type!r}"]
        overrides = {k: v for k, v in model.text.config.items() if k != "model_type"}
        problems += [f"model.{line}" for line in field_problems(overrides, text_fields, "text.config")]
        if not problems:
            text = resolve({**folders["text"], **overrides}, text_fields)
            problems += [_blame(line, model.text.config, where, "text")
                         for line in shape_problems(text, text_fields, "text.config")]
    return problems


def _blame(line: str, overrides: Mapping, config_file: str, name: str) -> str:
    """A shape problem found in `{name}.config.<field>: ...` named after the spec key when the spec sets
    that field, else after the folder's config.json."""
    key, _, message = line.partition(": ")
    field = key.rsplit(".", 1)[-1]
    if not key.startswith(f"{name}.config.") or field in overrides:
        return f"model.{line}"
    return f"model.{name}.path: {config_file}: {field}: {message}"


def spec_to_dict(spec: BaseModel) -> dict:
    """The spec as plain JSON data (lists, dicts, scalars); `parse_spec` reads it back to an equal spec."""
    return spec.model_dump(mode="json")


def spec_hash(spec: BaseModel) -> str:
    """Stable hash of the resolved spec (written into checkpoint manifests): SHA-256 of the canonical
    JSON dump (sorted keys), so it depends only on the values, never on key order or container types."""
    return hashlib.sha256(json.dumps(spec_to_dict(spec), sort_keys=True).encode()).hexdigest()[:16]


def json_schema() -> dict:
    return _ADAPTER.json_schema()
