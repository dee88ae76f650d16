"""The model sub-configs of a run spec (`model.vision.config`, `model.text.config`), checked without
importing transformers (whose config classes pull in torch: about 4 s on a 2-core machine).

`KNOWN_FIELDS` holds, per model type, every field transformers' config class accepts, with the value
kinds it takes and its default. It is what `fields_of` reads from transformers 5.24's
`CLIPVisionConfig` and `LlamaConfig`, written down; `tests/test_spec_model.py` keeps the two equal. Any
other `model_type` is looked up in transformers itself (the slow path, only for such specs).

On top of the types, sizes must be positive, dropouts in [0, 1), epsilons positive, activations and
rotary types ones transformers has, heads must divide the width and key/value heads the heads, and
rotary models need an even head size: the mistakes that transformers either accepts (and the model then
fails to build or run) or reports as a traceback.
Every problem is one `key: what is wrong` line, the key relative to the spec's `model` section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

VISION_MODEL_TYPE = "clip_vision_model"

# The fields every transformers config has (PreTrainedConfig's).
_BASE: dict[str, tuple[tuple[str, ...], Any]] = {
    "transformers_version": (("null", "str"), None),
    "architectures": (("list", "null"), None),
    "output_hidden_states": (("bool", "null"), False),
    "return_dict": (("bool", "null"), True),
    "dtype": (("null", "str"), None),
    "chunk_size_feed_forward": (("int",), 0),
    "is_encoder_decoder": (("bool",), False),
    "id2label": (("dict", "null"), None),
    "label2id": (("dict", "null"), None),
    "problem_type": (("null", "str"), None),
}

# field -> (kinds of value it takes, default), as `fields_of` gives them for transformers 5.24.0.
KNOWN_FIELDS: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {
    VISION_MODEL_TYPE: {
        **_BASE,
        "hidden_size": (("int",), 768),
        "intermediate_size": (("int",), 3072),
        "projection_dim": (("int",), 512),
        "num_hidden_layers": (("int",), 12),
        "num_attention_heads": (("int",), 12),
        "num_channels": (("int",), 3),
        "image_size": (("int", "list", "null"), 224),
        "patch_size": (("int", "list", "null"), 32),
        "hidden_act": (("str",), "quick_gelu"),
        "layer_norm_eps": (("float",), 1e-05),
        "attention_dropout": (("float", "int", "null"), 0.0),
        "initializer_range": (("float",), 0.02),
        "initializer_factor": (("float",), 1.0),
    },
    "llama": {
        **_BASE,
        "vocab_size": (("int",), 32000),
        "hidden_size": (("int",), 4096),
        "intermediate_size": (("int",), 11008),
        "num_hidden_layers": (("int",), 32),
        "num_attention_heads": (("int",), 32),
        "num_key_value_heads": (("int", "null"), None),
        "hidden_act": (("str",), "silu"),
        "max_position_embeddings": (("int",), 2048),
        "initializer_range": (("float",), 0.02),
        "rms_norm_eps": (("float",), 1e-06),
        "use_cache": (("bool",), True),
        "pad_token_id": (("int", "null"), None),
        "bos_token_id": (("int", "null"), 1),
        "eos_token_id": (("int", "list", "null"), 2),
        "pretraining_tp": (("int", "null"), 1),
        "tie_word_embeddings": (("bool",), False),
        "rope_parameters": (("dict", "null"), None),
        "attention_bias": (("bool",), False),
        "attention_dropout": (("float", "int", "null"), 0.0),
        "mlp_bias": (("bool",), False),
        "head_dim": (("int", "null"), None),
    },
}

# Sizes the model is built from: a positive integer (or null where transformers allows it), never a list.
POSITIVE_INTS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "patch_size",
        "image_size",
        "num_channels",
        "projection_dim",
    }
)

# transformers.activations.ACT2CLS and the rotary types of transformers.modeling_rope_utils (+ "default"),
# kept equal by tests/test_spec_model.py: a name outside them fails only when the model is built.
ACTIVATIONS = frozenset(
    {
        "gelu",
        "gelu_10",
        "gelu_accurate",
        "gelu_fast",
        "gelu_new",
        "gelu_python",
        "gelu_python_tanh",
        "gelu_pytorch_tanh",
        "hardswish",
        "laplace",
        "leaky_relu",
        "linear",
        "mish",
        "prelu",
        "quick_gelu",
        "relu",
        "relu2",
        "relu6",
        "sigmoid",
        "silu",
        "sqrtsoftplus",
        "swish",
        "tanh",
        "xielu",
    }
)
ROPE_TYPES = frozenset({"default", "dynamic", "linear", "llama3", "longrope", "proportional", "yarn"})

_KIND_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "dict": "a mapping",
    "list": "a list",
    "null": "null",
}
_SIMPLE = {
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "None": "null",
    "NoneType": "null",
    "torch.dtype": "str",
}


# ---------------------------------------------------------------------------------------------------
# Field tables


def _split_union(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "|" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _kind_of_text(token: str) -> str:
    if token in _SIMPLE:
        return _SIMPLE[token]
    return {"dict": "dict", "list": "list", "tuple": "list", "Literal": "str"}.get(token.split("[", 1)[0], "any")


def _kinds(annotation: Any) -> tuple[str, ...]:
    """The value kinds a dataclass field annotation admits (as YAML can give them)."""
    if isinstance(annotation, str):
        return tuple(sorted({_kind_of_text(token) for token in _split_union(annotation)}))
    is_union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    kinds = set()
    for arg in typing.get_args(annotation) if is_union else (annotation,):
        origin = typing.get_origin(arg)
        if arg is type(None):
            kinds.add("null")
        elif typing.is_typeddict(arg) or arg is dict or origin is dict:
            kinds.add("dict")
        elif origin in (list, tuple) or arg in (list, tuple):
            kinds.add("list")
        elif isinstance(arg, type) and arg.__name__ in _SIMPLE:
            kinds.add(_SIMPLE[arg.__name__])
        else:
            kinds.add("any")
    return tuple(sorted(kinds))


def fields_of(config_class: type) -> dict[str, tuple[tuple[str, ...], Any]]:
    """field -> (value kinds, default) of a transformers config class."""
    return {
        f.name: (_kinds(f.type), None if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(config_class)
    }


def fields_for(model_type: str) -> dict[str, tuple[tuple[str, ...], Any]] | None:
    """The field table of a model type; None when transformers does not know the type. Types other
    than those in `KNOWN_FIELDS` import transformers (and torch)."""
    if model_type in KNOWN_FIELDS:
        return KNOWN_FIELDS[model_type]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        return None
    return fields_of(CONFIG_MAPPING[model_type])


# ---------------------------------------------------------------------------------------------------
# Checks


def describe(value: Any) -> str:
    """A value as a message shows it: its YAML kind and what it is."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        hint = ""
        try:
            float(value)
        except ValueError:
            pass
        else:  # a number YAML read as text
            hint = (
                " (YAML reads an exponent without a decimal point as text: write 1.0e-6, not 1e-6)"
                if "e" in value.lower() and "." not in value
                else " (write it without quotes)"
            )
        return f"the string {value!r}{hint}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list {list(value)!r}"
    return repr(value)


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "any":
        return True
    if kind == "null":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))  # an int is a float transformers would refuse: coerced
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, Mapping)
    return isinstance(value, (list, tuple))


