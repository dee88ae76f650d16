"""The Chain-of-Sight resampler chain: multi-scale windowed cross-attention from learned queries to ViT
features, then LN + Linear into the LLM's width.

Shapes (B images, a G x G patch grid, vision width C, L feature levels):

    features: L tensors (B, G, G, C)
    scale s (window w, q queries per window, nW = (G / w)^2 windows):
        windows  = features reshaped to (B * nW, w * w, C)      # batched; no masks, no loop over windows
        queries  = learned (nW, q, C), broadcast to (B * nW, q, C)
        queries  = block[s, level 0](queries, windows of level 0)
        queries  = block[s, level 1](queries, windows of level 1) ...
        tokens_s = (B, nW * q, C), windows row-major, each window's queries contiguous
    output = LN + Linear(concat(tokens_s for s in scales, global first)) -> (B, sum_s nW_s * q_s, D_llm)

A block never lets queries see each other (no self-attention) and carries no positional embedding: a
query's position is the window it owns. Weights are never shared across scales or levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import CosConfig, Scale


def windows_from_grid(features: torch.Tensor, window: int) -> torch.Tensor:
    """(B, G, G, C) -> (B * nW, window * window, C), windows row-major, patches row-major inside."""
    batch, grid, _, width = features.shape
    per_side = grid // window
    x = features.reshape(batch, per_side, window, per_side, window, width)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, row, col, y, x, C)
    return x.reshape(batch * per_side * per_side, window * window, width)


class WindowCrossAttention(nn.Module):
    """Pre-LN cross-attention of queries to the features of their own window (no bias on q/kv)."""

    def __init__(self, width: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.norm_queries = nn.LayerNorm(width, eps=eps)
        self.norm_features = nn.LayerNorm(width, eps=eps)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.out_proj = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        # queries (N, q, C), features (N, k, C); N = images x windows.
        n, num_queries, width = queries.shape
        head_dim = width // self.num_heads
        q = self.q_proj(self.norm_queries(queries))
        k, v = self.kv_proj(self.norm_features(features)).chunk(2, dim=-1)
        q, k, v = (t.reshape(n, -1, self.num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, num_queries, width))


class ResamplerBlock(nn.Module):
    """queries += CrossAttn(LN(queries), LN(window features)); queries += MLP(LN(queries))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, eps: float = 1e-6):
        super().__init__()
        self.attn = WindowCrossAttention(width, num_heads, eps)
        self.norm_mlp = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn(queries, features)
        return queries + self.mlp(self.norm_mlp(queries))


class WindowedCrossAttnResampler(nn.Module):
    """One scale: its own queries per window and one block per feature level, applied shallow to deep."""

    def __init__(self, scale: Scale, grid: int, width: int, num_levels: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.window, self.queries_per_window = scale.window, scale.queries_per_window
        self.num_windows, self.num_tokens = scale.num_windows(grid), scale.num_tokens(grid)
        self.queries = nn.Parameter(torch.zeros(self.num_windows, self.queries_per_window, width))
        self.levels = nn.ModuleList(ResamplerBlock(width, num_heads, mlp_ratio) for _ in range(num_levels))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        batch = features[0].shape[0]
        width = self.queries.shape[-1]
        x = self.queries.unsqueeze(0).expand(batch, -1, -1, -1)
        x = x.reshape(batch * self.num_windows, self.queries_per_window, width)
        for block, level in zip(self.levels, features, strict=True):
            x = block(x, windows_from_grid(level, self.window))
        return x.reshape(batch, self.num_tokens, width)


class ResamplerChain(nn.Module):
    """All scales of the chain, global first; returns (B, num_visual_tokens, vision width)."""

    def __init__(self, config: CosConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.scales = nn.ModuleList(
            WindowedCrossAttnResampler(
                scale,
                config.grid_size,
                width,
                num_levels=len(config.feature_layers),
                num_heads=config.resampler_num_heads,
                mlp_ratio=config.resampler_mlp_ratio,
            )
            for scale in config.scales
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        tokens = []
        for scale in self.scales:
            tokens.append(scale(features))
        return torch.cat(tokens, dim=1)


class VisualProjector(nn.Module):
    """LN + Linear from the vision width to the LLM width."""

    def __init__(self, vision_width: int, text_width: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width, eps=eps)
        self.linear = nn.Linear(vision_width, text_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens))


__all__ = [
    "ResamplerBlock",
    "ResamplerChain",
    "VisualProjector",
    "WindowCrossAttention",
    "WindowedCrossAttnResampler",
    "windows_from_grid",
]
