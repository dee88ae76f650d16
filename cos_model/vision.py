"""The CLIP vision tower, cut after the deepest feature layer, and the position-embedding resize.

Chain-of-Sight reads ViT features from a few hidden layers (blocks 15 and 22 of ViT-L/14 by default)
and never needs the blocks after the deepest one, nor the post-LN and pooler: they are not built, so
they cost neither memory nor compute; the weights of the missing blocks are simply unused.

A real CLIP checkpoint loads with `cos_model.building.build_vision_tower`, not transformers' loader:
transformers 5 renames the `vision_model.*` keys of a CLIP checkpoint only for the class named
`CLIPVisionModel`, so this subclass would match no key and keep its random init
(`CosVisionTower.from_pretrained` refuses for that reason). The build maps the keys itself
(`cos_model.loading.load_vision_tower`) and raises `CheckpointMismatchError` on any missing key or shape
mismatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel


class CosVisionTower(CLIPVisionModel):
    """`CLIPVisionModel` with only blocks 0..`num_blocks - 1`; `features()` returns the chosen blocks'
    outputs as patch grids without the CLS token."""

    def __init__(self, config: CLIPVisionConfig, num_blocks: int | None = None):
        super().__init__(config)
        num_blocks = config.num_hidden_layers if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= config.num_hidden_layers:
            raise ValueError(f"num_blocks: {num_blocks} is outside 1..{config.num_hidden_layers}")
        self.encoder.layers = self.encoder.layers[:num_blocks]
        # The post-LN only feeds the pooled CLS output, which Chain-of-Sight never reads.
        del self.post_layernorm

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Refused: transformers' loader would match none of a CLIP checkpoint's keys for this subclass and
        keep its random init. `cos_model.building.build_vision_tower(folder, num_blocks)` loads exactly."""
        raise TypeError(
            "CosVisionTower.from_pretrained would load no weights (transformers maps CLIP keys for "
            "CLIPVisionModel only): use cos_model.building.build_vision_tower(folder, num_blocks)"
        )

    @property
    def num_blocks(self) -> int:
        return len(self.encoder.layers)

    def features(self, pixel_values: torch.Tensor, feature_layers: list[int]) -> list[torch.Tensor]:
        """Outputs of the 0-indexed blocks `feature_layers` as (B, G, G, C) grids, CLS dropped."""
        if max(feature_layers) >= self.num_blocks:
            raise ValueError(
                f"feature_layers: block {max(feature_layers)} was not built (tower has {self.num_blocks} blocks)"
            )
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        batch, num_tokens, width = hidden.shape
        grid = int(round((num_tokens - 1) ** 0.5))
        wanted = set(feature_layers)
        outputs = []
        for index, block in enumerate(self.encoder.layers[: max(feature_layers) + 1]):
            hidden = block(hidden, None)
            if index in wanted:
                outputs.append(hidden[:, 1:].reshape(batch, grid, grid, width))
        return outputs


def resize_position_embedding(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubically resize a CLIP position table (1 + G*G, C) to (1 + new_grid^2, C) with
    `align_corners=True` (as the Chain-of-Sight authors do): the four corner patches keep their
    vectors exactly and the grid is stretched between them; the CLS row is kept as is. Computed in
    float64, so the corners round back to the input's values in any floating dtype. Returns a new
    tensor in the input's dtype; the input is never modified."""
    num_positions, width = weight.shape
    grid = int(round((num_positions - 1) ** 0.5))
    if grid * grid + 1 != num_positions:
        raise ValueError(f"position embedding: {num_positions} rows is not 1 + a square grid")
    if new_grid < 1:
        raise ValueError(f"position embedding: new grid {new_grid} must be >= 1")
    if new_grid == grid:
        return weight.clone()
    if grid < 2:
        raise ValueError(f"position embedding: a {grid}x{grid} grid cannot be interpolated")
    cls_row, patches = weight[:1], weight[1:]
    patches = patches.reshape(1, grid, grid, width).permute(0, 3, 1, 2).double()
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=True)
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(weight.dtype)
    return torch.cat([cls_row.clone(), patches], dim=0)


__all__ = ["CosVisionTower", "resize_position_embedding"]
