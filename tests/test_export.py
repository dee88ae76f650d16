"""`cosctl export`: a folder that transformers alone loads, processes for and generates with.

The inputs are built as the pipeline builds them, in-process and tiny: a synthetic set and its tokenizer,
a published `model/` folder and a published LoRA `adapter/` (peft, the bridge in `modules_to_save`).
A fresh Python process that cannot import `cos_model` or `cosctl` then loads the exports with the
`Auto*` classes and generates; its results are compared with the project's own code on the same data.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cos_model import IGNORE_INDEX, CosForConditionalGeneration
from cos_model.processing import CosImageProcessor, CosProcessor
from cosctl.artefacts.export import export_merged
from cosctl.artefacts.loading import load_for_eval
from cosctl.artefacts.published import SOURCE_RECORD, save_adapter
from cosctl.artefacts.remote_code import RemoteCodeError, module_sources
from cosctl.checkpoint.layout import publish
from cosctl.data.conversation import encode_conversation, image_token_id
from cosctl.data.records import load_image, load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.evaluate.generation import generate_and_score
from cosctl.evaluate.records import build_prompt
from cosctl.spec.sections import LoraSpec
from cosctl.stages.finetune import apply_lora
from cosctl.storage import open_store
from tests.llava import write_llava_set
from tests.test_processing import messages_of
from tests.tiny import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What colour is the circle?", "How many shapes are there in this small picture?"]

# Fresh-interpreter scripts start with this: they cannot import the project, only transformers (and
# torch, PIL).
NO_PROJECT = r"""
import json, sys
from pathlib import Path

class NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cos_model", "cosctl"):
            raise ImportError(f"{name} imported by a plain transformers user")
sys.meta_path.insert(0, NoProject())
"""

FRESH_SCRIPT = (
    NO_PROJECT
    + r"""
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
images, questions = json.loads(sys.argv[3]), json.loads(sys.argv[4])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
bare = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
prompts = [processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
    for q in questions]
inputs = processor(images=[Image.open(p) for p in images], text=prompts, return_tensors="pt")
generated = model.generate(**inputs, max_new_tokens=8)
model.generation_config.max_new_tokens = 3  # users set defaults on the model's generation config
defaulted = model.generate(**inputs)
with torch.no_grad():
    logits = bare(**inputs).logits
torch.save({"pixel_values": inputs["pixel_values"], "logits": logits}, out / "tensors.pt")
(out / "report.json").write_text(json.dumps({
    "classes": {k: f"{type(v).__module__}.{type(v).__name__}" for k, v in
                {"config": config, "processor": processor, "image_processor": processor.image_processor,
                 "model": model, "bare": bare}.items()},
    "num_visual_tokens": config.num_visual_tokens,
    "generation_config": model.generation_config.to_diff_dict(),
    "prompts": prompts,
    "input_ids": inputs["input_ids"].tolist(),
    "attention_mask": inputs["attention_mask"].tolist(),
    "generated": generated.tolist(),
    "defaulted": defaulted.tolist(),
    "text": processor.batch_decode(generated, skip_special_tokens=True),
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("cos_model", "cosctl")),
}))
"""
)

# Greedy answers to whole conversations, one request at a time: [{"messages", "image" (a path or None)}]
# -> answers.json.
FRESH_CHAT_SCRIPT = (
    NO_PROJECT
    + r"""
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

folder, out, max_new_tokens = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[4])
requests = json.loads(Path(sys.argv[3]).read_text())
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
eos = processor.tokenizer.eos_token_id
rows = []
for request in requests:
    prompt = processor.apply_chat_template(request["messages"], add_generation_prompt=True)
    images = [Image.open(request["image"])] if request["image"] else []  # None: a text-only request
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    new = new.tolist()[: new.tolist().index(eos)] if eos in new.tolist() else new.tolist()
    answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    rows.append({"prompt": prompt, "input_ids": inputs["input_ids"][0].tolist(), "answer": answer})
