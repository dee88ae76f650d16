"""Every load exact, adapters tied to their base, and the published artefacts usable by transformers and
peft alone: a folder with a missing, mis-shaped or foreign key is refused in one line (eval, export, a
finetune or inflate source); a truncated or mis-shaped adapter and one whose base was rebuilt are refused;
the export loads as `AutoModelForImageTextToText` and runs in `pipeline("image-text-to-text")`; a fresh
process without cos_model/cosctl puts an adapter on its published base with peft; `generate` warns about
nothing; `ckpt verify` re-hashes published folders.

The inputs are built as the stages build them, tiny and in-process: the synthetic set and its tokenizer,
`model/` folders saved with `save_pretrained` and published, a LoRA `adapter/` saved with peft's
`save_pretrained` (`save_adapter`) and published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cos_model import CosForConditionalGeneration
from cosctl.artefacts.export import export_merged
from cosctl.artefacts.loading import check_source, load_for_eval, load_model_folder
from cosctl.artefacts.published import SOURCE_RECORD, save_adapter, save_model
from cosctl.checkpoint.layout import publish
from cosctl.cli.app import app
from cosctl.common.errors import CheckpointError
from cosctl.common.log import log
from cosctl.data.conversation import image_token_id
from cosctl.data.records import load_image, load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.spec.sections import LoraSpec
from cosctl.spec.specs import load_spec
from cosctl.stages.finetune import apply_lora, build_finetune_model
from cosctl.storage import open_store
from tests.harness import RECIPES
from tests.tiny import tiny_config, tiny_model

runner = CliRunner()
QUESTION = "What colour is the circle?"

# Runs in a fresh interpreter that cannot import the project: transformers, peft (and torch, PIL) only.
FRESH_SCRIPT = r"""
import json, logging, sys, warnings
from pathlib import Path

class NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cos_model", "cosctl"):
            raise ImportError(f"{name} imported by a plain transformers user")
sys.meta_path.insert(0, NoProject())

import torch
from PIL import Image
from peft import AutoPeftModel, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

base, adapter, export, image, question, out = sys.argv[1:]
out = Path(out)
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("transformers").addHandler(handler)

def noisy(call):
    # The warnings and transformers log lines (warning and above) `call` emits.
    del records[:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    said = [f"{w.category.__name__}: {w.message}" for w in caught]
    return result, said + [r.getMessage() for r in records if r.levelno >= logging.WARNING]

processor = AutoProcessor.from_pretrained(base, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open(image)], text=[prompt], return_tensors="pt")

model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
on_base = PeftModel.from_pretrained(model, adapter).eval()
auto = AutoPeftModel.from_pretrained(adapter, trust_remote_code=True).eval()
with torch.no_grad():
    logits = {"peft": on_base(**inputs).logits, "auto_peft": auto(**inputs).logits}

image_text = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
generated, generate_noise = noisy(lambda: image_text.generate(**inputs, max_new_tokens=4))
image_text.generation_config.max_new_tokens = 4  # a default set on the model, as users do
_, defaulted_noise = noisy(lambda: image_text.generate(**inputs))
pipe = pipeline("image-text-to-text", model=export, trust_remote_code=True)
chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
answer, pipeline_noise = noisy(lambda: pipe(text=chat, max_new_tokens=4))
torch.save({"logits": logits, "pixel_values": inputs["pixel_values"]}, out / "tensors.pt")
(out / "report.json").write_text(json.dumps({
    "classes": {name: f"{type(m).__module__}.{type(m).__name__}" for name, m in
                {"peft": on_base, "auto_peft": auto, "base": model, "image_text": image_text,
                 "pipeline": pipe.model}.items()},
    "input_ids": inputs["input_ids"].tolist(),
    "generated": generated.tolist(),
    "answer": answer,
    "noise": {"generate": generate_noise, "generate with defaults": defaulted_noise, "pipeline": pipeline_noise},
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("cos_model", "cosctl")),
}))
"""


def publish_model(run: Path, tokenizer, seed: int = 0, change=None) -> Path:
    """`run`/model/ as inflate publishes it (`save_pretrained` + code); `change(state)` edits the saved
    weights first (a truncated or foreign file)."""
    config = tiny_config()
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = image_token_id(tokenizer)
    local = run.parent / "staging" / run.name
    shutil.rmtree(local, ignore_errors=True)
    save_model(tiny_model(config, seed), tokenizer, local)
    if change is not None:
        state = load_file(local / "model.safetensors")
        change(state)
        save_file(state, str(local / "model.safetensors"), metadata={"format": "pt"})
    publish(open_store(str(run)), local, "model")
    return run


def lora_model(base_run: Path):
    """A LoRA finetune of the published base as the finetune stage builds it, trained-looking."""
    model = load_model_folder(str(base_run / "model"))
    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), ["projector"], seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def publish_adapter(run: Path, base_run: Path, tokenizer, change=None) -> Path:
    """`run`/adapter/ as the finetune stage publishes it; `change(state)` edits the saved adapter weights
    (a truncated or mis-shaped file)."""
    peft_model = lora_model(base_run)
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    local = run.parent / "staging" / run.name
    shutil.rmtree(local, ignore_errors=True)
    save_adapter(peft_model, state, tokenizer, str(base_run), local)
    if change is not None:
        saved = load_file(local / "adapter_model.safetensors")
        change(saved)
        save_file(saved, str(local / "adapter_model.safetensors"), metadata={"format": "pt"})
    publish(open_store(str(run)), local, "adapter")
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Synthetic data, a published base, a published adapter on it, and the adapter's export."""
    root = tmp_path_factory.mktemp("interop")
    synthesize(root / "data", num_samples=8, seed=0, image_size=64)
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    publish_model(root / "base", tokenizer)
    publish_adapter(root / "finetune", root / "base", tokenizer)
    export_merged(str(root / "finetune"), root / "export")
    records = json.loads((root / "data" / "train.json").read_text())
    image = root / "data" / next(r["image"] for r in records if "image" in r)
    return {"root": root, "tokenizer": tokenizer, "image": image}


