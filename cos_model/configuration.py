"""`CosConfig`: the Chain-of-Sight model's configuration, and the typed view of its resampler scales.

A config describes the whole MLLM (CLIP vision tower, resampler chain, projection, causal LM) without
building any weights. `Scale` is the one type a resampler scale has, here, in presets and in run specs;
`config.json` stores scales as plain dicts, so it stays readable and round-trips through
`save_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

# CLIP ViT-L/14 at 224 px, the paper's pre-training encoder.
VIT_L14_224 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
}

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
            raise ValueError(
                f"{where}.window: {scale['window']} patches does not divide the {grid}x{grid} patch grid"
            )
        checked.append(Scale(scale["window"], scale["queries_per_window"], parent))
    return checked


@strict
class CosConfig(PreTrainedConfig):
    """Chain-of-Sight MLLM: CLIP vision tower -> multi-scale windowed resampler chain -> LN + Linear ->
    causal LM.

    Args:
        vision_config: CLIP vision config (default: ViT-L/14 at 224 px). Its `image_size` is the model's.
        text_config: any causal-LM config (default: a LLaMA-7B-shaped config).
        feature_layers: 0-indexed ViT blocks whose outputs feed the resampler, shallow to deep; blocks
            past the deepest one are never built.
        scales: resampler scales, global first, as `Scale`s (or their `{window, queries_per_window}`
            dicts, as config.json stores them); an inflated model's scales also record `parent`, the
            source scale they were initialised from.
        resampler_num_heads: attention heads in every resampler cross-attention.
        resampler_mlp_ratio: hidden width of the resampler MLP, as a multiple of the vision width.
        image_token_id: id of the `<image>` token; each image occupies `num_visual_tokens` of them.
    """

    model_type = "cos"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=dict(VIT_L14_224)
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    feature_layers: list[int] | None = None
    scales: list[dict | Scale] | None = None
    resampler_num_heads: int = 16
    resampler_mlp_ratio: int = 4
    image_token_id: int = 32000
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.feature_layers is None:
            self.feature_layers = [15, 22]
        if self.scales is None:
            self.scales = list(DEFAULT_SCALES)
        self._check()
        self.scales = check_scales(self.scales, self.grid_size)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["scales"] = [scale.to_dict() if isinstance(scale, Scale) else scale for scale in self.scales]
        return output

    def _check(self) -> None:
        vision = self.vision_config
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"vision_config.image_size: {vision.image_size} px is not a multiple of the "
                f"{vision.patch_size}-px patch"
            )
        layers = list(self.feature_layers)
        if not layers:
            raise ValueError("feature_layers: needs at least one ViT block")
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < vision.num_hidden_layers:
                raise ValueError(
                    f"feature_layers: block {layer!r} is outside the ViT's blocks 0..{vision.num_hidden_layers - 1}"
                )
        if layers != sorted(set(layers)):
            raise ValueError(f"feature_layers: must be strictly increasing, got {layers}")
        check_scales(self.scales, self.grid_size)
        if self.resampler_num_heads < 1 or vision.hidden_size % self.resampler_num_heads:
            raise ValueError(
                f"resampler_num_heads: {self.resampler_num_heads} does not divide the vision width "
                f"{vision.hidden_size}"
            )
        if self.resampler_mlp_ratio < 1:
            raise ValueError(f"resampler_mlp_ratio: must be >= 1, got {self.resampler_mlp_ratio}")
        if self.image_token_id < 0:
            raise ValueError(f"image_token_id: must be >= 0, got {self.image_token_id}")

    @property
    def image_size(self) -> int:
        """Input resolution in pixels (the vision config's, so there is one source of truth)."""
        return self.vision_config.image_size

    @property
    def grid_size(self) -> int:
        """Patches per side of the ViT's patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image that the resampler chain emits into the LLM."""
        return sum(scale.num_tokens(self.grid_size) for scale in self.scales)


__all__ = ["CosConfig", "Scale", "check_scales", "DEFAULT_SCALES", "VIT_L14_224"]
