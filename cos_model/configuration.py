"""`CosConfig`: the Chain-of-Sight model's configuration.

A config describes the whole MLLM (CLIP vision tower, resampler chain, projection, causal LM) without
building any weights. `Scale` (defined in `cos_model.scales`, re-exported here) is the one type a
resampler scale has, here, in presets and in run specs; `config.json` stores scales as plain dicts, so
it stays readable and round-trips through `save_pretrained`. The geometry rule (`check_layout`) lives
with `Scale`, so run specs can apply it without transformers.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .scales import DEFAULT_SCALES, Scale, check_layout, check_scales

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
        bridge_init_std: std of the trunc-normal init of the bridge's queries and Linear weights. 0.02
            is the reference for 1024-wide towers; narrow ones need about 1/sqrt(vision width).
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
    bridge_init_std: float = 0.02
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
        if not self.bridge_init_std > 0:
            raise ValueError(f"bridge_init_std: must be > 0, got {self.bridge_init_std}")
        vision = self.vision_config
        check_layout(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_layers=vision.num_hidden_layers,
            vision_width=vision.hidden_size,
            feature_layers=self.feature_layers,
            scales=self.scales,
            resampler_num_heads=self.resampler_num_heads,
            resampler_mlp_ratio=self.resampler_mlp_ratio,
            image_token_id=self.image_token_id,
        )

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
