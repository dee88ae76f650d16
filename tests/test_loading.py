"""Exact loading of CLIP and Llama checkpoints into cos_model, and the lean (meta-device) build.

Every folder here is written by transformers' own `save_pretrained` of the real classes at tiny sizes,
except the layouts transformers 5 no longer writes (prefixed `CLIPVisionModel` keys, `.bin` files),
which are written by hand the way transformers 4 wrote them.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.building import build_pretrained, build_vision_tower
from cos_model.loading import (
    Checkpoint,
    CheckpointMismatchError,
    grow_rows,
    load_language_model,
    read_checkpoint,
)
from cos_model.vision import resize_position_embedding
from tests.tiny import TINY_VOCAB, tiny_config

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4, image_size=64
)
CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=99,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
# ViT-L/14 geometry (14-px patches, 224 px, 24 blocks, features from blocks 15 and 22), narrow width.
VIT_L14_NARROW = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4, patch_size=14, image_size=224
)


def save_clip(folder, vision=VISION, seed=0):
    """A CLIPModel (text tower, projections, logit_scale included) saved by transformers."""
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=CLIP_TEXT, projection_dim=16))
    clip.save_pretrained(folder)
    return folder


def save_clip_vision(folder, seed=0):
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(folder)
    return folder


def llama_config(tie: bool = False) -> LlamaConfig:
    text = tiny_config().text_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        text.pop(key, None)
    text["tie_word_embeddings"] = tie
    return LlamaConfig(**text)


def save_llama(folder, shard: str | None = None, tie: bool = False, seed=1):
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(llama_config(tie))
    if shard:
        llm.save_pretrained(folder, max_shard_size=shard)
    else:
        llm.save_pretrained(folder)
    return llm


def reference_hidden_states(folder, pixels):
    """What transformers' own CLIPVisionModel computes from the folder."""
    with torch.no_grad():
        return CLIPVisionModel.from_pretrained(folder).eval()(pixels, output_hidden_states=True).hidden_states


def assert_features_match(tower, folder, layers, pixels):
    hidden = reference_hidden_states(folder, pixels)
    with torch.no_grad():
        features = tower.features(pixels, layers)
    for layer, grid in zip(layers, features, strict=True):
        batch, side, _, width = grid.shape
        assert torch.equal(grid, hidden[layer + 1][:, 1:].reshape(batch, side, side, width)), f"block {layer}"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def llama_folders(tmp_path_factory):
    """The same tiny Llama saved sharded (>= 3 shards) and as one file."""
    sharded, single = tmp_path_factory.mktemp("llama_sharded"), tmp_path_factory.mktemp("llama_single")
    llm = save_llama(sharded, shard="30KB")
    llm.save_pretrained(single)
    return llm, sharded, single


# ------------------------------------------------------------------------------------------ reader


def test_sharded_safetensors_are_read_by_prefix_and_cast(llama_folders):
    """Checkpoint reads a sharded folder lazily: every key once, prefix filter, floating cast."""
    llm, sharded, _ = llama_folders
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    with Checkpoint(sharded) as checkpoint:
        assert sorted(checkpoint.keys()) == sorted(llm.state_dict())
        assert checkpoint.shape("lm_head.weight") == llm.lm_head.weight.shape
    layers = read_checkpoint(sharded, prefix="model.layers.1.", dtype=torch.bfloat16, strip_prefix=True)
    prefix = "model.layers.1."
    expected = {k.removeprefix(prefix): v for k, v in llm.state_dict().items() if k.startswith(prefix)}
    assert sorted(layers) == sorted(expected)
    assert all(layers[k].dtype == torch.bfloat16 for k in layers)
    assert all(torch.equal(layers[k], v.to(torch.bfloat16)) for k, v in expected.items())


def test_sharded_bin_folder_is_read(tmp_path, llama_folders):
    """pytorch_model.bin shards with their index (old Vicuna layout) are read key for key, and cast."""
    llm, _, _ = llama_folders
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    read = read_checkpoint(tmp_path)
    assert sorted(read) == keys and all(torch.equal(read[k], state[k]) for k in keys)
    cast = read_checkpoint(tmp_path, prefix="lm_head.", dtype=torch.float16)
    assert torch.equal(cast["lm_head.weight"], state["lm_head.weight"].half())


