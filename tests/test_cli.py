"""The CLI edge: every recipe validates, user mistakes exit 1 with one message and no traceback."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from cosctl.cli.app import app
from cosctl.spec.specs import load_spec
from tests.harness import REPO, cosctl

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
runner = CliRunner()


def test_there_are_recipes_for_every_stage():
    """recipes/ holds a tiny and a vicuna7b spec for each of the three stages."""
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES}
    for size in ("tiny", "vicuna7b"):
        assert {f"{size}/pretrain.yaml", f"{size}/inflate.yaml", f"{size}/finetune.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.relative_to(REPO / "recipes").as_posix() for p in RECIPES])
def test_every_recipe_validates(recipe):
    """Each recipe parses as the stage its file name says, via the library and via `cosctl validate`
    (the spec alone: the recipes name data and model folders this machine does not have)."""
    spec = load_spec(recipe)
    assert spec.stage == recipe.stem
    result = runner.invoke(app, ["validate", "--skip-paths", str(recipe)])
    assert result.exit_code == 0 and "OK" in result.output


def _tiny_pretrain() -> dict:
    return yaml.safe_load((REPO / "recipes/tiny/pretrain.yaml").read_text())


MALFORMED = [
    ("stage", lambda s: s.pop("stage")),
    ("stage", lambda s: s.update(stage="pre-train")),
    ("bogus", lambda s: s.update(bogus=1)),
    ("run.name", lambda s: s["run"].update(name="has space")),
    ("run.output", lambda s: s["run"].update(output="gs://bucket/x")),
    ("run.outptu", lambda s: s["run"].update(outptu="x")),
    ("model.vision", lambda s: s["model"].pop("vision")),
    ("model.image_size", lambda s: s["model"].update(image_size="big")),
    ("model.scales[1].window", lambda s: s["model"]["scales"][1].update(window=0)),
    ("model.scales[0].window", lambda s: s["model"]["scales"][0].update(window=5)),
    ("model.feature_layers", lambda s: s["model"].update(feature_layers=[1, 9])),
    ("model.trainable[0]", lambda s: s["model"].update(trainable=["vit"])),
    ("model.text.config.model_type", lambda s: s["model"]["text"]["config"].pop("model_type")),
    ("model.vision.config", lambda s: s["model"]["vision"]["config"].update(hiddn_size=3)),
    ("data.root", lambda s: s["data"].pop("root")),
    ("data.max_bad_fraction", lambda s: s["data"].update(max_bad_fraction=2)),
    ("optim.lr", lambda s: s["optim"].update(lr=0)),
    ("optim.num_steps", lambda s: s["optim"].update(num_steps=-3)),
    ("optim.warmup_ratio", lambda s: s["optim"].update(warmup_ratio=1.5)),
    ("optim.betas", lambda s: s["optim"].update(betas=[0.9, 1.5])),
    ("batch.tokens_per_micro_batch", lambda s: s["batch"].update(tokens_per_micro_batch=0)),
    ("deepspeed.template", lambda s: s["deepspeed"].update(template="zero9")),
    ("deepspeed.overrides", lambda s: s["deepspeed"].update(overrides={"train_batch_size": 8})),
    ("checkpoint.keep_last", lambda s: s["checkpoint"].update(keep_last=0)),
    ("eval.every_steps", lambda s: s["data"].pop("eval")),
]


@pytest.mark.parametrize("key, mutate", MALFORMED, ids=[m[0] + f"-{i}" for i, m in enumerate(MALFORMED)])
@pytest.mark.parametrize("command", ["validate", "pretrain"])
def test_malformed_spec_exits_1_with_one_message(tmp_path, key, mutate, command):
    """A malformed spec: exit code 1, one line naming the file and YAML key, no traceback."""
    spec = _tiny_pretrain()
    mutate(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, [command, str(path)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {path}: {key}"), lines[0]
    assert "Traceback" not in result.output


def test_wrong_stage_for_command_exits_1(tmp_path):
    """Running an inflate spec with `cosctl pretrain` is refused with a clear message."""
    result = runner.invoke(app, ["pretrain", str(REPO / "recipes/tiny/inflate.yaml")])
    assert result.exit_code == 1 and "this command runs 'pretrain'" in result.output


def test_missing_spec_file_exits_1(tmp_path):
    """A spec path that does not exist gives exit 1 and names the file."""
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "nope.yaml" in result.output


def test_plan_of_the_tiny_pretrain_recipe(tmp_path):
    """`cosctl plan --json` reports the 32-token chain, parameter counts and a resolved DeepSpeed config."""
    import json

    result = runner.invoke(
        app, ["plan", str(REPO / "recipes/tiny/pretrain.yaml"), "--json", "--set", f"run.output={tmp_path}"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["stage"] == "pretrain" and plan["visual_tokens"] == 32 and plan["image_size"] == 64
    assert [(s["window"], s["windows"], s["queries_per_window"]) for s in plan["scales"]] == [(16, 1, 16), (4, 16, 1)]
    assert 0 < plan["trainable_params"] < plan["total_params"]
    assert plan["deepspeed"]["zero_optimization"]["stage"] == 3 and plan["resume"] is None
    assert "auto" not in json.dumps(plan["deepspeed"])


def test_spec_schema_names_every_stage():
    """`cosctl spec schema` prints a JSON schema covering the three stages."""
    result = runner.invoke(app, ["spec", "schema"])
    assert result.exit_code == 0
    for stage in ("pretrain", "inflate", "finetune"):
        assert stage in result.output


def test_missing_local_model_folder_exits_1(tmp_path, tiny_data):
    """A real-scale recipe whose model folders are absent: exit 1 naming the key, no traceback."""
    args = [
        str(REPO / "recipes/vicuna7b/pretrain.yaml"),
        "--set",
        f"run.output={tmp_path}",
        "--set",
        f"model.tokenizer={tiny_data / 'tokenizer'}",
        "--set",
        f"data.root={tiny_data}",
        "--set",
        "data.train=train.json",
        "--set",
        "data.eval=eval.json",
    ]
    planned = runner.invoke(app, ["plan", *args])
    trained = cosctl("pretrain", *args, "--run-dir", str(tmp_path / "w"), tmp=tmp_path, timeout=300)
    for code, output in ((planned.exit_code, planned.output), (trained.returncode, trained.stderr)):
        assert code == 1, output
        assert "error: model.vision.path: /models/clip-vit-large-patch14 is not a local model folder" in output
        assert "Traceback" not in output
