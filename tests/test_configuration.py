"""CosConfig: defaults that describe the paper's model, validation, serialisation."""

import json

import pytest

from cos_model import CosConfig
from tests.tiny import tiny_config


def test_defaults_are_the_papers_pretraining_model():
    """Default config: ViT-L/14 at 224 px, blocks 15 and 22, the 32-token chain."""
    config = CosConfig()
    assert config.num_visual_tokens == 32
    assert config.image_size == 224 and config.grid_size == 16
    assert config.vision_config.hidden_size == 1024 and config.vision_config.patch_size == 14
    assert config.vision_config.num_hidden_layers == 24
    assert config.feature_layers == [15, 22]
    assert [(s.window, s.queries_per_window, s.num_windows(16)) for s in config.scales] == [(16, 16, 1), (4, 1, 16)]


def test_eighty_token_variant():
    """The [{16,16},{4,4}] chain emits 16 + 16x4 = 80 tokens."""
    config = CosConfig(scales=[{"window": 16, "queries_per_window": 16}, {"window": 4, "queries_per_window": 4}])
    assert config.num_visual_tokens == 80


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scales": []}, "scales"),
        ({"scales": [{"window": 5, "queries_per_window": 1}]}, "scales[0].window"),
        ({"scales": [{"window": 16, "queries_per_window": 0}]}, "scales[0].queries_per_window"),
        ({"scales": [{"window": 16, "queries_per_window": 1}, {"window": 4}]}, "scales[1].queries_per_window"),
        ({"scales": [{"window": 16, "queries_per_window": 1, "stride": 2}]}, "scales[0]"),
        ({"feature_layers": [15, 24]}, "feature_layers"),
        ({"feature_layers": [22, 15]}, "feature_layers"),
        ({"feature_layers": []}, "feature_layers"),
        ({"resampler_num_heads": 7}, "resampler_num_heads"),
        ({"bridge_init_std": 0.0}, "bridge_init_std"),
        ({"vision_config": {"model_type": "clip_vision_model", "image_size": 230, "patch_size": 14}}, "image_size"),
    ],
)
def test_bad_values_raise_naming_the_field(kwargs, field):
    """Each invalid value raises ValueError whose message names the field."""
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        CosConfig(**kwargs)


def test_round_trip_through_config_json(tmp_path):
    """save_pretrained -> from_pretrained keeps scales, layers and sub-configs."""
    config = tiny_config(scales=[{"window": 16, "queries_per_window": 16}, {"window": 2, "queries_per_window": 1}])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "cos" and saved["scales"][1] == {"window": 2, "queries_per_window": 1}
    loaded = CosConfig.from_pretrained(tmp_path)
    assert loaded.num_visual_tokens == config.num_visual_tokens == 16 + 64
    assert loaded.feature_layers == [0, 1]
    assert loaded.vision_config.hidden_size == 32 and loaded.text_config.vocab_size == 100
