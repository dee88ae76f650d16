"""The command line answers at once: commands that only read specs or list files never import torch,
transformers, DeepSpeed or boto3 (checked on `sys.modules` in a fresh interpreter, not by timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import REPO

HEAVY = ("torch", "transformers", "deepspeed", "boto3")

# Runs `cosctl ARGS` the way `python -m cosctl` does, then prints the heavy modules it loaded.
RUN_CLI = f"""
import json, sys
HEAVY = {HEAVY!r}
sys.argv = ["cosctl", *json.loads(sys.argv[1])]
from cosctl.cli.app import main
try:
    main()
except SystemExit as stop:
    code = stop.code
else:
    code = 0
print("HEAVY=" + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)), code)
"""


def _heavy_modules(*args: str) -> tuple[list[str], str]:
    result = subprocess.run(
        [sys.executable, "-c", RUN_CLI, json.dumps(list(args))], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    marker = [line for line in result.stdout.splitlines() if line.startswith("HEAVY=")]
    assert marker, result.stdout[-2000:] + result.stderr[-2000:]
    heavy, code = marker[-1].removeprefix("HEAVY=").rsplit(" ", 1)
    return json.loads(heavy), result.stdout + result.stderr + f"\nexit {code}"


def _tiny_data(tmp_path):
    root = tmp_path / "data"
    (root / "tokenizer").mkdir(parents=True)
    for name in ("train.json", "eval.json"):
        (root / name).write_text("[]")
    return ["--set", f"data.root={root}", "--set", f"model.tokenizer={root / 'tokenizer'}"]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["validate", "--skip-paths", "recipes/tiny/pretrain.yaml"],
        ["validate", "--skip-paths", "recipes/vicuna7b/pretrain.yaml"],
        ["validate", "--skip-paths", "recipes/tiny/finetune.yaml"],
        ["validate", "recipes/vicuna7b/pretrain.yaml"],  # missing folders: reported, still light
        ["spec", "schema"],
    ],
    ids=lambda a: " ".join(a),
)
def test_spec_commands_import_nothing_heavy(args):
    """--help, validate (with or without the path checks) and the schema load no heavy package."""
    heavy, output = _heavy_modules(*args)
    assert heavy == [], output


def test_validate_of_the_tiny_recipe_with_its_files_imports_nothing_heavy(tmp_path):
    """A full validate (spec, sub-configs and files) of the tiny recipe passes without torch."""
    heavy, output = _heavy_modules("validate", "recipes/tiny/pretrain.yaml", *_tiny_data(tmp_path))
    assert heavy == [] and "OK:" in output and output.endswith("exit 0"), output


def test_a_malformed_model_config_is_reported_without_heavy_imports(tmp_path):
    """The sub-config checks themselves need no transformers."""
    heavy, output = _heavy_modules(
        "validate", "--skip-paths", "recipes/tiny/pretrain.yaml", "--set", "model.text.config.num_attention_heads=5"
    )
    assert heavy == [] and "model.text.config.num_attention_heads: 5 does not divide hidden_size 128" in output


def test_ckpt_ls_of_a_local_folder_imports_nothing_heavy(tmp_path):
    """Listing a local run's checkpoints needs neither torch nor boto3."""
    heavy, output = _heavy_modules("ckpt", "ls", str(tmp_path))
    assert heavy == [] and "no committed checkpoints" in output, output


def test_scales_and_presets_load_without_torch():
    """`from cos_model import Scale, PRESETS` reads plain Python only; the model classes still load."""
    code = (
        "import sys\n"
        "from cos_model import DEFAULT_SCALES, PRESETS, Scale\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy'\n"
        "import cos_model\n"
        "from transformers import AutoConfig\n"
        "assert cos_model.CosConfig().num_visual_tokens == 32\n"
        "assert AutoConfig.for_model('cos').__class__ is cos_model.CosConfig\n"
        "assert cos_model.inflate.PRESETS is PRESETS and cos_model.configuration.Scale is Scale\n"
        "assert set(cos_model.__all__) <= set(dir(cos_model))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