(out / "answers.json").write_text(json.dumps({
    "rows": rows,
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("cos_model", "cosctl")),
}))
"""
)


def _publish_model(root: Path, tokenizer, seed: int = 0) -> None:
    """A published `model/` folder as the pretrain/inflate stages write it."""
    config = tiny_config()
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = image_token_id(tokenizer)
    local = root / "staging" / "model"
    tiny_model(config, seed).save_pretrained(local)
    tokenizer.save_pretrained(local)
    publish(open_store(str(root / "base")), local, "model")


def _lora_model(base_dir: Path):
    """A LoRA finetune of the base as the finetune stage builds it, with trained-looking weights."""
    model = CosForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0), ["projector"], seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def _adapter_state(peft_model) -> dict:
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


def _build_runs(root: Path, tokenizer, exported: tuple[str, ...]) -> dict:
    """A published base model and a published adapter on it under `root`, and the exports of `exported`."""
    _publish_model(root, tokenizer)
    peft_model = _lora_model(root / "base" / "model")
    save_adapter(peft_model, _adapter_state(peft_model), tokenizer, str(root / "base"), root / "staging" / "adapter")
    publish(open_store(str(root / "finetune")), root / "staging" / "adapter", "adapter")
    exports = {name: export_merged(str(root / name), root / "exports" / name) for name in exported}
    return {"root": root, "tokenizer": tokenizer, "peft_model": peft_model, "exports": exports}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Synthetic data, a published base model, a published adapter on it, and both exports."""
    root = tmp_path_factory.mktemp("export")
    synthesize(root / "data", num_samples=8, seed=0, image_size=64)
    previous = os.umask(0o077)  # exports must be world-readable whatever the user's umask
    try:
        return _build_runs(root, load_tokenizer(root / "data" / "tokenizer"), ("base", "finetune"))
    finally:
        os.umask(previous)


def _folder(built, name: str) -> Path:
    return Path(built["exports"][name]["out"])


def _samples(built) -> list[dict]:
    return json.loads((built["root"] / "data" / "train.json").read_text())


def _images(built) -> list[Path]:
    return [built["root"] / "data" / record["image"] for record in _samples(built)[: len(QUESTIONS)]]


@pytest.fixture(scope="module")
def fresh(built):
    """The merged export run by the transformers-only script in a fresh process (not the repo's cwd)."""
    out = built["root"] / "fresh"
    images = json.dumps([str(p) for p in _images(built)])
    _run_fresh(FRESH_SCRIPT, _folder(built, "finetune"), out, images, json.dumps(QUESTIONS))
    return {"report": json.loads((out / "report.json").read_text()), **torch.load(out / "tensors.pt")}


def _run_fresh(script: str, folder: Path, out: Path, *args) -> None:
    """`script FOLDER OUT ARGS...` in a fresh interpreter without the repository on its path, run in `out`."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(out / "hf_modules"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-c", script, str(folder), str(out), *map(str, args)]
    result = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def _training_prompt(tokenizer, question: str, num_visual_tokens: int) -> list[int]:
    """The prompt part (up to the answer) of a training sequence, by the training data code."""
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}]
    ids, labels = encode_conversation(turns, tokenizer, num_visual_tokens)
    return ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


def test_export_ships_exactly_the_imported_modules(built):
    """The folder holds the modules the auto classes import (transformers' own closure), nothing else."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = _folder(built, "finetune")
    shipped = {p.name for p in folder.glob("*.py")}
    roots = {f"{ref.split('.')[0]}.py" for ref in json.loads((folder / "config.json").read_text())["auto_map"].values()}
    needed = roots | {Path(f).name for root in roots for f in get_relative_import_files(folder / root)}
    assert shipped == needed
    assert not shipped & {"inflate.py", "__main__.py", "__init__.py"}
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in ("cos_model", "cosctl"), path.name


def test_export_layout_and_auto_map(built):
    """config.json maps the five auto classes; the processor config maps processor and image processor."""
    folder = _folder(built, "finetune")
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not names & {"manifest.json", SOURCE_RECORD, "adapter_config.json"}
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration.CosConfig",
        "AutoModel": "modeling.CosForConditionalGeneration",
        "AutoModelForCausalLM": "modeling.CosForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling.CosForConditionalGeneration",
        "AutoProcessor": "processing.CosProcessor",
    }
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing.CosProcessor"}
    assert processor["image_processor"]["auto_map"] == {"AutoImageProcessor": "processing.CosImageProcessor"}
    assert processor["num_visual_tokens"] == built["exports"]["finetune"]["visual_tokens"] == 32


