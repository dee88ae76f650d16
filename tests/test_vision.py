"""Vision tower: feature layers, truncation, position-embedding resize."""

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from cos_model.building import build_vision_tower
from cos_model.vision import CosVisionTower, resize_position_embedding

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4, image_size=64
)


def test_features_equal_clip_hidden_states_of_chosen_blocks(tmp_path):
    """features() returns blocks 1 and 2 of a CLIP checkpoint, CLS dropped, as 16x16 grids."""
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    clip.save_pretrained(tmp_path)
    tower = build_vision_tower(tmp_path, 3)[0].eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = clip(pixels, output_hidden_states=True).hidden_states  # [0] = embeddings
        features = tower.features(pixels, [1, 2])
    for block, grid in zip([1, 2], features, strict=True):
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


def bicubic_align_corners(grid: np.ndarray, size: int, a: float = -0.75) -> np.ndarray:
    """Reference (G, G, C) -> (size, size, C) bicubic resize written from the definition: Keys' cubic
    convolution kernel (a = -0.75), align_corners=True sampling (output i sits at input i*(G-1)/(size-1)),
    indices clamped at the border. Exact rational positions, float64, one output point at a time."""

    def kernel(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    def taps(i: int) -> list[tuple[int, float]]:
        base, remainder = divmod(i * (grid.shape[0] - 1), size - 1)
        t = remainder / (size - 1)
        last = grid.shape[0] - 1
        return [(min(max(base + k, 0), last), kernel(t - k)) for k in (-1, 0, 1, 2)]

    out = np.zeros((size, size, grid.shape[2]))
    for y in range(size):
        for x in range(size):
            for row, wy in taps(y):
                for col, wx in taps(x):
                    out[y, x] += wy * wx * grid[row, col]
    return out


@pytest.mark.parametrize("old, new", [(16, 32), (4, 7), (6, 4)])
def test_position_resize_is_bicubic_with_aligned_corners(old, new):
    """The patch grid is a bicubic align_corners=True resize (checked against a hand-written one); the
    four corner patches and the CLS row are exactly the old ones; the input is unchanged."""
    table = torch.randn(1 + old * old, 8)
    original = table.clone()
    resized = resize_position_embedding(table, new)
    assert resized.shape == (1 + new * new, 8)
    assert torch.equal(resized[0], table[0])
    old_grid, new_grid = table[1:].reshape(old, old, 8), resized[1:].reshape(new, new, 8)
    for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert torch.equal(new_grid[y, x], old_grid[y, x])
    expected = bicubic_align_corners(old_grid.double().numpy(), new)
    np.testing.assert_allclose(new_grid.numpy(), expected, rtol=0, atol=1e-5)
    assert torch.equal(table, original)


def test_position_resize_keeps_bf16_corners():
    """In bf16 the table stays bf16 and the corners round back to exactly the old values."""
    table = torch.randn(1 + 16 * 16, 8).to(torch.bfloat16)
    resized = resize_position_embedding(table, 24)
    assert resized.dtype == torch.bfloat16
    old_grid, new_grid = table[1:].reshape(16, 16, 8), resized[1:].reshape(24, 24, 8)
    for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        assert torch.equal(new_grid[y, x], old_grid[y, x])
