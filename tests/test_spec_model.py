"""Spec-time checks of the model sub-configs (`model.vision.config`, `model.text.config`) and of the local
paths a spec names: every mistake is one line naming the YAML key, through `cosctl validate` too, and
none of it needs torch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cosctl.cli.app import app
from cosctl.spec.paths import check_paths
from cosctl.spec.specs import SpecError, load_spec, parse_spec
from cosctl.stages.pretrain import pretrain_config
from tests.harness import REPO

runner = CliRunner()
TINY = yaml.safe_load((REPO / "recipes/tiny/pretrain.yaml").read_text())


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


V, T = "model.vision.config", "model.text.config"
# (YAML key set, value, the key the one error line must start with)
MALFORMED_MODEL = [
    # text: wrong types
    (f"{T}.hidden_size", "128", f"{T}.hidden_size"),
    (f"{T}.hidden_size", 128.0, f"{T}.hidden_size"),
    (f"{T}.hidden_size", [128], f"{T}.hidden_size"),
    (f"{T}.hidden_size", True, f"{T}.hidden_size"),
    (f"{T}.hidden_size", None, f"{T}.hidden_size"),
    (f"{T}.num_hidden_layers", 2.5, f"{T}.num_hidden_layers"),
    (f"{T}.rms_norm_eps", "1e-6", f"{T}.rms_norm_eps"),
    (f"{T}.tie_word_embeddings", "yes", f"{T}.tie_word_embeddings"),
    (f"{T}.rope_parameters", 5, f"{T}.rope_parameters"),
    (f"{T}.model_type", 7, f"{T}.model_type"),
    (T, "llama", T),
    # text: sizes
    (f"{T}.hidden_size", 0, f"{T}.hidden_size"),
    (f"{T}.hidden_size", -128, f"{T}.hidden_size"),
    (f"{T}.intermediate_size", 0, f"{T}.intermediate_size"),
    (f"{T}.intermediate_size", -256, f"{T}.intermediate_size"),
    (f"{T}.num_hidden_layers", 0, f"{T}.num_hidden_layers"),
    (f"{T}.num_attention_heads", 0, f"{T}.num_attention_heads"),
    (f"{T}.num_attention_heads", -4, f"{T}.num_attention_heads"),
    (f"{T}.num_key_value_heads", 0, f"{T}.num_key_value_heads"),
    (f"{T}.max_position_embeddings", -1, f"{T}.max_position_embeddings"),
    (f"{T}.vocab_size", 0, f"{T}.vocab_size"),
    (f"{T}.head_dim", 0, f"{T}.head_dim"),
    (f"{T}.rms_norm_eps", -1.0e-6, f"{T}.rms_norm_eps"),
    (f"{T}.attention_dropout", 1.5, f"{T}.attention_dropout"),
    # text: shapes that do not fit together
    (f"{T}.num_attention_heads", 5, f"{T}.num_attention_heads: 5 does not divide hidden_size 128"),
    (f"{T}.num_key_value_heads", 3, f"{T}.num_key_value_heads: 3 does not divide num_attention_heads 4"),
    (f"{T}.num_key_value_heads", 8, f"{T}.num_key_value_heads: 8 does not divide num_attention_heads 4"),
    (f"{T}.head_dim", 7, f"{T}.head_dim"),
    (f"{T}.hidden_act", "nonsense", f"{T}.hidden_act: unknown activation 'nonsense'"),
    (f"{T}.rope_parameters", {"rope_type": "bogus"}, f"{T}.rope_parameters: rope_type: unknown rotary type 'bogus'"),
    # text: unknown
    (f"{T}.hiden_size", 128, f"{T}.hiden_size: unknown field"),
    (f"{T}.model_type", "llamma", f"{T}.model_type: unknown model type 'llamma'"),
    # vision: wrong types
    (f"{V}.hidden_size", "64", f"{V}.hidden_size"),
    (f"{V}.hidden_size", 64.5, f"{V}.hidden_size"),
    (f"{V}.patch_size", [4, 4], f"{V}.patch_size"),
    (f"{V}.layer_norm_eps", "small", f"{V}.layer_norm_eps"),
    (f"{V}.hidden_act", 5, f"{V}.hidden_act"),
    (V, ["hidden_size", 64], V),
    # vision: sizes
    (f"{V}.hidden_size", 0, f"{V}.hidden_size"),
    (f"{V}.hidden_size", -64, f"{V}.hidden_size"),
    (f"{V}.intermediate_size", 0, f"{V}.intermediate_size"),
    (f"{V}.num_hidden_layers", -3, f"{V}.num_hidden_layers"),
    (f"{V}.patch_size", 0, f"{V}.patch_size"),
    (f"{V}.num_channels", 0, f"{V}.num_channels"),
    # vision: shapes that do not fit together
    (f"{V}.num_attention_heads", 3, f"{V}.num_attention_heads: 3 does not divide hidden_size 64"),
    (f"{V}.patch_size", 5, "model.image_size: 64 px is not a multiple of the 5-px patch"),
    (f"{V}.num_hidden_layers", 2, "model.feature_layers: block 2 is outside the ViT's blocks 0..1"),
    (f"{V}.hidden_size", 66, f"{V}.num_attention_heads: 4 does not divide hidden_size 66"),
    # vision: unknown
    (f"{V}.hiden_size", 64, f"{V}.hiden_size: unknown field"),
    (f"{V}.model_type", "siglip_vision_model", f"{V}.model_type"),
]
MALFORMED_IDS = [f"{key.removeprefix('model.')}={value!r}" for key, value, _ in MALFORMED_MODEL]


@pytest.mark.parametrize(("key", "value", "expected"), MALFORMED_MODEL, ids=MALFORMED_IDS)
def test_malformed_model_config_is_one_clean_line(tmp_path, key, value, expected):
    """`cosctl validate` of the tiny recipe with one bad sub-config value: exit 1, one line that names the
    YAML key, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_set(TINY, key, value)))
    result = runner.invoke(app, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: {expected}"), lines[0]
    with pytest.raises(SpecError):
        load_spec(path)


def test_there_are_enough_malformed_variants():
    """The malformed list covers at least the 34 variants the spec checks were written against."""
    assert len(MALFORMED_MODEL) >= 34


def test_known_fields_are_what_transformers_takes():
    """The field tables used without transformers equal what transformers' config classes declare (same
    names, kinds and defaults), so an upgrade that changes them fails here rather than in a run."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from cosctl.spec.subconfigs import KNOWN_FIELDS, fields_of

    assert KNOWN_FIELDS["clip_vision_model"] == fields_of(CLIPVisionConfig)
    assert KNOWN_FIELDS["llama"] == fields_of(LlamaConfig)


def test_known_activations_and_rotary_types_are_what_transformers_has():
    """The activation and rotary-type names accepted without transformers are exactly its own."""
    from transformers.activations import ACT2CLS
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from cosctl.spec.subconfigs import ACTIVATIONS, ROPE_TYPES

    assert ACTIVATIONS == set(ACT2CLS)
    assert ROPE_TYPES == set(ROPE_INIT_FUNCTIONS) | {"default"}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model.text.config.num_key_value_heads", 2),
        ("model.text.config.head_dim", 64),
        ("model.text.config.rms_norm_eps", 1),
        ("model.text.config.attention_dropout", 0),
        ("model.text.config.rope_parameters", {"rope_type": "default", "rope_theta": 10000.0}),
        ("model.vision.config.layer_norm_eps", 1.0e-6),
        ("model.vision.config.num_attention_heads", 8),
        ("model.vision.config.model_type", "clip_vision_model"),
    ],
    ids=lambda v: str(v),
)
def test_valid_model_configs_pass_and_build(key, value):
    """What the spec-time check accepts, transformers builds: the config comes out with the value (an
    integer given for a float field arrives as a float)."""
    spec = parse_spec(_set(TINY, key, value))
    config = pretrain_config(spec, vocab_size=100, image_token_id=99)
    part = config.text_config if ".text." in key else config.vision_config
    field = key.rsplit(".", 1)[-1]
    if field != "model_type":
        assert getattr(part, field) == value


def test_an_integer_for_a_float_field_becomes_a_float():
    """YAML `1` for a float field is accepted and reaches transformers (which refuses ints there) as 1.0."""
    spec = parse_spec(_set(TINY, "model.text.config.rms_norm_eps", 1))
    assert isinstance(pretrain_config(spec, vocab_size=100, image_token_id=99).text_config.rms_norm_eps, float)


def test_several_model_mistakes_give_one_line_each(tmp_path):
    """Independent mistakes in both sub-configs are reported together, one line each."""
    raw = _set(_set(TINY, "model.text.config.hidden_size", -1), "model.vision.config.patch_size", "4")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as excinfo:
        load_spec(path)
    lines = str(excinfo.value).splitlines()
    keys = [line.split(": ")[1] for line in lines]
    assert keys == ["model.vision.config.patch_size", "model.text.config.hidden_size"]


# ---------------------------------------------------------------------------------------------------
# check_paths


def _data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "tokenizer").mkdir(parents=True)
    (root / "train.json").write_text("[]")
    (root / "eval.json").write_text("[]")
    return root


def _with_data(raw: dict, root: Path) -> dict:
    return _set(_set(raw, "data.root", str(root)), "model.tokenizer", str(root / "tokenizer"))


def test_check_paths_is_empty_when_everything_is_there(tmp_path):
    """A spec whose data root, JSON files and tokenizer exist has nothing to report."""
    assert check_paths(parse_spec(_with_data(TINY, _data(tmp_path)))) == []


def test_check_paths_names_each_missing_file(tmp_path):
    """Each missing file is one line naming its spec key; a missing root is reported alone."""
    root = _data(tmp_path)
    (root / "eval.json").unlink()
    raw = _set(_set(_with_data(TINY, root), "data.train", "nope.json"), "model.tokenizer", str(tmp_path / "tok"))
    assert check_paths(parse_spec(raw)) == [
        f"data.train: {root / 'nope.json'} does not exist",
        f"data.eval: {root / 'eval.json'} does not exist",
        f"model.tokenizer: {tmp_path / 'tok'} does not exist (a local tokenizer folder)",
    ]
    assert (
        check_paths(parse_spec(_set(TINY, "data.root", str(tmp_path / "gone"))))[0]
        == f"data.root: {tmp_path / 'gone'} does not exist"
    )


@pytest.mark.parametrize(
    ("root", "ok"),
    [
        ("s3://my-bucket/cos/data", True),
        ("s3://My_Bucket/x", False),
        ("s3://ab/x", False),
        ("s3://bucket..name/x", False),
    ],
)
def test_an_s3_data_root_is_checked_for_syntax_only(tmp_path, root, ok):
    """An s3:// data root is never contacted: only its bucket name is checked."""
    raw = _set(_with_data(TINY, _data(tmp_path)), "data.root", root)
    problems = check_paths(parse_spec(raw))
    assert (problems == []) is ok, problems
    assert all(p.startswith("data.root: ") for p in problems)


def _model_folder(path: Path, config: dict) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


LLAMA_FILE = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
    "rope_theta": 10000.0,
}
CLIP_FILE = {
    "model_type": "clip",
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 224,
    },
}


