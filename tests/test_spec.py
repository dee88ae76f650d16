"""Run specs: valid YAML parses to its stage's class; every mistake is one line naming file and key."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cos_model import Scale
from cosctl.spec.specs import (
    FinetuneSpec,
    InflateSpec,
    PretrainSpec,
    SpecError,
    apply_overrides,
    json_schema,
    load_spec,
    parse_spec,
    spec_hash,
    spec_to_dict,
)

PRETRAIN = {
    "stage": "pretrain",
    "run": {"name": "tiny", "output": "runs/tiny"},
    "model": {
        "vision": {
            "config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "patch_size": 4,
            }
        },
        "text": {
            "config": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
            }
        },
        "tokenizer": "tok",
        "image_size": 64,
        "feature_layers": [0, 1],
        "resampler_num_heads": 4,
    },
    "data": {"root": "d"},
    "optim": {"lr": 1e-3, "num_steps": 10},
    "batch": {"samples_per_step": 16, "tokens_per_micro_batch": 1024},
}
FINETUNE = {
    "stage": "finetune",
    "run": {"name": "tiny-ft", "output": "runs/tiny-ft"},
    "model": {"source": "runs/x/model"},
    "data": {"root": "d"},
    "optim": {"lr": 1e-4, "num_steps": 10},
    "batch": {"samples_per_step": 16, "tokens_per_micro_batch": 1024},
}
INFLATE = {
    "stage": "inflate",
    "run": {"name": "tiny-inf", "output": "runs/tiny-inf"},
    "source": "runs/x",
    "plan": "32to528",
}
DELETE = object()


def variant(base: dict, changes: dict) -> dict:
    """A deep copy of `base` with dotted keys set (or removed with DELETE)."""
    raw = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


def write(path: Path, content: object) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("raw", "cls"),
    [(PRETRAIN, PretrainSpec), (FINETUNE, FinetuneSpec), (INFLATE, InflateSpec)],
    ids=["pretrain", "finetune", "inflate"],
)
def test_valid_specs_parse_to_their_stage_class(raw, cls):
    """Each stage's minimal valid dict parses to that stage's spec class."""
    spec = parse_spec(raw)
    assert type(spec) is cls
    assert spec.stage == raw["stage"]


def test_defaults_are_filled():
    """Omitted sections take their documented defaults (zero3, auto precision, LoRA r 16)."""
    pretrain, finetune = parse_spec(PRETRAIN), parse_spec(FINETUNE)
    assert (pretrain.deepspeed.template, pretrain.deepspeed.precision) == ("zero3", "auto")
    assert pretrain.model.trainable == ("resampler", "projector")
    assert finetune.lora.r == 16


@pytest.mark.parametrize("raw", [PRETRAIN, FINETUNE, INFLATE], ids=["pretrain", "finetune", "inflate"])
def test_yaml_round_trip(tmp_path, raw):
    """A spec written to YAML and read back by load_spec equals the parsed dict, dump included."""
    spec = load_spec(write(tmp_path / "spec.yaml", raw))
    assert spec == parse_spec(raw)
    again = load_spec(write(tmp_path / "dumped.yaml", spec.model_dump(mode="json")))
    assert again == spec


def test_apply_overrides_sets_values_and_new_nested_keys():
    """key.path=value overrides parse the value as YAML, create missing sections, leave the input alone."""
    raw = apply_overrides(PRETRAIN, ["optim.lr=0.01", "checkpoint.every_steps=5"])
    assert raw["optim"]["lr"] == 0.01
    assert raw["checkpoint"] == {"every_steps": 5}
    assert PRETRAIN["optim"]["lr"] == 1e-3 and "checkpoint" not in PRETRAIN


def test_load_spec_applies_overrides(tmp_path):
    """load_spec applies --set overrides before validating."""
    spec = load_spec(write(tmp_path / "spec.yaml", PRETRAIN), ["optim.lr=0.01", "deepspeed.template=zero2"])
    assert spec.optim.lr == 0.01
    assert spec.deepspeed.template == "zero2"


def test_override_without_equals_raises():
    """An override with no '=' is a SpecError naming the bad item."""
    with pytest.raises(SpecError, match="--set 'optim.lr': expected key.path=value"):
        apply_overrides(PRETRAIN, ["optim.lr"])


PLAN_CHOICES = "must be one of 32to80, 32to336, 32to528, 80to336, 80to1296 or a mapping with image_size and scales"

MALFORMED = [
    pytest.param(variant(PRETRAIN, {"colour": "blue"}), "colour:", id="unknown-top-level-key"),
    pytest.param(variant(PRETRAIN, {"optim.learning_rate": 0.1}), "optim.learning_rate:", id="typo-in-section"),
    pytest.param(variant(PRETRAIN, {"optim.num_steps": DELETE}), "optim.num_steps:", id="missing-required-key"),
    pytest.param(variant(PRETRAIN, {"optim.num_steps": "ten"}), "optim.num_steps:", id="wrong-type"),
    pytest.param(variant(PRETRAIN, {"optim.lr": -0.1}), "optim.lr:", id="negative-lr"),
    pytest.param(variant(PRETRAIN, {"optim.num_steps": 0}), "optim.num_steps:", id="zero-steps"),
    pytest.param(
        variant(PRETRAIN, {"batch.tokens_per_micro_batch": "lots"}),
        "batch.tokens_per_micro_batch: expected a positive number of tokens or auto",
        id="budget-not-auto",
    ),
    pytest.param(
        variant(PRETRAIN, {"batch.samples_per_step": 0}),
        "batch.samples_per_step: Input should be greater than 0",
        id="no-samples-per-step",
    ),
    pytest.param(
        variant(PRETRAIN, {"batch.gradient_accumulation": 4}),
        "batch.gradient_accumulation: removed; set samples_per_step",
        id="old-fixed-accumulation",
    ),
    pytest.param(
        variant(PRETRAIN, {"batch.max_tokens_per_micro_batch": 4096}),
        "batch.max_tokens_per_micro_batch: only used with",
        id="auto-cap-without-auto",
    ),
    pytest.param(
        variant(PRETRAIN, {"batch.tokens_per_micro_batch": "auto", "batch.memory_fraction": 1.5}),
        "batch.memory_fraction:",
        id="memory-fraction-above-1",
    ),
    pytest.param(variant(PRETRAIN, {"stage": "train"}), "stage:", id="bad-stage"),
    pytest.param(variant(PRETRAIN, {"stage": DELETE}), "stage:", id="missing-stage"),
    pytest.param(variant(PRETRAIN, {"run.output": "gs://bucket/run"}), "run.output:", id="bad-uri-scheme"),
    pytest.param(variant(PRETRAIN, {"run.output": "s3://ab/run"}), "run.output:", id="bucket-too-short"),
    pytest.param(variant(PRETRAIN, {"run.name": "my run"}), "run.name:", id="run-name-with-space"),
    pytest.param(
        variant(
            PRETRAIN,
            {"model.scales": [{"window": 16, "queries_per_window": 16}, {"window": 5, "queries_per_window": 1}]},
        ),
        "model.scales[1].window:",
        id="window-not-dividing-grid",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.scales": [{"window": 16, "queries_per_window": 1, "stride": 2}]}),
        "model.scales[0].stride:",
        id="unknown-scale-key",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.feature_layers": [0, 3]}), "model.feature_layers:", id="feature-layer-out-of-range"
    ),
    pytest.param(
        variant(PRETRAIN, {"model.trainable": ["resampler", "head"]}),
        "model.trainable[1]:",
        id="unknown-trainable-module",
    ),
    pytest.param(variant(PRETRAIN, {"model.trainable": []}), "model.trainable:", id="empty-trainable"),
    pytest.param(
        variant(PRETRAIN, {"model.vision.config.hiden_size": 32}),
        "model.vision.config.hiden_size: unknown field",
        id="unknown-vision-config-field",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.text.config.model_type": DELETE}),
        "model.text.config.model_type:",
        id="random-text-without-model-type",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.text.config.model_type": "llamma"}),
        "model.text.config.model_type:",
        id="unknown-model-type",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.resampler_num_heads": 5}), "model.resampler_num_heads:", id="heads-not-dividing-width"
    ),
    pytest.param(variant(PRETRAIN, {"model.bridge_init_std": 0}), "model.bridge_init_std:", id="zero-init-std"),
    pytest.param(
        variant(PRETRAIN, {"model.image_size": 66}),
        "model.image_size: 66 px is not a multiple",
        id="image-size-not-patch-multiple",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.vision.config.image_size": 64}),
        "model.vision.config.image_size: set the resolution with model.image_size",
        id="image-size-in-vision-config",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.trainable": "resampler"}),
        "model.trainable: Input should be a valid list",
        id="trainable-not-a-list",
    ),
    pytest.param(
        variant(PRETRAIN, {"model.feature_layers": [0, "one"]}), "model.feature_layers[1]:", id="bad-feature-layer-item"
    ),
    pytest.param(variant(PRETRAIN, {"eval.every_steps": 5}), "eval.every_steps:", id="eval-without-eval-data"),
    pytest.param(
        variant(PRETRAIN, {"deepspeed.overrides": {"train_batch_size": 8}}),
        "deepspeed.overrides:",
        id="override-of-derived-deepspeed-key",
    ),
    pytest.param(variant(PRETRAIN, {"deepspeed.template": "zero1"}), "deepspeed.template:", id="unknown-template"),
    pytest.param(variant(PRETRAIN, {"optim.betas": [0.9, 1.5]}), "optim.betas:", id="bad-betas"),
    pytest.param(variant(PRETRAIN, {"optim.warmup_ratio": 1.0}), "optim.warmup_ratio:", id="warmup-ratio-one"),
    pytest.param(variant(PRETRAIN, {"optim": 5}), "optim:", id="section-not-a-mapping"),
    pytest.param(
        variant(PRETRAIN, {"storage.multipart_chunk_mb": 1}),
        "storage.multipart_chunk_mb:",
        id="multipart-part-below-s3-minimum",
    ),
    pytest.param(variant(PRETRAIN, {"slurm.time": "forever"}), "slurm.time:", id="bad-slurm-time"),
    pytest.param(
        variant(FINETUNE, {"model.trainable": ["projector", "language_model"]}),
        "model.trainable:",
        id="lora-with-language-model-trainable",
    ),
    pytest.param(variant(FINETUNE, {"model.source": DELETE}), "model.source:", id="finetune-without-source"),
    pytest.param(
        variant(FINETUNE, {"optim.lr_by_module": {"vision_tower": 1e-5}}),
        "optim.lr_by_module: vision_tower does not train in this stage",
        id="lr-for-a-frozen-module",
    ),
    pytest.param(
        variant(FINETUNE, {"optim.lr_by_module": {"bridge": 1e-5}}),
        "optim.lr_by_module.bridge:",
        id="lr-unknown-module",
    ),
    pytest.param(
        variant(FINETUNE, {"optim.lr_by_module": {"projector": 0}}), "optim.lr_by_module.projector:", id="lr-zero"
    ),
    pytest.param(variant(FINETUNE, {"lora.r": 0}), "lora.r:", id="lora-rank-zero"),
    pytest.param(variant(INFLATE, {"plan": "32to999"}), f"plan: {PLAN_CHOICES}", id="unknown-inflate-preset"),
    pytest.param(variant(INFLATE, {"plan": 32}), f"plan: {PLAN_CHOICES}", id="inflate-plan-wrong-type"),
    pytest.param(
        variant(INFLATE, {"plan": {"image_size": 448, "scales": []}}), "plan.scales:", id="inflate-plan-without-scales"
    ),
    pytest.param(
        variant(INFLATE, {"plan": {"image_size": 448}}),
        "plan.scales: required key is missing",
        id="inflate-plan-missing-scales",
    ),
    pytest.param(
        variant(INFLATE, {"plan": {"image_size": 448, "scales": [{"window": 0, "queries_per_window": 1}]}}),
        "plan.scales[0].window:",
        id="inflate-plan-bad-scale",
    ),
    pytest.param(variant(FINETUNE, {"lora.target_modules": [7]}), "lora.target_modules[0]:", id="bad-lora-target"),
    pytest.param("stage: [pretrain\n", "not valid YAML at line 2", id="yaml-syntax-error"),
    pytest.param([PRETRAIN], "the spec must be a YAML mapping, got list", id="list-not-mapping"),
    pytest.param("just words\n", "the spec must be a YAML mapping, got str", id="scalar-not-mapping"),
    pytest.param("", "the spec file is empty", id="empty-file"),
    pytest.param("# only a comment\n", "the spec file is empty", id="comment-only-file"),
    pytest.param(None, "no such spec file", id="nonexistent-file"),
]


def test_lr_by_module_names_what_trains_lora_included():
    """optim.lr_by_module accepts the modules a stage trains, the LLM under LoRA included, read-only."""
    spec = parse_spec(variant(FINETUNE, {"optim.lr_by_module": {"projector": 2e-5, "language_model": 1e-4}}))
    assert dict(spec.optim.lr_by_module) == {"projector": 2e-5, "language_model": 1e-4}
    with pytest.raises(TypeError):
        spec.optim.lr_by_module["resampler"] = 1.0


@pytest.mark.parametrize(("content", "expected"), MALFORMED)
def test_malformed_spec_is_one_line_naming_file_and_key(tmp_path, content, expected):
    """A malformed spec raises SpecError as one line: '<file>: <yaml key>: <problem>'."""
    path = tmp_path / "spec.yaml"
    if content is not None:
        write(path, content)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_several_mistakes_give_one_line_each(tmp_path):
    """Two independent mistakes are reported together, one line each."""
    path = write(tmp_path / "spec.yaml", variant(PRETRAIN, {"optim.lr": -1, "batch.tokens_per_micro_batch": 0}))
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    lines = str(excinfo.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["optim.lr", "batch.tokens_per_micro_batch"]
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_spec_hash_is_stable_and_value_sensitive():
    """Equal specs hash equal; changing one value changes the hash."""
    assert spec_hash(parse_spec(PRETRAIN)) == spec_hash(parse_spec(copy.deepcopy(PRETRAIN)))
    assert spec_hash(parse_spec(PRETRAIN)) != spec_hash(parse_spec(variant(PRETRAIN, {"optim.lr": 2e-3})))
    assert len(spec_hash(parse_spec(INFLATE))) == 16


def test_json_schema_covers_all_stages():
    """json_schema() is a JSON-serialisable dict naming the three stages."""
    schema = json_schema()
    text = json.dumps(schema)
    assert isinstance(schema, dict)
    assert all(f'"{stage}"' in text for stage in ("pretrain", "inflate", "finetune"))


def test_specs_are_frozen():
    """Assigning to a parsed spec raises instead of silently changing the run."""
    spec = parse_spec(PRETRAIN)
    with pytest.raises(ValidationError, match="frozen"):
        spec.optim.lr = 1.0
    with pytest.raises(ValidationError, match="frozen"):
        spec.stage = "finetune"


@pytest.mark.parametrize(
    ("content", "expected"),
    [([PRETRAIN], "the spec must be a YAML mapping, got list"), ("", "the spec file is empty")],
    ids=["list", "empty"],
)
def test_non_mapping_file_with_overrides_says_so(tmp_path, content, expected):
    """--set overrides do not hide a spec file whose top level is not a mapping."""
    path = write(tmp_path / "spec.yaml", content)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path, ["optim.lr=0.01"])
    assert str(excinfo.value) == f"{path}: {expected}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr.x=1", "--set 'optim.lr.x=1': optim.lr is not a mapping"),
        ("optim.lr", "--set 'optim.lr': expected key.path=value"),
        ("optim..lr=1", "--set 'optim..lr=1': expected key.path=value"),
        ("optim.lr=[1", "--set 'optim.lr=[1': the value is not valid YAML"),
    ],
    ids=["through-a-scalar", "no-equals", "empty-key-part", "bad-yaml-value"],
)
def test_override_errors_name_the_file(tmp_path, override, expected):
    """A bad --set item read through load_spec is one line starting with the spec file, like every error."""
    path = write(tmp_path / "spec.yaml", PRETRAIN)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path, [override])
    assert str(excinfo.value) == f"{path}: {expected}"


def test_override_value_reaches_its_key_only():
    """An override changes one key even when the YAML shares that mapping through an alias."""
    raw = apply_overrides(yaml.safe_load("base: &shared {k: 1}\nother: *shared\n"), ["base.k=2"])
    assert raw == {"base": {"k": 2}, "other": {"k": 1}}


def test_specs_are_deeply_immutable():
    """List fields are tuples and free-form mappings refuse in-place changes, so the hash cannot drift."""
    spec = parse_spec(variant(PRETRAIN, {"deepspeed.overrides": {"zero_optimization": {"stage": 3}, "tags": ["a"]}}))
    before = spec_hash(spec)
    assert isinstance(spec.model.feature_layers, tuple) and isinstance(spec.model.scales, tuple)
    assert isinstance(spec.slurm.setup, tuple)
    mutations = [
        lambda: spec.model.vision.config.__setitem__("hidden_size", 64),
        lambda: spec.model.text.config.pop("model_type"),
        lambda: spec.deepspeed.overrides.update(steps_per_print=1),
        lambda: spec.deepspeed.overrides["zero_optimization"].__setitem__("stage", 2),
        lambda: spec.deepspeed.overrides["tags"].append("b"),
        lambda: spec.model.feature_layers.append(2),
    ]
    for mutate in mutations:
        with pytest.raises((TypeError, AttributeError)):
            mutate()
    assert spec_hash(spec) == before
    assert spec.deepspeed.overrides == {"zero_optimization": {"stage": 3}, "tags": ("a",)}


def test_deep_copies():
    """A deep copy of spec data is a plain, editable dict; a deep copy or pickle of a spec stays read-only."""
    spec = parse_spec(variant(PRETRAIN, {"deepspeed.overrides": {"zero_optimization": {"stage": 3}, "tags": ["a"]}}))
    data = copy.deepcopy(spec.deepspeed.overrides)
    data["zero_optimization"]["stage"] = 2
    data["tags"].append("b")
    assert type(data) is dict and data == {"zero_optimization": {"stage": 2}, "tags": ["a", "b"]}
    assert spec.deepspeed.overrides["zero_optimization"]["stage"] == 3
    for other in (copy.deepcopy(spec), pickle.loads(pickle.dumps(spec))):
        assert other == spec and spec_hash(other) == spec_hash(spec)
        with pytest.raises(TypeError):
            other.deepspeed.overrides["zero_optimization"]["stage"] = 2


@pytest.mark.parametrize(
    "raw",
    [
        variant(
            PRETRAIN,
            {
                "deepspeed.overrides": {"zero_optimization": {"stage": 3}, "tags": ["a", {"b": 1}]},
                "slurm.setup": ["module load cuda"],
            },
        ),
        variant(INFLATE, {"plan": {"image_size": 448, "scales": [{"window": 8, "queries_per_window": 1}]}}),
        FINETUNE,
    ],
    ids=["pretrain", "inflate-mapping-plan", "finetune"],
)
def test_dict_round_trip_keeps_the_hash(raw):
    """spec_to_dict is plain JSON data that parses back to an equal spec with the same hash."""
    spec = parse_spec(raw)
    data = spec_to_dict(spec)
    assert json.loads(json.dumps(data)) == data
    again = parse_spec(json.loads(json.dumps(data)))
    assert again == spec and spec_hash(again) == spec_hash(spec)


def test_inflate_plan_arg():
    """plan_arg gives a preset name as is and a mapping plan with cos_model Scales."""
    assert parse_spec(INFLATE).plan_arg() == "32to528"
    plan = {"image_size": 448, "scales": [{"window": 8, "queries_per_window": 1}]}
    spec = parse_spec(variant(INFLATE, {"plan": plan}))
    assert spec.plan_arg() == {"image_size": 448, "scales": [Scale(window=8, queries_per_window=1)]}


def test_every_spec_field_is_described_in_the_schema():
    """Every field of every run-spec section carries a description in `cosctl spec schema`."""
    from cosctl.spec.specs import json_schema

    schema = json_schema()
    missing = []
    for name, definition in schema.get("$defs", {}).items():
        for field, prop in definition.get("properties", {}).items():
            if "description" not in prop:
                missing.append(f"{name}.{field}")
    assert not missing, missing


def test_a_spec_with_only_a_token_budget_is_refused_naming_the_global_batch():
    """A spec written before samples_per_step (only a token budget) is refused, and the message names
    the new key and what it means; the batching never changes silently."""
    old = variant(PRETRAIN, {"batch.samples_per_step": DELETE})
    with pytest.raises(SpecError, match=r"batch.samples_per_step: required key is missing \(the global batch"):
        parse_spec(old)
