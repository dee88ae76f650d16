"""Chain-of-Sight multimodal LLM: model, token scaling and parameter inflation.

Depends on torch, transformers and peft only; never imports `cosctl`.

The names below load on first use (PEP 562): `from cos_model import Scale, PRESETS` reads only the plain
Python `cos_model.scales`, so a run spec can be checked without importing torch or transformers;
`CosConfig`, the model classes and inflation load them. The first of those to load also registers
`CosConfig` with transformers' `AutoConfig` (model type "cos"), and the model class, once loaded, with
`AutoModel`, `AutoModelForCausalLM` and `AutoModelForImageTextToText`: with cos_model installed, a
saved folder loads through the Auto classes (and peft's `AutoPeftModel`) without remote code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "DEFAULT_SCALES": "scales",
    "PRESETS": "scales",
    "Preset": "scales",
    "Scale": "scales",
    "CosConfig": "configuration",
    "inflate_config": "inflate",
    "inflate_state_dict": "inflate",
    "IGNORE_INDEX": "modeling",
    "CosForConditionalGeneration": "modeling",
    "expand_image_tokens": "modeling",
    "ResamplerChain": "resampler",
    "WindowedCrossAttnResampler": "resampler",
}

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

if TYPE_CHECKING:
    from .configuration import CosConfig
    from .inflate import inflate_config, inflate_state_dict
    from .modeling import IGNORE_INDEX, CosForConditionalGeneration, expand_image_tokens
    from .resampler import ResamplerChain, WindowedCrossAttnResampler
    from .scales import DEFAULT_SCALES, PRESETS, Preset, Scale


def _register_auto_config() -> None:
    from transformers import AutoConfig

    from .configuration import CosConfig

    AutoConfig.register(CosConfig.model_type, CosConfig, exist_ok=True)


def _register_auto_models() -> None:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    from .configuration import CosConfig
    from .modeling import CosForConditionalGeneration

    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        auto.register(CosConfig, CosForConditionalGeneration, exist_ok=True)


# Submodules that `import cos_model` used to load eagerly, reachable as attributes as before.
_SUBMODULES = ("configuration", "inflate", "modeling", "resampler", "scales", "vision")


def __getattr__(name: str):
    if name in _SUBMODULES:
        if name != "scales":
            _register_auto_config()
        if name == "modeling":
            _register_auto_models()
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    if _EXPORTS[name] != "scales":
        _register_auto_config()
    if _EXPORTS[name] == "modeling":
        _register_auto_models()
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