def one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def eval_args(built, model: Path, tmp_path: Path) -> list[str]:
    data = built["root"] / "data"
    return ["eval", str(model), "--data", str(data / "eval.json"), "--images", str(data), "--out", str(tmp_path)]


# ------------------------------------------------------------------------------- exact model folders


def drop_key(state: dict) -> None:
    del state["projector.linear.weight"]


def reshape_key(state: dict) -> None:
    state["projector.linear.weight"] = state["projector.linear.weight"][:, :16].clone()


def add_key(state: dict) -> None:
    state["language_model.model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 32)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (drop_key, "1 missing keys: projector.linear.weight"),
        (reshape_key, "1 shape mismatches: projector.linear.weight (32, 16) vs (32, 32)"),
        (add_key, "no place for (another model's folder?): language_model.model.layers.2.mlp.up_proj.weight"),
    ],
    ids=["missing", "mis-shaped", "unexpected"],
)
def test_a_model_folder_that_does_not_fit_is_refused_by_eval_and_export(built, tmp_path, change, fragment):
    """A published model/ with a missing, mis-shaped or foreign key: `cosctl eval` exits 1 with one line
    naming the run and the key (no random weights, no load table), and `cosctl export` refuses it."""
    run = publish_model(tmp_path / "broken", built["tokenizer"], change=change)
    one_error_line(runner.invoke(app, eval_args(built, run, tmp_path / "eval")), f"error: {run}: ", fragment)
    with pytest.raises(CheckpointError) as refused:
        export_merged(str(run), tmp_path / "export")
    assert str(refused.value).startswith(f"{run}: ") and fragment in str(refused.value)
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_a_folder_with_a_missing_key_is_refused_as_finetune_and_inflate_source(built, tmp_path):
    """As the source of a finetune (the model it builds) or of `cosctl inflate`, a published model/ with a
    missing key stops the stage in one line naming the folder and the key."""
    run = publish_model(tmp_path / "broken", built["tokenizer"], change=drop_key)
    spec = load_spec(RECIPES / "tiny" / "finetune.yaml", [f"model.source={run}"])
    with pytest.raises(CheckpointError, match="missing keys: projector.linear.weight"):
        build_finetune_model(spec, str(run / "model"))
    inflate = ["inflate", str(RECIPES / "tiny" / "inflate.yaml"), "--set", f"source={run}"]
    inflate += ["--output", str(tmp_path / "inflated"), "--run-dir", str(tmp_path / "work")]
    one_error_line(runner.invoke(app, inflate), "missing keys: projector.linear.weight")
    assert not (tmp_path / "inflated" / "model").exists()


def test_the_exact_loader_gives_the_saved_model(built):
    """A published model/ loads tensor for tensor (buffers recomputed): the same logits as the model saved."""
    config = load_model_folder(str(built["root"] / "base" / "model")).config
    saved = tiny_model(config, 0)
    loaded = load_for_eval(str(built["root"] / "base"), built["root"] / "scratch" / "exact").model
    inputs = {"input_ids": torch.tensor([[1, 5, 7] + [config.image_token_id] * 32 + [9]])}
    inputs["pixel_values"] = load_image(built["image"], 64)[None]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, saved(**inputs).logits)


