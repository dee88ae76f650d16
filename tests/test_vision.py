"""Vision tower: feature layers, truncation, position-embedding resize."""

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from cos_model.vision import CosVisionTower, resize_position_embedding

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4, image_size=64)


def test_features_equal_clip_hidden_states_of_chosen_blocks(tmp_path):
    """features() returns blocks 1 and 2 of a CLIP checkpoint, CLS dropped, as 16x16 grids."""
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    clip.save_pretrained(tmp_path)
    tower = CosVisionTower.from_pretrained(tmp_path, num_blocks=3).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = clip(pixels, output_hidden_states=True).hidden_states  # [0] = embeddings
        features = tower.features(pixels, [1, 2])
    for block, grid in zip([1, 2], features):
        assert grid.shape == (2, 16, 16, 32)
        assert torch.equal(grid, hidden[block + 1][:, 1:].reshape(2, 16, 16, 32))


def test_blocks_past_the_deepest_feature_layer_are_not_built():
    """A tower for feature layers up to block 1 holds 2 blocks and no post-LN."""
    tower = CosVisionTower(CLIPVisionConfig(**VISION), num_blocks=2)
    assert len(tower.encoder.layers) == 2
    assert not any(name.startswith(("encoder.layers.2", "post_layernorm")) for name, _ in tower.named_parameters())


def test_position_resize_is_identity_at_same_size():
    """Resizing to the same grid returns equal values in a new tensor."""
    table = torch.randn(1 + 16 * 16, 8)
    resized = resize_position_embedding(table, 16)
    assert torch.equal(resized, table) and resized.data_ptr() != table.data_ptr()


def test_position_resize_to_448_px_keeps_cls_and_is_bicubic():
    """16x16 -> 32x32 gives 32*32+1 rows, the CLS row unchanged, patches = bicubic interpolation."""
    table = torch.randn(1 + 16 * 16, 8)
    original = table.clone()
    resized = resize_position_embedding(table, 32)
    assert resized.shape == (32 * 32 + 1, 8)
    assert torch.equal(resized[0], table[0])
    grid = table[1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(resized[1:], expected.permute(0, 2, 3, 1).reshape(-1, 8))
    assert torch.equal(table, original)
