"""The model sections of a run spec, and their checks in plain Python: field names, value types, shapes and
geometry (`cosctl.spec.subconfigs`, `cos_model.scales.check_layout`), so checking a spec never imports
torch or transformers. The stage that builds the model makes its config from these sections
(`cosctl.stages`).

Every problem is one `key: what is wrong` line, keys relative to `model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator

from cos_model import DEFAULT_SCALES, Scale
from cos_model.scales import check_layout

from .frozen import FrozenDict
from .sections import FreeMapping, Module, Section
from .subconfigs import KNOWN_FIELDS, VISION_MODEL_TYPE, describe, field_problems, fields_for, resolve, shape_problems


def _positive(scale: Scale) -> Scale:
    for key in ("window", "queries_per_window"):
        if getattr(scale, key) <= 0:
            raise ValueError(f"{key}: Input should be greater than 0")
    if scale.parent is not None and scale.parent < 0:
        raise ValueError("parent: Input should be greater than or equal to 0")
    return scale


_SCALE_SCHEMA = {
    "type": "object",
    "title": "Scale",
    "description": "One resampler scale: square windows, each with its own learned queries.",
    "properties": {
        "window": {"type": "integer", "exclusiveMinimum": 0, "description": "Window side in patches."},
        "queries_per_window": {"type": "integer", "exclusiveMinimum": 0, "description": "Learned queries per window."},
        "parent": {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}],
            "default": None,
            "description": "Source scale this one was inflated from (inflate plans).",
        },
    },
    "required": ["window", "queries_per_window"],
    "additionalProperties": False,
}
# A resampler scale as YAML writes it (`{window, queries_per_window, parent?}`): `cos_model.Scale` itself,
# checked positive, with its fields described in the JSON schema (cos_model knows no pydantic).
PositiveScale = Annotated[Scale, AfterValidator(_positive), WithJsonSchema(_SCALE_SCHEMA)]


class ComponentSpec(Section):
    path: str | None = Field(
        None, description="Local folder of a pretrained checkpoint; null = random init from `config`."
    )
    config: FreeMapping = Field(default_factory=FrozenDict, description="Config fields (random init) or overrides.")


class PretrainModelSpec(Section):
    vision: ComponentSpec = Field(description="CLIP vision tower.")
    text: ComponentSpec = Field(description="Causal LM (config needs model_type when random).")
    tokenizer: str = Field(description="Local tokenizer folder (the LLM's, or the synthetic set's).")
    image_size: int = Field(224, gt=0, description="Input resolution in pixels.")
    feature_layers: tuple[int, ...] = Field((15, 22), description="0-indexed ViT blocks read.")
    scales: tuple[PositiveScale, ...] = Field(
        DEFAULT_SCALES,
        description="Resampler scales, global first: window (patches per side) and queries per window; the "
        "default is the 32-token chain [{16, 16}, {4, 1}].",
    )
    resampler_num_heads: int = Field(16, gt=0, description="Attention heads of every resampler cross-attention.")
    bridge_init_std: float = Field(
        0.02,
        gt=0.0,
        description="Std of the new bridge's trunc-normal init (queries, Linear weights): 0.02 for 1024-wide "
        "towers, about 1/sqrt(vision width) for narrow ones.",
    )
    trainable: tuple[Module, ...] = Field(("resampler", "projector"), description="Top-level modules that train.")
    gradient_checkpointing: bool = Field(False, description="Recompute LLM activations in the backward pass.")

    @model_validator(mode="after")
    def _components_are_buildable(self) -> PretrainModelSpec:
        problems = model_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


class FinetuneModelSpec(Section):
    source: str = Field(description="URI of an inflated model folder (the inflate stage's output).")
    trainable: tuple[Module, ...] = Field(
        ("resampler", "projector"), description="Top-level modules trained in full (the LLM trains through lora)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute LLM activations in the backward pass.")


def config_error_message(err: Exception) -> str:
    """One line naming the spec key for an error of CosConfig or a transformers config class."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[-1] if lines else type(err).__name__
    if type(err).__module__.split(".")[0] == "huggingface_hub":
        return f"model: {message}"
    # The resolution is model.image_size in the spec, not a vision config field.
    return message.replace("vision_config.image_size", "image_size").replace("vision_config.", "vision.config.")


def model_problems(model: PretrainModelSpec) -> list[str]:
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
        problems.append(
            f"vision.config.model_type: the vision tower is a CLIP ViT ({VISION_MODEL_TYPE}), "
            f"got {describe(vision['model_type'])}"
        )
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
        problems += shape_problems(resolved, vision_fields, "vision.config") or layout_problems(model, resolved)
    return problems


def layout_problems(model: PretrainModelSpec, vision: Mapping) -> list[str]:
    """The geometry rule of `CosConfig` (resolution, feature blocks, scales, resampler heads) for a
    resolved vision config, as `key: problem` lines relative to `model`."""
    for key in ("patch_size", "num_hidden_layers", "hidden_size"):
        value = vision.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:  # possible in a folder's config.json
            return [f"vision.config.{key}: must be a positive integer, got {describe(value)}"]
    try:
        check_layout(
            image_size=model.image_size,
            patch_size=vision["patch_size"],
            vision_layers=vision["num_hidden_layers"],
            vision_width=vision["hidden_size"],
            feature_layers=model.feature_layers,
            scales=list(model.scales),
            resampler_num_heads=model.resampler_num_heads,
        )
    except ValueError as err:
        return [config_error_message(err)]
    return []