def _value_problem(field: str, value: Any, kinds: tuple[str, ...] | None) -> str | None:
    """What is wrong with one field's value (None when nothing is); `kinds` None = type unknown."""
    if field in POSITIVE_INTS:
        if value is None and kinds is not None and "null" in kinds:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"must be a positive integer, got {describe(value)}"
        return None
    if kinds is not None and not any(_is_kind(value, kind) for kind in kinds):
        expected = " or ".join(_KIND_NAMES.get(kind, kind) for kind in kinds)
        return f"expected {expected}, got {describe(value)}"
    if field == "hidden_act" and isinstance(value, str) and value not in ACTIVATIONS:
        return f"unknown activation {value!r}; transformers has {', '.join(sorted(ACTIVATIONS))}"
    if field == "rope_parameters" and isinstance(value, Mapping):
        rope_type = value.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            return f"rope_type: unknown rotary type {rope_type!r}; transformers has {', '.join(sorted(ROPE_TYPES))}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and field.endswith("dropout") and not 0 <= value < 1:
        return f"must be in [0, 1), got {value!r}"
    if number and field.endswith("_eps") and value <= 0:
        return f"must be positive, got {value!r}"
    if number and field.startswith("initializer_") and value < 0:
        return f"must be >= 0, got {value!r}"
    return None


def field_problems(config: Mapping, fields: Mapping | None, prefix: str) -> list[str]:
    """`prefix.field: problem` for every unknown field and bad value of `config`; with `fields` None (the
    model type is not known yet) only the name-based rules apply."""
    problems = []
    for field, value in config.items():
        if field == "model_type":
            continue
        if fields is not None and field not in fields:
            problems.append(f"{prefix}.{field}: unknown field (check the spelling)")
            continue
        problem = _value_problem(field, value, fields[field][0] if fields is not None else None)
        if problem:
            problems.append(f"{prefix}.{field}: {problem}")
    return problems


def resolve(config: Mapping, fields: Mapping) -> dict:
    """The config's values over the class defaults (what transformers would build)."""
    return {**{field: default for field, (_, default) in fields.items()}, **config}


def shape_problems(resolved: Mapping, fields: Mapping, prefix: str) -> list[str]:
    """Heads that do not divide the width, key/value heads that do not divide the heads, an odd rotary
    head size; for a resolved config whose values passed `field_problems`."""
    hidden, heads = resolved.get("hidden_size"), resolved.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int) and hidden > 0 and heads > 0):
        return []
    if hidden % heads:
        return [f"{prefix}.num_attention_heads: {heads} does not divide hidden_size {hidden}"]
    kv = resolved.get("num_key_value_heads")
    if isinstance(kv, int) and kv > 0 and heads % kv:
        return [f"{prefix}.num_key_value_heads: {kv} does not divide num_attention_heads {heads}"]
    if "rope_parameters" in fields:
        head_dim = resolved.get("head_dim")
        if head_dim is not None and head_dim % 2:
            return [f"{prefix}.head_dim: {head_dim} is odd; rotary position embeddings need an even head size"]
        if head_dim is None and (hidden // heads) % 2:
            return [
                f"{prefix}.num_attention_heads: hidden_size {hidden} / {heads} heads = {hidden // heads} "
                f"per head, odd; rotary position embeddings need an even head size"
            ]
    return []


def coerce_floats(config: Mapping, fields: Mapping | None) -> dict:
    """`config` with integers given for float-only fields turned into floats (YAML `1` for `1.0`), which
    transformers' strict config classes would refuse."""
    if fields is None:
        return dict(config)
    return {
        field: float(value)
        if field in fields and fields[field][0] == ("float",) and isinstance(value, int) and not isinstance(value, bool)
        else value
        for field, value in config.items()
    }


__all__ = [
    "ACTIVATIONS",
    "KNOWN_FIELDS",
    "POSITIVE_INTS",
    "ROPE_TYPES",
    "VISION_MODEL_TYPE",
    "coerce_floats",
    "describe",
    "field_problems",
    "fields_for",
    "fields_of",
    "resolve",
    "shape_problems",
]