@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000])
def test_shard_writer_writes_what_transformers_and_safetensors_read(tmp_path, llama_folders, max_shard_bytes):
    """Tensors written one by one with ShardWriter: one model.safetensors when they fit, else shards of at
    most max_shard_bytes and their index; transformers' from_pretrained and safetensors read them bit-equal,
    in bf16 too."""
    from safetensors import safe_open

    from cos_model.checkpoint_files import ShardWriter

    llm, _, _ = llama_folders
    for dtype in (torch.float32, torch.bfloat16):
        folder = tmp_path / str(dtype)
        state = {k: v.to(dtype) for k, v in llm.state_dict().items()}
        layout = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
        with ShardWriter(folder, layout, max_shard_bytes) as writer:
            for key, tensor in state.items():
                writer.write(key, tensor)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if max_shard_bytes > 10**6:
            assert shards == ["model.safetensors"] and not (folder / "model.safetensors.index.json").exists()
        else:
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert len(shards) >= 2 and sorted(set(index["weight_map"].values())) == shards
            assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
            for shard in shards:  # within the limit, or one tensor alone (as transformers does)
                held = [state[k] for k, file in index["weight_map"].items() if file == shard]
                assert len(held) == 1 or sum(v.numel() * v.element_size() for v in held) <= max_shard_bytes
        for shard in shards:
            with safe_open(str(folder / shard), framework="pt") as handle:
                assert handle.metadata() == {"format": "pt"}
                assert all(torch.equal(handle.get_tensor(k), state[k]) for k in handle.keys())
        llm.config.save_pretrained(folder)
        loaded = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="expected lm_head.weight"):
        ShardWriter(tmp_path / "x", [("lm_head.weight", torch.float32, (2,))], 100).write("other", torch.zeros(2))


def test_folder_without_weights_names_the_folder(tmp_path):
    """A folder with no weights file raises CheckpointMismatchError naming the folder."""
    with pytest.raises(CheckpointMismatchError, match=str(tmp_path)):
        Checkpoint(tmp_path)


# ------------------------------------------------------------------------------------ vision tower


def test_clip_model_folder_gives_clip_vision_model_features(clip_folder):
    """A CLIPModel folder (vision_model.* keys + text tower) loads exactly: features equal CLIPVisionModel's."""
    tower = build_vision_tower(clip_folder, 3)[0]
    assert_features_match(tower, clip_folder, [1, 2], torch.randn(2, 3, 64, 64))