def _from_folders(tmp_path: Path, text: dict, vision: dict, overrides: dict | None = None) -> dict:
    raw = _with_data(TINY, _data(tmp_path))
    raw["model"]["text"] = {"path": _model_folder(tmp_path / "llm", text), "config": (overrides or {}).get("text", {})}
    raw["model"]["vision"] = {
        "path": _model_folder(tmp_path / "vit", vision),
        "config": (overrides or {}).get("vision", {}),
    }
    return raw


def test_model_folders_are_checked_with_their_config_json(tmp_path):
    """A model folder's config.json plus the spec's overrides get the same shape checks as a random-init
    spec; a problem is named after the spec key that sets the field, else after the file."""
    assert check_paths(parse_spec(_from_folders(tmp_path / "a", LLAMA_FILE, CLIP_FILE))) == []
    overridden = _from_folders(tmp_path / "b", LLAMA_FILE, CLIP_FILE, {"text": {"num_attention_heads": 5}})
    assert check_paths(parse_spec(overridden)) == [
        "model.text.config.num_attention_heads: 5 does not divide hidden_size 128"
    ]
    in_file = _from_folders(tmp_path / "c", {**LLAMA_FILE, "num_key_value_heads": 3}, CLIP_FILE)
    assert check_paths(parse_spec(in_file)) == [
        f"model.text.path: {tmp_path / 'c' / 'llm'}/config.json: num_key_value_heads: 3 does not divide "
        "num_attention_heads 4"
    ]
    shallow = {**CLIP_FILE, "vision_config": {**CLIP_FILE["vision_config"], "num_hidden_layers": 2}}
    assert check_paths(parse_spec(_from_folders(tmp_path / "d", LLAMA_FILE, shallow))) == [
        "model.feature_layers: block 2 is outside the ViT's blocks 0..1"
    ]
    unknown = _from_folders(tmp_path / "e", LLAMA_FILE, CLIP_FILE, {"text": {"hiden_size": 1}})
    assert check_paths(parse_spec(unknown)) == ["model.text.config.hiden_size: unknown field (check the spelling)"]
    # transformers accepts a [h, w] patch in a CLIP config.json; the model needs a square one.
    listed = {**CLIP_FILE, "vision_config": {**CLIP_FILE["vision_config"], "patch_size": [4, 4]}}
    raw = _from_folders(tmp_path / "f", LLAMA_FILE, listed)
    raw["model"]["tokenizer"] = str(tmp_path / "no-tokenizer")
    assert check_paths(parse_spec(raw)) == [
        f"model.tokenizer: {tmp_path / 'no-tokenizer'} does not exist (a local tokenizer folder)",
        f"model.vision.path: {tmp_path / 'f' / 'vit'}/config.json: patch_size: must be a positive integer, "
        "got a list [4, 4]",
    ]