# ------------------------------------------------------------------------------------------ adapters


def shrink_lora(state: dict) -> None:
    key = next(k for k in state if "lora_A" in k)
    state[key] = state[key][:2].clone()


def drop_saved_module(state: dict) -> None:
    del state["base_model.model.projector.linear.bias"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (shrink_lora, "1 shape mismatches: base_model.model.language_model.model.layers.0."),
        (drop_saved_module, "1 missing keys: base_model.model.projector"),
    ],
    ids=["mis-shaped", "truncated"],
)
def test_an_adapter_that_does_not_fit_is_refused(built, tmp_path, change, fragment):
    """A LoRA tensor of the wrong shape, or a `modules_to_save` tensor missing (peft would keep the base's
    weights without a word): eval and export refuse the adapter in one line naming it and the key."""
    run = publish_adapter(tmp_path / "finetune", built["root"] / "base", built["tokenizer"], change=change)
    one_error_line(runner.invoke(app, eval_args(built, run, tmp_path / "eval")), f"error: {run}: ", fragment)
    with pytest.raises(CheckpointError, match="cannot load the adapter exactly"):
        export_merged(str(run), tmp_path / "export")


def test_an_adapter_whose_base_was_rebuilt_is_refused(built, tmp_path, caplog):
    """Rebuilding the base (another inflate into the same output) after fine-tuning: eval and export
    refuse the adapter in one line saying what changed and what to do; an adapter saved before bases
    were recorded (no hash) still loads."""
    base = publish_model(tmp_path / "base", built["tokenizer"], seed=0)
    run = publish_adapter(tmp_path / "finetune", base, built["tokenizer"])
    record = json.loads((run / "adapter" / SOURCE_RECORD).read_text())
    manifest = (base / "model" / "manifest.json").read_bytes()
    assert record["base_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    publish_model(base, built["tokenizer"], seed=1)  # the rebuild
    fragments = (
        f"error: {run}: its base {base} changed since fine-tuning (model.safetensors differ",
        "re-run finetune",
    )
    one_error_line(runner.invoke(app, eval_args(built, run, tmp_path / "eval")), *fragments)
    with pytest.raises(CheckpointError, match="changed since fine-tuning"):
        export_merged(str(run), tmp_path / "export")
    with pytest.raises(CheckpointError, match="changed since fine-tuning"):
        check_source(str(run))  # what `cosctl eval --nproc N` checks before starting ranks
    # An older adapter: its source record names the base only. It loads, saying it is unchecked.
    staged = tmp_path / "staging" / "finetune"
    (staged / SOURCE_RECORD).write_text(json.dumps({"base_model": str(base)}))
    publish(open_store(str(run)), staged, "adapter")
    log.addHandler(caplog.handler)
    try:
        assert load_for_eval(str(run), tmp_path / "scratch").kind == "adapter"
    finally:
        log.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.name == "cosctl"] == [
        f"{run}: the adapter does not record which version of {base} it was trained on; used unchecked"
    ]


def test_the_adapter_readme_and_config_name_the_real_base(built):
    """peft's README names the base the adapter records (not the folder it was staged in), and its config
    builds the base with transformers' AutoModelForCausalLM (no cos_model import, no import_allowlist)."""
    adapter = built["root"] / "finetune" / "adapter"
    front = (adapter / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["base_model"] == str(built["root"] / "base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {"base_model_class": "AutoModelForCausalLM", "parent_library": "transformers"}
    assert config["base_model_name_or_path"] == str(built["root"] / "base" / "model")


# ------------------------------------------------------------------------ transformers and peft alone


@pytest.fixture(scope="module")
def fresh(built):
    """The transformers + peft script in a fresh process that cannot import the project."""
    root = built["root"]
    out = root / "fresh"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(out / "hf_modules"), HF_HUB_OFFLINE="1")
    args = [root / "base" / "model", root / "finetune" / "adapter", root / "export", built["image"], QUESTION, out]
    cmd = [sys.executable, "-c", FRESH_SCRIPT, *map(str, args)]
    result = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"report": json.loads((out / "report.json").read_text()), **torch.load(out / "tensors.pt")}


def merged_finetune(built) -> CosForConditionalGeneration:
    return load_for_eval(str(built["root"] / "finetune"), built["root"] / "scratch" / "merged").model