def test_export_files_are_world_readable(built):
    """Every exported file is 0644 and every folder 0755, even under a 077 umask."""
    for name in ("base", "finetune"):
        folder = _folder(built, name)
        for path in [folder, *folder.rglob("*")]:
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_transformers_alone_loads_the_export(fresh):
    """A fresh process that cannot import cos_model/cosctl gets every class from the folder's code."""
    report = fresh["report"]
    assert report["project_modules"] == []
    classes = report["classes"]
    assert all(name.startswith("transformers_modules.") for name in classes.values()), classes
    assert classes["model"].endswith("modeling.CosForConditionalGeneration")
    assert classes["processor"].endswith("processing.CosProcessor")
    assert classes["image_processor"].endswith("processing.CosImageProcessor")
    assert report["num_visual_tokens"] == 32


def test_export_generation_config_holds_the_tokenizer_ids(built, fresh):
    """generation_config.json carries the tokenizer's bos/eos/pad ids and transformers loads it."""
    tokenizer = built["tokenizer"]
    expected = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    saved = json.loads((_folder(built, "finetune") / "generation_config.json").read_text())
    assert expected.items() <= saved.items() and expected.items() <= fresh["report"]["generation_config"].items()


def test_fresh_processor_inputs_equal_training_inputs(built, fresh):
    """Chat template + processor give the training prompt ids, left-padded, and load_image's pixels."""
    report, tokenizer = fresh["report"], built["tokenizer"]
    assert report["prompts"][0] == "<s>USER: <image>\nWhat colour is the circle? ASSISTANT: "
    rows = [_training_prompt(tokenizer, q, 32) for q in QUESTIONS]
    width = max(len(row) for row in rows)
    assert report["input_ids"] == [[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows]
    assert report["attention_mask"] == [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    expected = torch.stack([load_image(path, 64) for path in _images(built)])
    assert torch.equal(fresh["pixel_values"], expected)


def test_fresh_generation_equals_project_generation(built, fresh):
    """transformers-only generate gives the token ids the project's model gives on the same inputs."""
    report = fresh["report"]
    model = CosForConditionalGeneration.from_pretrained(_folder(built, "finetune")).eval()
    inputs = {
        "input_ids": torch.tensor(report["input_ids"]),
        "attention_mask": torch.tensor(report["attention_mask"]),
        "pixel_values": torch.stack([load_image(path, 64) for path in _images(built)]),
    }
    # Loaded by the project's own class, the model generates with its LLM's defaults + the folder's pad id.
    expected = model.generate(**inputs, max_new_tokens=8, pad_token_id=built["tokenizer"].pad_token_id)
    assert report["generated"] == expected.tolist()
    assert expected.shape[1] > inputs["input_ids"].shape[1]  # prompt + new tokens
    with torch.no_grad():
        assert torch.equal(fresh["logits"], model(**inputs).logits)
    assert report["text"] == built["tokenizer"].batch_decode(expected, skip_special_tokens=True)
    assert report["defaulted"] == expected[:, : inputs["input_ids"].shape[1] + 3].tolist()  # honours its config


def test_merged_export_equals_the_adapter_on_its_base(built):
    """The merged folder's logits match PeftModel(base, adapter), the model the finetune trained."""
    config = built["peft_model"].config
    model = CosForConditionalGeneration.from_pretrained(_folder(built, "finetune")).eval()
    prompt = _training_prompt(built["tokenizer"], QUESTIONS[0], config.num_visual_tokens)
    inputs = {"input_ids": torch.tensor([prompt]), "pixel_values": load_image(_images(built)[0], 64)[None]}
    with torch.no_grad():
        merged, peft = model(**inputs).logits, built["peft_model"](**inputs).logits
    assert torch.allclose(merged, peft, atol=1e-5, rtol=0)
    assert built["exports"]["finetune"]["merged"] is True


@pytest.fixture(scope="module")
def llama_built(built, llama_tokenizer_dirs, tmp_path_factory):
    """`built`'s runs and finetune export with a Llama-style SentencePiece tokenizer (legacy=False: Metaspace,
    prepend_scheme "first"), and eval records in the synthetic set's and LLaVA-1.5's shapes."""
    root = tmp_path_factory.mktemp("export_llama")
    runs = _build_runs(root, load_tokenizer(llama_tokenizer_dirs[False]), ("finetune",))
    data = built["root"] / "data"
    synthetic = [r for split in ("train", "eval") for r in json.loads((data / f"{split}.json").read_text())]
    llava = [r for r in write_llava_set(data, root / "llava") if "image" in r]  # eval records have images
    records = [{**r, "image": str(data / r["image"])} for r in synthetic]
    records += [{**r, "id": f"llava-{r['id']}", "image": str(root / "llava" / r["image"])} for r in llava]
    return {**runs, "records": records}


def test_transformers_alone_answers_as_cosctl_eval_with_a_llama_tokenizer(llama_built):
    """With a Llama/Vicuna-style tokenizer, the export used by transformers alone (chat template, processor,
    greedy generate) gets `cosctl eval`'s prompt ids and answers on every record (single- and multi-turn,
    image first or after the text)."""
    root, records = llama_built["root"], llama_built["records"]
    requests = [{"messages": messages_of(r["conversations"])[:-1], "image": r["image"]} for r in records]
    (root / "requests.json").write_text(json.dumps(requests))
    _run_fresh(FRESH_CHAT_SCRIPT, _folder(llama_built, "finetune"), root / "fresh", root / "requests.json", 8)
    fresh = json.loads((root / "fresh" / "answers.json").read_text())
    assert fresh["project_modules"] == []
    loaded = load_for_eval(str(root / "finetune"), root / "scratch")  # as `cosctl eval` loads a finetune run
    rows, _ = generate_and_score(
        loaded.model, loaded.tokenizer, records, root, max_new_tokens=8, batch_size=4, device="cpu"
    )
    prompts = [list(build_prompt(r, loaded.tokenizer, 32, root).input_ids) for r in records]
    agreement = {
        "records": len(records),
        "same_prompt_ids": sum(f["input_ids"] == p for f, p in zip(fresh["rows"], prompts, strict=True)),
        "same_answers": sum(f["answer"] == r["prediction"] for f, r in zip(fresh["rows"], rows, strict=True)),
    }
    assert agreement == {"records": 13, "same_prompt_ids": 13, "same_answers": 13}
    assert len({row["prediction"] for row in rows}) > 1  # the answers depend on the prompt


def test_model_export_keeps_the_published_weights(built):
    """A run that published model/ exports its weights unchanged, with code and processor added."""
    folder = _folder(built, "base")
    published, exported = (load_file(f / "model.safetensors") for f in (built["root"] / "base" / "model", folder))
    assert published.keys() == exported.keys() and all(torch.equal(published[k], exported[k]) for k in published)
    assert built["exports"]["base"]["merged"] is False
    assert (folder / "processing.py").is_file() and (folder / "chat_template.jinja").is_file()


def test_image_processor_equals_load_image(built, tmp_path):
    """CosImageProcessor gives load_image's pixels bit for bit (synthetic PNGs, an odd-sized RGBA)."""
    generator = torch.Generator().manual_seed(0)
    odd = torch.randint(0, 256, (37, 91, 4), generator=generator, dtype=torch.uint8).numpy()
    Image.fromarray(odd, "RGBA").save(tmp_path / "odd.png")
    paths = [built["root"] / "data" / r["image"] for r in _samples(built)] + [tmp_path / "odd.png"]
    for size in (64, 96):
        processor = CosImageProcessor(image_size=size)
        pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels, torch.stack([load_image(p, size) for p in paths]))


def _processor(built, num_visual_tokens: int = 32) -> CosProcessor:
    return CosProcessor(CosImageProcessor(image_size=64), built["tokenizer"], num_visual_tokens=num_visual_tokens)


def test_chat_template_tokenises_whole_conversations_as_training(built):
    """Rendered user+assistant turns tokenise to exactly encode_conversation's ids (answers included)."""
    processor = _processor(built, num_visual_tokens=3)
    for record in _samples(built):
        turns = record["conversations"]
        messages = []
        for human, gpt in zip(turns[0::2], turns[1::2], strict=True):
            question = human["value"].removeprefix("<image>\n")
            content = [{"type": "image"}] * ("<image>" in human["value"]) + [{"type": "text", "text": question}]
            messages += [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": gpt["value"]}]},
            ]
        text = processor.apply_chat_template(messages)
        ids = processor(images=[Image.new("RGB", (8, 8))], text=text)["input_ids"][0]
        assert ids == encode_conversation(turns, built["tokenizer"], 3)[0], record["id"]


def test_processor_checks_images_against_placeholders(built):
    """One image per <image> placeholder, or a ValueError naming both counts."""
    processor = _processor(built)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text=prompt)
    out = processor(images=[[Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))]], text=[prompt, prompt])
    assert [row.count(processor.image_token_id) for row in out["input_ids"]] == [32, 32]


