"""The paper-scale recipes (`recipes/vicuna7b/*.yaml`) on pretrained folders laid out as users have them:
a `CLIPModel` saved by transformers with ViT-L/14 geometry (narrow width) and a sharded Llama folder
with its tokenizer. Pretrain (2 ranks) -> inflate -> finetune run on CPU, and the published model's ViT
and LLM equal the source folders' exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from cos_model import CosForConditionalGeneration
from cos_model.loading import read_checkpoint
from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from tests.harness import RECIPES, assert_plan_equals_run, cosctl, ok

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

VIT_L14_NARROW = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4, patch_size=14, image_size=224
)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A CLIPModel folder, a 3-shard Llama folder holding the tokenizer, and a 224-px synthetic set."""
    root = tmp_path_factory.mktemp("pretrained")
    synthesize(root / "data", num_samples=40, seed=0, image_size=224)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config=VIT_L14_NARROW, text_config=CLIP_TEXT, projection_dim=16)).save_pretrained(
        root / "clip"
    )
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer) - 1,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
    )
    llama.save_pretrained(root / "llm", max_shard_size="150KB")
    assert (root / "llm" / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((root / "llm" / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 3
    load_tokenizer(root / "data" / "tokenizer").save_pretrained(root / "llm")
    return root


def overrides(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def pipeline(folders):
    """The three vicuna7b recipes, changed only where a CPU and these folders need it."""
    root = folders
    common = [
        f"data.root={root / 'data'}",
        "data.train=train.json",
        "data.eval=eval.json",
        "data.num_workers=0",
        "deepspeed.precision=fp32",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
        "eval.every_steps=null",
        "slurm.gpus_per_node=0",
    ]
    pre = ok(
        cosctl(
            "pretrain",
            str(RECIPES / "vicuna7b" / "pretrain.yaml"),
            "--nproc",
            "2",
            "--run-dir",
            str(root / "work" / "pre"),
            "--output",
            str(root / "out" / "pre"),
            *overrides(
                *common,
                f"model.vision.path={root / 'clip'}",
                f"model.text.path={root / 'llm'}",
                f"model.tokenizer={root / 'llm'}",
                "optim.num_steps=2",
                "batch.samples_per_step=8",
                "batch.tokens_per_micro_batch=4096",
            ),
            tmp=root,
            timeout=900,
        )
    )
    inf = ok(
        cosctl(
            "inflate",
            str(RECIPES / "vicuna7b" / "inflate.yaml"),
            "--run-dir",
            str(root / "work" / "inf"),
            "--output",
            str(root / "out" / "inf"),
            *overrides(f"source={root / 'out' / 'pre'}"),
            tmp=root,
            timeout=900,
        )
    )
    fin = ok(
        cosctl(
            "finetune",
            str(RECIPES / "vicuna7b" / "finetune.yaml"),
            "--run-dir",
            str(root / "work" / "fin"),
            "--output",
            str(root / "out" / "fin"),
            *overrides(
                *common,
                f"model.source={root / 'out' / 'inf'}",
                "model.gradient_checkpointing=false",
                "optim.num_steps=1",
                "batch.samples_per_step=2",
                "batch.tokens_per_micro_batch=2048",
            ),
            tmp=root,
            timeout=900,
        )
    )
    return {"root": root, "pretrain": pre, "inflate": inf, "finetune": fin}


def test_published_vit_equals_the_clip_folders_features(pipeline):
    """The pretrained model's ViT features at blocks 15 and 22 equal CLIPVisionModel's hidden states on
    the same CLIPModel folder: the pretrained weights were loaded, not left at random."""
    root = pipeline["root"]
    model = CosForConditionalGeneration.from_pretrained(root / "out" / "pre" / "model").eval()
    reference = CLIPVisionModel.from_pretrained(root / "clip").eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = reference(pixels, output_hidden_states=True).hidden_states
        features = model.vision_tower.features(pixels, [15, 22])
    for block, grid in zip((15, 22), features, strict=True):
        assert torch.equal(grid, hidden[block + 1][:, 1:].reshape(2, 16, 16, 64))


def test_published_llm_equals_the_sharded_source_and_grows_for_image(pipeline):
    """Every frozen LLM tensor of the published model equals the sharded source; the embeddings gained
    exactly the `<image>` row and kept the source rows."""
    root = pipeline["root"]
    source = read_checkpoint(root / "llm")
    published = read_checkpoint(root / "out" / "pre" / "model", prefix="language_model.", strip_prefix=True)
    assert set(source) == set(published)
    for key, tensor in source.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert published[key].shape[0] == tensor.shape[0] + 1
            assert torch.equal(published[key][: tensor.shape[0]], tensor)
        else:
            assert torch.equal(published[key], tensor), key


def test_the_stages_report_what_they_loaded_and_ran(pipeline):
    """Pretrain trained on 2 ranks at 32 tokens with only the bridge; inflate reached 528 tokens at 448
    px; finetune ran at 528 tokens with LoRA."""
    root = pipeline["root"]
    pre = json.loads((root / "work" / "pre" / "summary.json").read_text())
    fin = json.loads((root / "work" / "fin" / "summary.json").read_text())
    assert (pre["visual_tokens"], pre["image_size"], pre["world_size"]) == (32, 224, 2)
    assert set(pre["trainable_params"]) == {"resampler", "projector"}
    assert json.loads(pipeline["inflate"].stdout)["visual_tokens"] == {"from": 32, "to": 528}
    assert (fin["visual_tokens"], fin["image_size"]) == (528, 448)
    assert set(fin["trainable_params"]) == {"lora", "resampler", "projector"}


@pytest.mark.parametrize(("stage", "world_size"), [("pretrain", 2), ("finetune", 1)])
def test_the_plan_of_each_vicuna7b_recipe_equals_what_its_run_resolved(pipeline, stage, world_size, tmp_path):
    """`cosctl plan` of the spec each paper-scale stage ran (at its world size) prints the numbers the run
    resolved at start: batch geometry, DeepSpeed config, FLOPs."""
    root, short = pipeline["root"], {"pretrain": "pre", "finetune": "fin"}[stage]
    assert_plan_equals_run(root / "work" / short, root / "out" / short, world_size, tmp_path)
