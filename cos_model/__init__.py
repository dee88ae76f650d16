"""Chain-of-Sight multimodal LLM: model, token scaling and parameter inflation.

Depends on torch, transformers and peft only; never imports `cosctl`.
"""

from transformers import AutoConfig

from .configuration import DEFAULT_SCALES, CosConfig, Scale
from .inflate import PRESETS, Preset, inflate_config, inflate_state_dict
from .modeling import IGNORE_INDEX, CosForConditionalGeneration, expand_image_tokens
from .resampler import ResamplerChain, WindowedCrossAttnResampler

AutoConfig.register(CosConfig.model_type, CosConfig, exist_ok=True)

__all__ = [
    "DEFAULT_SCALES",
    "IGNORE_INDEX",
    "PRESETS",
    "CosConfig",
    "CosForConditionalGeneration",
    "ResamplerChain",
    "Preset",
    "Scale",
    "WindowedCrossAttnResampler",
    "expand_image_tokens",
    "inflate_config",
    "inflate_state_dict",
]