def test_adapter_records_its_base_absolutely(built, tmp_path, monkeypatch):
    """An adapter saved with a relative base path records it absolutely (source record and peft config)."""
    monkeypatch.chdir(built["root"])
    peft_model = _lora_model(built["root"] / "base" / "model")
    save_adapter(peft_model, _adapter_state(peft_model), built["tokenizer"], "base", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / SOURCE_RECORD).read_text())["base_model"] == str(built["root"] / "base")
    peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == str(built["root"] / "base" / "model")


def test_adapter_and_export_work_from_another_directory(built, tmp_path, monkeypatch):
    """From an unrelated cwd, AutoPeftModel finds the adapter's base and `cosctl export` runs (relative args)."""
    from peft import AutoPeftModel

    monkeypatch.chdir(tmp_path)
    adapter = built["root"] / "finetune" / "adapter"
    reloaded = AutoPeftModel.from_pretrained(adapter).eval()  # no import_allowlist: transformers builds the base
    merged = CosForConditionalGeneration.from_pretrained(_folder(built, "finetune")).eval()
    for (name, a), (_, b) in zip(
        reloaded.merge_and_unload().state_dict().items(), merged.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    source = os.path.relpath(built["root"] / "finetune", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "cosctl", "export", source, "--out", "exported"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["merged"] and summary["base_model"] == str(built["root"] / "base")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in exported.items())


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    for name, text in files.items():
        (package / name).write_text(text)
    return package


def test_remote_code_follows_imports_and_rewrites_absolute_ones(tmp_path):
    """Only imported modules ship; `from pkg.x import` becomes `from .x import`; stdlib imports stay."""
    package = _package(
        tmp_path,
        {
            "model.py": "import json\nfrom pkg.layers import Layer\nfrom .config import Config\n",
            "layers.py": "def f():\n    from .config import Config\n",
            "config.py": "from transformers import PreTrainedConfig\n",
            "unused.py": "from .model import Layer\n",
        },
    )
    sources = module_sources(package, ["model"])
    assert set(sources) == {"model.py", "layers.py", "config.py"}
    assert sources["model.py"] == "import json\nfrom .layers import Layer\nfrom .config import Config\n"


@pytest.mark.parametrize(
    "line",
    [
        "import pkg.config",
        "from . import config",
        "from ..other import x",
        "from .sub.config import Config",
        "from pkg import config",
    ],
)
def test_remote_code_refuses_imports_a_flat_folder_cannot_serve(tmp_path, line):
    """Package imports that transformers' flat remote-code folder cannot resolve are refused by file:line."""
    package = _package(tmp_path, {"model.py": f"\n{line}\n", "config.py": ""})
    with pytest.raises(RemoteCodeError, match="model.py:2"):
        module_sources(package, ["model"])
