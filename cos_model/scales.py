"""Resampler scales, the model's geometry check and the inflation presets: plain Python (no torch, no
transformers), so run specs and `cosctl plan` can use them without loading either.

`Scale` is the one type a resampler scale has, in configs, presets and run specs. `check_layout` is the
geometry rule `CosConfig` enforces (resolution, feature blocks, scales, resampler heads), on plain
numbers, so a spec can be checked before any config object exists. `PRESETS` is the token table of
docs/design.md §3; `cos_model.inflate` maps weights with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """One resampler scale: square windows of `window` patches per side, each with its own
    `queries_per_window` learned queries; an inflated scale records the source scale it was made from
    (`parent`). How many windows (and tokens) it has depends on the patch grid it is laid on."""

    window: int
    queries_per_window: int
    parent: int | None = None

    def windows_per_side(self, grid: int) -> int:
        return grid // self.window

    def num_windows(self, grid: int) -> int:
        return self.windows_per_side(grid) ** 2

    def num_tokens(self, grid: int) -> int:
        return self.num_windows(grid) * self.queries_per_window

    def to_dict(self) -> dict:
        """The config.json form (no `parent` key for a scale that was not inflated)."""
        out = {"window": self.window, "queries_per_window": self.queries_per_window}
        return out if self.parent is None else {**out, "parent": self.parent}


# The 32-token pre-training chain: one global window with 16 queries + 4x4 local windows x 1 query.
DEFAULT_SCALES = (Scale(window=16, queries_per_window=16), Scale(window=4, queries_per_window=1))


def check_scales(scales: list[Scale | dict], grid: int, field: str = "scales") -> list[Scale]:
    """Validate scales (`Scale`s or their config.json dicts) against a patch grid; raise `ValueError`
    naming `field[i].key` for the first bad entry."""
    if not isinstance(scales, (list, tuple)) or len(scales) == 0:
        raise ValueError(f"{field}: needs at least one scale, got {scales!r}")
    checked = []
    for i, scale in enumerate(scales):
        where = f"{field}[{i}]"
        if isinstance(scale, Scale):
            scale = scale.to_dict()
        if not isinstance(scale, dict):
            raise ValueError(f"{where}: expected a mapping with 'window' and 'queries_per_window', got {scale!r}")
        unknown = set(scale) - {"window", "queries_per_window", "parent"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        parent = scale.get("parent")
        if parent is not None and (not isinstance(parent, int) or isinstance(parent, bool) or parent < 0):
            raise ValueError(f"{where}.parent: must be a source scale index >= 0, got {parent!r}")
        for key in ("window", "queries_per_window"):
            value = scale.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")
        if grid % scale["window"]:
            raise ValueError(f"{where}.window: {scale['window']} patches does not divide the {grid}x{grid} patch grid")
        checked.append(Scale(scale["window"], scale["queries_per_window"], parent))
    return checked


def check_layout(
    *,
    image_size: int,
    patch_size: int,
    vision_layers: int,
    vision_width: int,
    feature_layers: Sequence[int],
    scales: Sequence[Scale | dict],
    resampler_num_heads: int,
    resampler_mlp_ratio: int = 4,
    image_token_id: int = 0,
) -> None:
    """Raise `ValueError` naming the config field (`vision_config.image_size`, `feature_layers`, ...) when
    the parts do not fit together: the rule every `CosConfig` obeys, on plain numbers."""
    if image_size % patch_size:
        raise ValueError(f"vision_config.image_size: {image_size} px is not a multiple of the {patch_size}-px patch")
    layers = list(feature_layers)
    if not layers:
        raise ValueError("feature_layers: needs at least one ViT block")
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < vision_layers:
            raise ValueError(f"feature_layers: block {layer!r} is outside the ViT's blocks 0..{vision_layers - 1}")
    if layers != sorted(set(layers)):
        raise ValueError(f"feature_layers: must be strictly increasing, got {layers}")
    check_scales(list(scales), image_size // patch_size)
    if resampler_num_heads < 1 or vision_width % resampler_num_heads:
        raise ValueError(f"resampler_num_heads: {resampler_num_heads} does not divide the vision width {vision_width}")
    if resampler_mlp_ratio < 1:
        raise ValueError(f"resampler_mlp_ratio: must be >= 1, got {resampler_mlp_ratio}")
    if image_token_id < 0:
        raise ValueError(f"image_token_id: must be >= 0, got {image_token_id}")


@dataclass(frozen=True)
class Preset:
    """A named inflation: from a `source_tokens`-token chain on a 16x16 grid to `scales` on the 32x32
    grid of twice the resolution (224 -> 448 px for ViT-L/14)."""

    source_tokens: int
    scales: tuple[Scale, ...]


def _preset(source_tokens: int, *scales: tuple[int, int, int]) -> Preset:
    return Preset(source_tokens, tuple(Scale(window, queries, parent) for window, queries, parent in scales))


# The token table: (window in patches of the 32x32 grid, queries per window, parent source scale).
PRESETS: dict[str, Preset] = {
    "32to80": _preset(32, (32, 16, 0), (4, 1, 1)),
    "32to336": _preset(32, (32, 16, 0), (16, 16, 0), (2, 1, 1)),
    "32to528": _preset(32, (32, 16, 0), (8, 16, 0), (2, 1, 1)),
    "80to336": _preset(80, (32, 16, 0), (16, 16, 0), (4, 4, 1)),
    "80to1296": _preset(80, (32, 16, 0), (8, 16, 0), (2, 4, 1)),
}
PRESET_SOURCE_GRID = 16

__all__ = ["DEFAULT_SCALES", "PRESETS", "PRESET_SOURCE_GRID", "Preset", "Scale", "check_layout", "check_scales"]
