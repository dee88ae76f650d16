"""`CosForConditionalGeneration`: vision tower -> resampler chain -> projector -> causal LM.

Input convention (the LLaVA-HF one): the caller expands each `<image>` placeholder into
`config.num_visual_tokens` copies of `config.image_token_id` (see `expand_image_tokens`); the model
writes the projected visual tokens into exactly those positions, in image order, and raises when their
count disagrees with the images it was given. Labels at visual positions are forced to -100.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import CosConfig
from .resampler import ResamplerChain, VisualProjector, WindowedCrossAttnResampler
from .vision import CosVisionTower

IGNORE_INDEX = -100


class CosPreTrainedModel(PreTrainedModel):
    config: CosConfig
    config_class = CosConfig
    base_model_prefix = "cos"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "ResamplerBlock", "LlamaDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only the bridge is ours: the vision tower and the LLM are sub-models with their own init.
        # A fixed std does not scale with width: at 0.02 a 64-wide bridge's attention output is ~0.03
        # per channel, the learned queries' drift swamps it and the bridge emits a constant prompt.
        std = self.config.bridge_init_std
        if isinstance(module, WindowedCrossAttnResampler):
            init.trunc_normal_(module.queries, std=std)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class CosForConditionalGeneration(CosPreTrainedModel, GenerationMixin):
    """The Chain-of-Sight MLLM. Sub-modules (also the names used for trainability settings):
    `vision_tower`, `resampler`, `projector`, `language_model`."""

    def __init__(self, config: CosConfig):
        super().__init__(config)
        self.vision_tower = CosVisionTower(config.vision_config, num_blocks=max(config.feature_layers) + 1)
        self.resampler = ResamplerChain(config)
        self.projector = VisualProjector(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, num_visual_tokens, LLM width) visual tokens."""
        expected = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (expected, expected):
            raise ValueError(f"pixel_values: expected (B, 3, {expected}, {expected}), got {tuple(pixel_values.shape)}")
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        features = self.vision_tower.features(pixel_values.to(dtype), list(self.config.feature_layers))
        return self.projector(self.resampler(features))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the visual tokens written into the image-token positions.

        A batch may hold no image at all (text-only records). In training, and in any forward of a
        model whose parameters DeepSpeed ZeRO-3 partitions (it gives each a `ds_id`), the vision tower,
        resampler and projector still run, on one blank image whose output is added times zero: their
        parameters are then gathered (and in training their gradients reduced) collectively, so a rank
        that skipped them would hang the ranks whose batches do have images (ranks generating different
        records, or training on different micro-batches). The result and the gradients are those of the
        text alone (the bridge's gradient is exactly zero). A plain model in eval mode, e.g. one
        loaded with `from_pretrained`, runs the text alone."""
        is_image = input_ids == self.config.image_token_id
        num_image_tokens = int(is_image.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_image_tokens != num_images * self.config.num_visual_tokens:
            raise ValueError(
                f"image tokens and images disagree: {num_image_tokens} image tokens in input_ids but "
                f"{num_images} images x {self.config.num_visual_tokens} visual tokens per image"
            )
        # The image token may lie outside the LLM vocabulary; its embedding is overwritten anyway.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if num_images:
            visual = self.get_image_features(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        elif self.training or hasattr(next(self.vision_tower.parameters()), "ds_id"):
            size = self.config.image_size
            blank = torch.zeros(1, 3, size, size, device=embeds.device)
            embeds = embeds + self.get_image_features(blank).to(embeds.dtype).sum() * 0.0
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # peft's wrappers pass `inputs_embeds=None` along; the visual tokens need the ids.
        if inputs_embeds is not None:
            raise ValueError("pass input_ids (and pixel_values), not inputs_embeds: image positions come from the ids")
        inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if labels is not None:
            labels = labels.masked_fill(input_ids == self.config.image_token_id, IGNORE_INDEX)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Greedy/sampled decoding from a (left-padded) prompt with the LLM's `generate` (any of its
        kwargs). Like transformers' decoder-only models, returns the prompt followed by the new tokens
        (`[:, input_ids.shape[1]:]` are the new ones), also as `.sequences` of a dict output."""
        inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Loaded through transformers' Auto classes, the model has a `generation_config` of its own
        # (generation_config.json, edited by users): it, not the LLM's default, is the one to honour. It
        # goes in as one config with this call's settings applied: transformers deprecates (and warns on
        # every call about) a `generation_config` passed beside generation settings.
        own = getattr(self, "generation_config", None)
        if own is not None and "generation_config" not in generate_kwargs:
            config = copy.deepcopy(own)
            generate_kwargs = {**config.update(**generate_kwargs), "generation_config": config}
        out = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out


def expand_image_tokens(token_ids: list[int], image_token_id: int, num_visual_tokens: int) -> list[int]:
    """Replace each single `<image>` placeholder id by `num_visual_tokens` copies of it."""
    expanded: list[int] = []
    for token in token_ids:
        expanded.extend([token] * num_visual_tokens if token == image_token_id else [token])
    return expanded


__all__ = ["CosForConditionalGeneration", "CosPreTrainedModel", "IGNORE_INDEX", "expand_image_tokens"]
