"""Tiny Chain-of-Sight configs with the real patch-grid geometry (16x16 at the
pre-training resolution, 32x32 after 2x resolution scaling) but hidden sizes of 32."""

from __future__ import annotations

import torch

from cos_model import CosConfig, CosForConditionalGeneration

TINY_VOCAB = 100
TINY_IMAGE_TOKEN = 99


def tiny_config(
    image_size: int = 64,
    scales: list[dict] | None = None,
    feature_layers: tuple[int, ...] = (0, 1),
    num_vision_layers: int = 3,
) -> CosConfig:
    """ViT with 4-px patches (64 px -> 16x16 grid, like 224 px with ViT-L/14), a 2-layer Llama."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_vision_layers,
        num_attention_heads=4,
        patch_size=4,
        image_size=image_size,
    )
    text = dict(
        model_type="llama",
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    extra = {} if scales is None else {"scales": scales}
    return CosConfig(
        vision_config=vision,
        text_config=text,
        feature_layers=list(feature_layers),
        resampler_num_heads=4,
        image_token_id=TINY_IMAGE_TOKEN,
        **extra,
    )


def tiny_model(config: CosConfig, seed: int = 0) -> CosForConditionalGeneration:
    torch.manual_seed(seed)
    return CosForConditionalGeneration(config).eval()


def tiny_inputs(config: CosConfig, num_images: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt per image: 3 text tokens, the image's visual tokens, 4 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    n = config.num_visual_tokens
    rows = []
    for _ in range(num_images):
        text = torch.randint(1, TINY_VOCAB - 1, (7,), generator=generator).tolist()
        rows.append(text[:3] + [config.image_token_id] * n + text[3:])
    pixel_values = torch.randn(num_images, 3, config.image_size, config.image_size, generator=generator)
    return {"input_ids": torch.tensor(rows), "pixel_values": pixel_values}