def test_peft_alone_puts_the_adapter_on_its_published_base(built, fresh):
    """With transformers + peft only, `PeftModel.from_pretrained(AutoModelForCausalLM(base), adapter)` and
    `AutoPeftModel.from_pretrained(adapter, trust_remote_code=True)` give the project's merged logits."""
    report = fresh["report"]
    assert report["project_modules"] == []
    assert report["classes"]["base"].startswith("transformers_modules.")
    inputs = {"input_ids": torch.tensor(report["input_ids"]), "pixel_values": fresh["pixel_values"]}
    with torch.no_grad():
        expected = merged_finetune(built)(**inputs).logits
    for name in ("peft", "auto_peft"):
        assert report["classes"][name] == "peft.peft_model.PeftModel"
        assert torch.allclose(fresh["logits"][name], expected, atol=1e-5, rtol=0), name


def test_the_export_loads_as_image_text_to_text_and_runs_in_the_pipeline(built, fresh):
    """`AutoModelForImageTextToText` loads the export and `pipeline("image-text-to-text")` answers an image
    + question with the text the project's model generates for it."""
    report = fresh["report"]
    assert report["classes"]["image_text"].endswith("modeling.CosForConditionalGeneration")
    assert report["classes"]["pipeline"].endswith("modeling.CosForConditionalGeneration")
    prompt = torch.tensor(report["input_ids"])
    inputs = {"input_ids": prompt, "pixel_values": fresh["pixel_values"]}
    tokenizer = built["tokenizer"]
    expected = merged_finetune(built).generate(**inputs, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
    assert report["generated"] == expected.tolist()
    new_text = tokenizer.decode(expected[0, prompt.shape[1] :], skip_special_tokens=True)
    reply = report["answer"][0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"] == new_text
    assert expected.shape[1] > prompt.shape[1]


def test_generate_and_the_pipeline_warn_about_nothing(fresh):
    """Loaded as transformers loads it, `generate` (with call settings or the model's defaults) and the
    pipeline emit no warning and no transformers log warning (the deprecation of a generation config
    passed beside generation settings)."""
    assert fresh["report"]["noise"] == {"generate": [], "generate with defaults": [], "pipeline": []}


def test_generate_of_the_shipped_class_logs_no_deprecation(built, caplog):
    """The model class as transformers' Auto classes make it (GenerationMixin added) with the folder's
    generation config: `generate` with settings emits no warning and no transformers log record."""
    from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model
    from transformers.utils import logging as hf_logging

    model_class = add_generation_mixin_to_remote_model(CosForConditionalGeneration)
    model = model_class.from_pretrained(built["root"] / "export").eval()
    config = model.config
    inputs = {"input_ids": torch.tensor([[1, 5] + [config.image_token_id] * 32 + [9]])}
    inputs["pixel_values"] = load_image(built["image"], 64)[None]
    hf_logging.warning_once.cache_clear()  # a warning already given once in this process would hide
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
            warnings.simplefilter("always")
            model.generate(**inputs, max_new_tokens=3)
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("transformers")] == []


# -------------------------------------------------------------------------------------- ckpt verify


def test_ckpt_verify_checks_a_published_model_file_by_file(built, tmp_path):
    """`cosctl ckpt verify RUN` re-hashes the published model/: OK when intact; one altered byte or a
    missing file exits 1 naming the file."""
    run = tmp_path / "run"
    shutil.copytree(built["root"] / "base", run)
    result = runner.invoke(app, ["ckpt", "verify", str(run)])
    assert result.exit_code == 0 and "OK: model/ (published)" in result.output, result.output
    weights = run / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    one_error_line(
        runner.invoke(app, ["ckpt", "verify", str(run)]),
        "model/: 1 file(s) do not match its manifest: model.safetensors",
    )
    (run / "model" / "processing.py").unlink()
    one_error_line(runner.invoke(app, ["ckpt", "verify", str(run)]), "model.safetensors", "processing.py (missing)")


def test_ckpt_verify_checks_a_published_adapter(built, tmp_path):
    """A finetune run's adapter/ is verified the same way."""
    run = tmp_path / "run"
    shutil.copytree(built["root"] / "finetune", run)
    assert "OK: adapter/ (published)" in runner.invoke(app, ["ckpt", "verify", str(run)]).output
    (run / "adapter" / "adapter_config.json").write_text("{}")
    one_error_line(runner.invoke(app, ["ckpt", "verify", str(run)]), "adapter/: 1 file(s)", "adapter_config.json")