def test_validate_reports_missing_files_one_line_each(tmp_path):
    """`cosctl validate` prints one line per missing file and exits 1; --skip-paths checks the spec alone."""
    root = _data(tmp_path)
    (root / "train.json").unlink()
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_set(_with_data(TINY, root), "model.tokenizer", "no/such/tokenizer")))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        f"error: {path}: data.train: {root / 'train.json'} does not exist",
        f"{path}: model.tokenizer: no/such/tokenizer does not exist (a local tokenizer folder)",
    ]
    assert runner.invoke(app, ["validate", "--skip-paths", str(path)]).exit_code == 0
    path.write_text(yaml.safe_dump(_with_data(TINY, _data(tmp_path / "ok"))))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and result.output.startswith("OK"), result.output


def test_bridge_init_std_reaches_the_model_config():
    """`model.bridge_init_std` (default 0.02, the reference) arrives in the CosConfig that builds the model."""
    unset = copy.deepcopy(TINY)
    del unset["model"]["bridge_init_std"]
    assert pretrain_config(parse_spec(unset), vocab_size=100, image_token_id=99).bridge_init_std == 0.02
    spec = parse_spec(_set(TINY, "model.bridge_init_std", 0.25))
    assert pretrain_config(spec, vocab_size=100, image_token_id=99).bridge_init_std == 0.25
