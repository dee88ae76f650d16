"""CosForConditionalGeneration: image-token merge, labels, save/load, generate."""

import pytest
import torch

from cos_model import CosForConditionalGeneration, expand_image_tokens
from tests.tiny import TINY_IMAGE_TOKEN, tiny_config, tiny_inputs


def test_image_features_shape(model, config):
    """get_image_features maps (B, 3, 64, 64) to (B, 32, LLM width)."""
    inputs = tiny_inputs(config, num_images=3)
    assert model.get_image_features(inputs["pixel_values"]).shape == (3, 32, 32)


def test_wrong_image_size_raises(model):
    """Images at another resolution raise a clear error."""
    with pytest.raises(ValueError, match="pixel_values"):
        model.get_image_features(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("num_image_tokens", [31, 33, 64])
def test_image_token_count_mismatch_raises(model, config, num_image_tokens):
    """input_ids whose image-token count is not images x 32 raise ValueError."""
    ids = torch.tensor([[1, 2] + [TINY_IMAGE_TOKEN] * num_image_tokens + [3]])
    with pytest.raises(ValueError, match="image tokens and images disagree"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64))


def test_image_tokens_without_images_raise(model):
    """Image tokens with no pixel_values raise."""
    with pytest.raises(ValueError, match="0 images"):
        model(input_ids=torch.tensor([[1] + [TINY_IMAGE_TOKEN] * 32]))


def test_visual_tokens_replace_image_positions(model, config):
    """The embeddings at image positions are exactly the projected visual tokens, in order."""
    inputs = tiny_inputs(config, num_images=2)
    with torch.no_grad():
        embeds = model.embed_inputs(**inputs)
        visual = model.get_image_features(inputs["pixel_values"])
    assert torch.equal(embeds[0, 3:35], visual[0]) and torch.equal(embeds[1, 3:35], visual[1])


def test_labels_at_image_positions_are_ignored(model, config):
    """The loss is the same whatever labels sit at image positions (they become -100)."""
    inputs = tiny_inputs(config)
    labels = inputs["input_ids"].clone()
    scrambled = labels.clone()
    scrambled[labels == TINY_IMAGE_TOKEN] = 5
    with torch.no_grad():
        a = model(**inputs, labels=labels).loss
        b = model(**inputs, labels=scrambled).loss
    assert torch.equal(a, b)


def test_save_and_load_give_identical_logits(model, config, tmp_path):
    """save_pretrained (safetensors) -> from_pretrained reproduces the logits exactly."""
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = CosForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs(config, num_images=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_generate_returns_prompt_then_new_tokens(model, config):
    """generate() with an image returns each prompt followed by up to max_new_tokens valid token ids,
    as a tensor and as `.sequences` of a dict output (transformers' decoder-only contract)."""
    inputs = tiny_inputs(config, num_images=2)
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2 and prompt_length + 1 <= out.shape[1] <= prompt_length + 4
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])
    new = out[:, prompt_length:]
    assert ((new >= 0) & (new < config.text_config.vocab_size)).all()
    scored = model.generate(
        **inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(scored.sequences, out) and len(scored.scores) == new.shape[1]


def test_expand_image_tokens():
    """A single placeholder becomes num_visual_tokens copies; other ids keep their order."""
    assert expand_image_tokens([5, 9, 6], 9, 3) == [5, 9, 9, 9, 6]


def test_bridge_init_std_scales_the_new_bridge_only():
    """`bridge_init_std` sets the std of the bridge's queries and Linear weights (a narrow bridge needs
    more than the reference 0.02); the LLM keeps its own init."""
    config = tiny_config()
    config.bridge_init_std = 0.125
    torch.manual_seed(0)
    model = CosForConditionalGeneration(config)
    block = model.resampler.scales[1].levels[0]
    for weight in (model.resampler.scales[0].queries, block.mlp[0].weight, block.attn.kv_proj.weight):
        assert 0.11 < weight.std().item() < 0.14
    assert 0.11 < model.projector.linear.weight.std().item() < 0.14
    assert model.language_model.model.layers[0].mlp.up_proj.weight.std().item() < 0.03


def test_bridge_initialisation(model):
    """Queries and resampler Linear weights ~ trunc_normal(std 0.02), biases zero, LN weight one."""
    queries = model.resampler.scales[0].queries
    assert 0.01 < queries.std().item() < 0.03
    block = model.resampler.scales[1].levels[0]
    assert torch.all(block.mlp[0].bias == 0) and torch.all(block.attn.norm_queries.weight == 1)
    assert 0.01 < block.mlp[0].weight.std().item() < 0.03
