"""Token scaling and parameter inflation (docs/design.md §3): pure functions from a trained model to a bigger one.

Compound scaling = resolution scaling x window scaling (Chain-of-Sight, section 3.3):

- resolution: the ViT's absolute position table is resized bicubically to the new patch grid (the CLS
  row kept); a scale whose window keeps its size in patches now tiles more windows;
- window: a new scale is made from a parent scale: every resampler weight of the parent (both levels,
  LNs, attention, MLP) is copied, and each child window starts with the queries of the parent window
  that contains it (spatial replication; no noise, no interpolation).

`inflate_config(src, plan)` gives the destination config (each scale records its `parent`);
`inflate_state_dict(state_dict, src, dst)` maps the weights. Neither does I/O or builds a model, and
neither mutates its input; unchanged tensors are shared with the input, changed ones are new. The
preset table (`PRESETS`) is defined in `cos_model.scales`, which needs neither torch nor transformers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import TYPE_CHECKING

from .configuration import CosConfig
from .scales import PRESET_SOURCE_GRID, PRESETS, Preset, Scale, check_scales

if TYPE_CHECKING:
    import torch

POSITION_KEY = "vision_tower.embeddings.position_embedding.weight"
SCALE_KEY = re.compile(r"^resampler\.scales\.(\d+)\.(.+)$")


def inflate_config(src: CosConfig, plan: str | dict) -> CosConfig:
    """The destination config for `plan`: a preset name (see `PRESETS`) or
    `{"image_size": px, "scales": [Scale or {window, queries_per_window, parent?}, ...]}`; a scale without
    `parent` is inflated from the source scale with the same queries per window whose window covers
    the smallest image fraction that still contains it."""
    image_size, scales = _resolve_plan(src, plan)
    config = copy.deepcopy(src.to_dict())
    config["vision_config"]["image_size"] = image_size
    config["scales"] = [scale.to_dict() for scale in scales]
    for key in ("model_type", "transformers_version", "architectures"):
        config.pop(key, None)
    dst = CosConfig(**config)  # validates windows against the new grid
    _check_lineage(src, dst)
    return dst


def _resolve_plan(src: CosConfig, plan: str | dict) -> tuple[int, list[Scale]]:
    if isinstance(plan, str):
        if plan not in PRESETS:
            raise ValueError(f"plan: unknown preset {plan!r}; presets are {sorted(PRESETS)}")
        preset = PRESETS[plan]
        if src.num_visual_tokens != preset.source_tokens or src.grid_size != PRESET_SOURCE_GRID:
            raise ValueError(
                f"plan {plan!r}: needs a {preset.source_tokens}-token source on a {PRESET_SOURCE_GRID}x"
                f"{PRESET_SOURCE_GRID} grid, got {src.num_visual_tokens} tokens on {src.grid_size}x{src.grid_size}"
            )
        return 2 * src.image_size, list(preset.scales)
    if not isinstance(plan, dict) or set(plan) != {"image_size", "scales"}:
        raise ValueError(f"plan: expected a preset name or {{'image_size', 'scales'}}, got {plan!r}")
    image_size = plan["image_size"]
    patch = src.vision_config.patch_size
    if not isinstance(image_size, int) or image_size < patch or image_size % patch:
        raise ValueError(f"plan.image_size: {image_size!r} is not a positive multiple of the {patch}-px patch")
    grid = image_size // patch
    scales = check_scales(list(plan["scales"]), grid, field="plan.scales")
    return image_size, [
        scale
        if scale.parent is not None
        else replace(scale, parent=_infer_parent(src, scale, grid, f"plan.scales[{i}]"))
        for i, scale in enumerate(scales)
    ]


def _infer_parent(src: CosConfig, scale: Scale, grid: int, where: str) -> int:
    fraction = scale.window / grid
    candidates = [
        (source.window / src.grid_size, i)
        for i, source in enumerate(src.scales)
        if source.queries_per_window == scale.queries_per_window and source.window / src.grid_size >= fraction
    ]
    if not candidates:
        raise ValueError(
            f"{where}: no source scale with {scale.queries_per_window} queries per window and a window "
            f"at least {fraction:.3g} of the image to inflate from; give 'parent' explicitly"
        )
    return min(candidates)[1]


def _check_lineage(src: CosConfig, dst: CosConfig) -> None:
    """Raise unless every destination scale can be initialised from its parent and every source scale
    is used."""
    sources = src.scales
    used = set()
    for i, child in enumerate(dst.scales):
        where = f"scales[{i}]"
        if child.parent is None or child.parent >= len(sources):
            raise ValueError(f"{where}.parent: {child.parent!r} is not a source scale (0..{len(sources) - 1})")
        parent = sources[child.parent]
        if child.queries_per_window != parent.queries_per_window:
            raise ValueError(
                f"{where}: {child.queries_per_window} queries per window cannot be inflated from source "
                f"scale {child.parent} with {parent.queries_per_window}"
            )
        child_side, parent_side = child.windows_per_side(dst.grid_size), parent.windows_per_side(src.grid_size)
        if child_side % parent_side:
            raise ValueError(
                f"{where}: its {child_side}x{child_side} windows do not each lie "
                f"inside one of source scale {child.parent}'s {parent_side}x{parent_side} windows"
            )
        used.add(child.parent)
    unused = sorted(set(range(len(sources))) - used)
    if unused:
        raise ValueError(f"scales: source scales {unused} are not inflated into any destination scale")
    for field in ("feature_layers", "resampler_num_heads", "resampler_mlp_ratio", "image_token_id"):
        if getattr(src, field) != getattr(dst, field):
            raise ValueError(f"{field}: inflation cannot change it ({getattr(src, field)} -> {getattr(dst, field)})")


def replicate_queries(queries: torch.Tensor, parent_per_side: int, child_per_side: int) -> torch.Tensor:
    """(nW_parent, q, C) -> (nW_child, q, C): child window (a, b) gets the queries of the parent window
    (a // r, b // r), r = child windows per side / parent windows per side."""
    ratio = child_per_side // parent_per_side
    q, width = queries.shape[1], queries.shape[2]
    grid = queries.reshape(parent_per_side, parent_per_side, q, width)
    grid = grid.repeat_interleave(ratio, dim=0).repeat_interleave(ratio, dim=1)
    return grid.reshape(child_per_side * child_per_side, q, width).clone()


def inflate_state_dict(state_dict: dict[str, torch.Tensor], src: CosConfig, dst: CosConfig) -> dict[str, torch.Tensor]:
    """Map a `src` model's weights onto the `dst` architecture (from `inflate_config`)."""
    from .vision import resize_position_embedding  # torch and the CLIP model code: only to map weights

    _check_lineage(src, dst)
    sources, children = src.scales, dst.scales
    per_scale: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(sources))}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = SCALE_KEY.match(key)
        if match:
            index = int(match.group(1))
            if index >= len(sources):
                raise ValueError(f"state_dict: {key} names scale {index}, the source config has {len(sources)}")
            per_scale[index][match.group(2)] = tensor
        elif key == POSITION_KEY:
            out[key] = resize_position_embedding(tensor, dst.grid_size)
        else:
            out[key] = tensor
    if POSITION_KEY not in out:
        raise ValueError(f"state_dict: missing {POSITION_KEY}")
    for j, child in enumerate(children):
        parent_weights = per_scale[child.parent]
        if "queries" not in parent_weights:
            raise ValueError(f"state_dict: missing resampler.scales.{child.parent}.queries")
        for name, tensor in parent_weights.items():
            if name == "queries":
                tensor = replicate_queries(
                    tensor, sources[child.parent].windows_per_side(src.grid_size), child.windows_per_side(dst.grid_size)
                )
            else:
                tensor = tensor.clone()
            out[f"resampler.scales.{j}.{name}"] = tensor
    return out


__all__ = ["PRESETS", "Preset", "inflate_config", "inflate_state_dict", "replicate_queries"]
