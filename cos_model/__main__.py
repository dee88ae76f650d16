"""`python -m cos_model`: a smoke run of the model on CPU (about 15 s of CPU time on a 2-core machine).

Prints the token table of every inflation preset (computed, not written down), then trains a tiny random
32-token model for a few steps, inflates it to 528 tokens and runs it at the doubled resolution.
"""

from __future__ import annotations

import torch

from . import PRESETS, CosConfig, CosForConditionalGeneration, Scale, inflate_config, inflate_state_dict

SOURCE_SCALES = {
    32: [Scale(window=16, queries_per_window=16), Scale(window=4, queries_per_window=1)],
    80: [Scale(window=16, queries_per_window=16), Scale(window=4, queries_per_window=4)],
}


def tiny_config() -> CosConfig:
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=4,
        image_size=64,
    )
    text = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return CosConfig(
        vision_config=vision, text_config=text, feature_layers=[0, 1], resampler_num_heads=4, image_token_id=63
    )


def batch(config: CosConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    text = torch.randint(1, 60, (4, 6), generator=generator)
    image = torch.full((4, config.num_visual_tokens), config.image_token_id)
    ids = torch.cat([text[:, :2], image, text[:, 2:]], dim=1)
    pixels = torch.randn(4, 3, config.image_size, config.image_size, generator=generator)
    return {"input_ids": ids, "pixel_values": pixels, "labels": ids}


def main() -> None:
    vit_l = CosConfig()
    print(f"{'preset':>9} | {'px':>4} | scales (window: windows x queries) | tokens")
    for name in PRESETS:
        src = CosConfig(scales=SOURCE_SCALES[PRESETS[name].source_tokens])
        dst = inflate_config(src, name)
        scales = ", ".join(f"{s.window}: {s.num_windows(dst.grid_size)}x{s.queries_per_window}" for s in dst.scales)
        print(f"{name:>9} | {dst.image_size:>4} | {scales:<34} | {dst.num_visual_tokens}")
    print(f"pre-training default: {vit_l.num_visual_tokens} tokens at {vit_l.image_size} px")

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = tiny_config()
    model = CosForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fixed = batch(config, generator)
    for step in range(1, 21):
        loss = model(**fixed).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (1, 20):
            print(f"tiny 32-token model, step {step:2d}: loss {loss.item():.3f}")
    big = inflate_config(config, "32to528")
    inflated = CosForConditionalGeneration(big)
    inflated.load_state_dict(inflate_state_dict(model.state_dict(), config, big), strict=True)
    with torch.no_grad():
        out = inflated(**batch(big, generator))
    print(
        f"inflated to {big.num_visual_tokens} tokens at {big.image_size} px: loss {out.loss.item():.3f}, "
        f"logits {tuple(out.logits.shape)}"
    )


if __name__ == "__main__":
    main()