def test_clip_vision_model_folder_gives_equal_features(tmp_path):
    """A CLIPVisionModel folder as transformers 5 writes it (no vision_model. prefix) loads exactly."""
    save_clip_vision(tmp_path)
    assert not any(key.startswith("vision_model.") for key in Checkpoint(tmp_path).keys())
    tower, report = build_vision_tower(tmp_path, 3)
    assert report.unexpected == [] and report.messages == []
    assert_features_match(tower, tmp_path, [0, 2], torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_prefixed_vision_folder_gives_equal_features(tmp_path, fmt):
    """vision_model.-prefixed CLIPVisionModel keys (transformers 4), also as pytorch_model.bin with a
    stale position_ids buffer, load exactly and report nothing unexpected."""
    source = save_clip_vision(tmp_path / "source")
    state = {f"vision_model.{k}": v.contiguous() for k, v in read_checkpoint(source).items()}
    folder = tmp_path / "prefixed"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    if fmt == "bin":
        state["vision_model.embeddings.position_ids"] = torch.arange(257).unsqueeze(0)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    tower, report = build_vision_tower(folder, 4)
    assert report.unexpected == []
    assert_features_match(tower, source, [0, 3], torch.randn(1, 3, 64, 64))


def test_vit_l14_geometry_features_equal(tmp_path):
    """A CLIP with ViT-L/14 geometry (patch 14, 224 px, 24 blocks) at narrow width: blocks 15 and 22 equal."""
    save_clip(tmp_path, vision=VIT_L14_NARROW)
    tower = build_vision_tower(tmp_path, 23)[0]
    assert tower.num_blocks == 23
    assert_features_match(tower, tmp_path, [15, 22], torch.randn(1, 3, 224, 224))


def test_missing_vision_key_is_one_line_error_naming_folder_and_key(tmp_path, clip_folder):
    """A checkpoint without a required key raises one line naming the folder and the key."""
    state = read_checkpoint(clip_folder)
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        build_vision_tower(tmp_path, 3, config=CLIPVisionConfig(**VISION))[0]
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "1 missing keys: vision_model.encoder.layers.1.mlp.fc2.bias" in message


def test_missing_block_past_the_tower_is_not_required(tmp_path, clip_folder):
    """Only the built blocks are required: a checkpoint cut after block 2 loads into a 3-block tower."""
    state = {k: v for k, v in read_checkpoint(clip_folder).items() if "encoder.layers.3." not in k}
    save_file(state, tmp_path / "model.safetensors")
    tower, _ = build_vision_tower(tmp_path, 3, config=CLIPVisionConfig(**VISION))
    with pytest.raises(CheckpointMismatchError, match="encoder.layers.3"):
        build_vision_tower(tmp_path, 4, config=CLIPVisionConfig(**VISION))


def test_vision_shape_mismatch_names_key_and_shapes(tmp_path, clip_folder):
    """A tensor of the wrong shape raises one line with the key and both shapes."""
    state = read_checkpoint(clip_folder)
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(48, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        build_vision_tower(tmp_path, 2, config=CLIPVisionConfig(**VISION))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert "vision_model.encoder.layers.0.mlp.fc1.weight (48, 32) vs (64, 32)" in str(err.value)


def test_unexpected_vision_keys_are_reported_but_left_out_parts_are_not(tmp_path, clip_folder):
    """Extra keys are reported; the text tower, projections, logit_scale, post-LN and later blocks are not."""
    state = read_checkpoint(clip_folder)
    state["vision_model.encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["adapter.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((clip_folder / "config.json").read_text())
    _, report = build_vision_tower(tmp_path, 2)
    assert sorted(report.unexpected) == ["adapter.weight", "vision_model.encoder.layers.0.self_attn.extra.weight"]
    assert any("2 unexpected keys" in message for message in report.messages)


def test_vision_config_with_other_heads_is_refused(clip_folder):
    """Same shapes but another head count (invisible in the tensors) is refused, not loaded."""
    config = CLIPVisionConfig(**{**VISION, "num_attention_heads": 8})
    with pytest.raises(CheckpointMismatchError, match="num_attention_heads=4"):
        build_vision_tower(clip_folder, 2, config=config)


def test_224px_clip_at_448px_gets_the_resized_position_table(clip_folder):
    """A 16x16-grid CLIP used at twice the resolution gets resize_position_embedding's table, reported."""
    config = CLIPVisionConfig(**{**VISION, "image_size": 128})
    tower, report = build_vision_tower(clip_folder, 2, config=config)
    source = read_checkpoint(clip_folder)["vision_model.embeddings.position_embedding.weight"]
    assert torch.equal(tower.embeddings.position_embedding.weight, resize_position_embedding(source, 32))
    assert torch.equal(tower.embeddings.position_ids, torch.arange(32 * 32 + 1).unsqueeze(0))
    assert report.messages == [
        "position table resized from 16x16 to 32x32 patches (bicubic, align_corners=True, CLS row kept)"
    ]
    assert tower.features(torch.randn(1, 3, 128, 128), [1])[0].shape == (1, 32, 32, 32)


# ---------------------------------------------------------------------------------- language model


def meta_llama(vocab_size: int = TINY_VOCAB, tie: bool = False) -> LlamaForCausalLM:
    config = llama_config(tie)
    config.vocab_size = vocab_size
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_every_llm_tensor_equals_the_source(llama_folders, layout):
    """Sharded and single-file Llama folders: every LLM tensor of the built model equals the source."""
    llm, sharded, single = llama_folders
    model, reports = build_pretrained(tiny_config(), None, sharded if layout == "sharded" else single, seed=0)
    built = model.language_model.state_dict()
    assert sorted(built) == sorted(llm.state_dict())
    assert all(torch.equal(built[k], v) for k, v in llm.state_dict().items())
    assert reports["language_model"].unexpected == [] and reports["language_model"].messages == []


def test_llm_cast_to_run_dtype_equals_the_cast_source(llama_folders):
    """In bf16 every LLM tensor equals the source cast to bf16; the rotary buffer stays float32."""
    llm, sharded, _ = llama_folders
    model, _ = build_pretrained(tiny_config(), None, sharded, dtype=torch.bfloat16, seed=0)
    built = model.language_model.state_dict()
    assert all(torch.equal(built[k], v.to(torch.bfloat16)) for k, v in llm.state_dict().items())
    assert model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_tied_llm_keeps_one_shared_embedding(tmp_path):
    """A tied Llama (no lm_head in the file) loads with lm_head and embed_tokens the same parameter."""
    llm = save_llama(tmp_path, tie=True)
    assert "lm_head.weight" not in Checkpoint(tmp_path).keys()
    model = meta_llama(tie=True)
    load_language_model(model, tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, llm.model.embed_tokens.weight)


def test_missing_llm_key_is_one_line_error(tmp_path, llama_folders):
    """A Llama folder without one tensor raises one line naming the folder and the key."""
    llm, _, single = llama_folders
    state = read_checkpoint(single)
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_language_model(meta_llama(), tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert "1 missing keys: model.layers.1.self_attn.k_proj.weight" in str(err.value)


def test_stale_rotary_buffers_are_skipped_other_extras_reported(tmp_path, llama_folders):
    """Old per-layer rotary_emb.inv_freq keys are skipped silently; an unknown key is reported."""
    _, _, single = llama_folders
    state = read_checkpoint(single)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["model.extra.weight"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors")
    report = load_language_model(meta_llama(), tmp_path)
    assert report.unexpected == ["model.extra.weight"]


def tokenizer_folder(path):
    """A word-level tokenizer with the tiny Llama's 100 ids and no <image> token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    wrapped.save_pretrained(path)
    return path


def test_embeddings_grow_to_the_tokenizer_with_image_token(tmp_path, llama_folders):
    """Adding <image> grows embed_tokens and lm_head to len(tokenizer): source rows untouched, new row = mean."""
    from cosctl.data.conversation import IMAGE_TOKEN
    from cosctl.data.records import load_tokenizer

    llm, sharded, _ = llama_folders
    tokenizer = load_tokenizer(tokenizer_folder(tmp_path / "tok"))
    assert len(tokenizer) == TINY_VOCAB + 1 and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == TINY_VOCAB
    model, reports = build_pretrained(tiny_config(), None, sharded, vocab_size=len(tokenizer), seed=0)
    assert model.config.text_config.vocab_size == len(tokenizer)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown, source = model.language_model.get_parameter(name), llm.get_parameter(name)
        assert grown.shape == (len(tokenizer), 32)
        assert torch.equal(grown[:TINY_VOCAB], source)
        assert torch.allclose(grown[TINY_VOCAB], source.double().mean(0).float(), atol=0, rtol=0)
    assert len(reports["language_model"].messages) == 2
    logits = model.language_model(input_ids=torch.tensor([[TINY_VOCAB, 5]])).logits
    assert logits.shape == (1, 2, len(tokenizer))


def test_embeddings_never_shrink(llama_folders):
    """A tokenizer smaller than the checkpoint vocabulary keeps every checkpoint row."""
    llm, _, single = llama_folders
    model, reports = build_pretrained(tiny_config(), None, single, vocab_size=TINY_VOCAB - 10, seed=0)
    assert model.language_model.model.embed_tokens.weight.shape[0] == TINY_VOCAB
    assert torch.equal(model.language_model.lm_head.weight, llm.lm_head.weight)
    with pytest.raises(CheckpointMismatchError, match=r"model.embed_tokens.weight \(100, 32\) vs \(90, 32\)"):
        load_language_model(meta_llama(vocab_size=TINY_VOCAB - 10), single)
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_rows(torch.zeros(4, 2), 3)


# -------------------------------------------------------------------------------------- lean build


def cos_config(image_size: int = 64) -> CosConfig:
    """tiny_config with a 4-block CLIP (the saved CLIP's depth), features from blocks 1 and 2."""
    return tiny_config(image_size=image_size, feature_layers=(1, 2), num_vision_layers=4)


def slow_build(config: CosConfig, clip_folder, llama_folder, seed: int) -> CosForConditionalGeneration:
    """The old way: a fully initialised model, then transformers' own loaders' weights copied in."""
    torch.manual_seed(seed)
    model = CosForConditionalGeneration(config)
    clip = CLIPVisionModel.from_pretrained(clip_folder).state_dict()
    model.vision_tower.load_state_dict({k: v for k, v in clip.items() if k in model.vision_tower.state_dict()})
    model.language_model.load_state_dict(LlamaForCausalLM.from_pretrained(llama_folder).state_dict())
    return model


def test_lean_build_equals_slow_build_on_loaded_parts_and_buffers(clip_folder, llama_folders):
    """Meta build + assignment gives bit-identical ViT/LLM tensors and the buffers of a normal build."""
    _, sharded, _ = llama_folders
    config = cos_config()
    lean, reports = build_pretrained(config, clip_folder, sharded, seed=0)
    slow = slow_build(config, clip_folder, sharded, seed=0)
    lean_state, slow_state = lean.state_dict(), slow.state_dict()
    assert sorted(lean_state) == sorted(slow_state)
    for key in slow_state:
        if key.startswith(("vision_tower.", "language_model.")):
            assert torch.equal(lean_state[key], slow_state[key]), key
    slow_buffers = dict(slow.named_buffers())
    lean_buffers = dict(lean.named_buffers())
    assert sorted(lean_buffers) == sorted(slow_buffers) and len(lean_buffers) >= 3  # position_ids, (original_)inv_freq
    for key, buffer in slow_buffers.items():
        assert lean_buffers[key].dtype == buffer.dtype and torch.equal(lean_buffers[key], buffer), key
    assert not any(t.is_meta for t in [*lean.parameters(), *lean.buffers()])
    inputs = {
        "input_ids": torch.tensor([[3] + [config.image_token_id] * config.num_visual_tokens + [4]]),
        "pixel_values": torch.randn(1, 3, 64, 64),
    }
    with torch.no_grad():
        assert torch.isfinite(lean.eval()(**inputs).logits).all()


def test_lean_bridge_is_the_models_own_init_under_the_seed(clip_folder, llama_folders):
    """With ViT and LLM loaded, the bridge equals the model's _init_weights applied to it after the seed."""
    _, sharded, _ = llama_folders
    config = cos_config()
    lean, _ = build_pretrained(config, clip_folder, sharded, seed=7)
    torch.manual_seed(0)
    reference = CosForConditionalGeneration(config)
    torch.manual_seed(7)
    for part in (reference.resampler, reference.projector):
        part.apply(reference._init_weights)
    for part in ("resampler", "projector"):
        ours, theirs = getattr(lean, part).state_dict(), getattr(reference, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part


def test_random_parts_follow_the_models_init(tmp_path):
    """Without paths everything is initialised once by the model's own init: bridge trunc-normal 0.02,
    zero biases, unit LNs; ViT and LLM by their own init; nothing left unwritten; bf16 cast after."""
    lean, reports = build_pretrained(tiny_config(), dtype=torch.bfloat16, seed=0)
    assert reports == {}
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in lean.parameters())
    linear = lean.resampler.scales[0].levels[0].mlp[0]
    assert abs(linear.weight.float().std().item() - 0.02) < 0.002 and not linear.bias.any()
    norm = lean.projector.norm
    assert (norm.weight == 1).all() and not norm.bias.any()
    queries = lean.resampler.scales[0].queries.float()
    assert abs(queries.std().item() - 0.02) < 0.003
    torch.manual_seed(0)
    slow = CosForConditionalGeneration(tiny_config())
    assert torch.equal(
        dict(lean.named_buffers())["language_model.model.rotary_emb.inv_freq"],
        dict(slow.named_buffers())["language_model.model.rotary_emb.inv_freq"],
    )
    again, _ = build_pretrained(tiny_config(), dtype=torch.bfloat16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(lean.state_dict().values(), again.state_dict().values(), strict=True))


def test_lean_build_at_448px_resizes_the_224px_table(clip_folder, llama_folders):
    """A 16x16-grid CLIP in a model at twice the resolution gets the resized table, and says so."""
    _, _, single = llama_folders
    model, reports = build_pretrained(cos_config(image_size=128), clip_folder, single, seed=0)
    source = read_checkpoint(clip_folder)["vision_model.embeddings.position_embedding.weight"]
    table = model.vision_tower.embeddings.position_embedding.weight
    assert torch.equal(table, resize_position_embedding(source, 32))
    assert "resized from 16x16 to 32x32" in reports["vision_tower"].messages[0]


# ------------------------------------------------------------------------------- partitioned build


class RankSlices:
    """A `Partitioner` laid out as ZeRO-3 lays a parameter over `ranks` ranks (rank r keeps elements
    [r*size, (r+1)*size) of the flattened tensor, size = ceil(numel / ranks)), reading every rank's
    range in turn; the parameter it returns is their concatenation, so a test can compare it whole."""

    def __init__(self, ranks: int = 2):
        self.ranks, self.reads = ranks, {}

    def __call__(self, name, shape, dtype, read):
        numel = shape.numel()
        size = -(-numel // self.ranks)
        parts = []
        for rank in range(self.ranks):
            start, stop = min(rank * size, numel), min((rank + 1) * size, numel)
            out = torch.full((stop - start,), float("nan"), dtype=dtype)
            assert read(start, stop, out) is out, name
            parts.append(out)
            self.reads.setdefault(name, []).append((start, stop))
        return torch.nn.Parameter(torch.cat(parts).view(shape))


@pytest.fixture
def whole_reads(monkeypatch):
    """The checkpoint keys read whole (`Checkpoint.tensor`) while the test runs."""
    keys = []
    real = Checkpoint.tensor

    def tensor(self, key, dtype=None):
        keys.append(key)
        return real(self, key, dtype)

    monkeypatch.setattr(Checkpoint, "tensor", tensor)
    return keys


@pytest.mark.parametrize("image_size", [64, 128])
def test_partitioned_build_equals_the_whole_build_reading_only_ranges(
    tmp_path, clip_folder, llama_folders, whole_reads, image_size
):
    """Built partitioned (2 ranks' ranges), every tensor equals the unpartitioned build's: the loaded ViT
    and LLM, the `<image>` rows grown, a resized position table, the seeded bridge, the buffers; the
    checkpoints are read range by range, whole only where a tensor is computed from the stored one."""
    _, sharded, _ = llama_folders
    config = cos_config(image_size=image_size)
    whole, whole_reports = build_pretrained(
        config, clip_folder, sharded, torch.bfloat16, vocab_size=TINY_VOCAB + 1, seed=5
    )
    whole_reads.clear()
    partition = RankSlices()
    parted, reports = build_pretrained(
        config, clip_folder, sharded, torch.bfloat16, vocab_size=TINY_VOCAB + 1, seed=5, partition=partition
    )
    assert [r.messages for r in reports.values()] == [r.messages for r in whole_reports.values()]
    expected, got = whole.state_dict(), parted.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert sorted(partition.reads) == sorted(name for name, _ in parted.named_parameters())
    computed = {"model.embed_tokens.weight", "lm_head.weight"}  # grown by the <image> row
    if image_size != 64:
        computed.add("vision_model.embeddings.position_embedding.weight")  # resized
    assert set(whole_reads) == computed


def test_a_sharded_saved_folder_loads_exactly_whole_and_partitioned(tmp_path, llama_folders):
    """A model folder whose weights ShardWriter split into shards (the published layout) loads as
    transformers' from_pretrained loads it, exactly (`cos_model.saved`) and partitioned, buffers too."""
    from cos_model.checkpoint_files import ShardWriter
    from cos_model.saved import load_model_folder

    _, sharded, _ = llama_folders
    model, _ = build_pretrained(tiny_config(), None, sharded, seed=0)
    state = model.state_dict()
    with ShardWriter(tmp_path / "model", [(k, v.dtype, tuple(v.shape)) for k, v in state.items()], 50_000) as writer:
        for key, tensor in state.items():
            writer.write(key, tensor)
    model.config.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    reference = CosForConditionalGeneration.from_pretrained(tmp_path / "model")
    for loaded in (
        load_model_folder(tmp_path / "model"),
        load_model_folder(tmp_path / "model", partition=RankSlices(3)),
    ):
        for expected, got in ((reference.state_dict(), loaded.state_dict()), (state, loaded.state_dict())):
            assert sorted(got) == sorted(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
        buffers, expected = dict(loaded.named_buffers()), dict(reference.named_buffers())
        assert sorted(buffers) == sorted(expected) and all(torch.equal(buffers[k], v) for k, v in expected.items())


def test_a_flat_range_is_the_flattened_tensor_cast(llama_folders, tmp_path, monkeypatch):
    """`Checkpoint.flat` of safetensors and .bin folders: any range of any tensor equals the flattened
    tensor's, cast like `tensor`, also read into a given tensor through a buffer of a few elements."""
    from cos_model import checkpoint_files

    monkeypatch.setattr(checkpoint_files, "FLAT_CHUNK_BYTES", 12)
    llm, sharded, _ = llama_folders
    torch.save(llm.state_dict(), tmp_path / "pytorch_model.bin")
    for folder in (sharded, tmp_path):
        with Checkpoint(folder) as checkpoint:
            for key, tensor in llm.state_dict().items():
                flat = tensor.reshape(-1)
                for start, stop in (
                    (0, flat.numel()),
                    (3, 3),
                    (1, min(40, flat.numel())),
                    (flat.numel() - 1, flat.numel()),
                ):
                    assert torch.equal(checkpoint.flat(key, start, stop), flat[start:stop]), key
                    assert torch.equal(checkpoint.flat(key, start, stop, torch.bfloat16), flat[start:stop].bfloat16())
                    out = torch.empty(stop - start, dtype=torch.float64)
                    assert checkpoint.flat(key, start, stop, out=out) is out
                    assert torch.equal(out, flat[start:stop].double())
