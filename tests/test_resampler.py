"""ResamplerChain: batched windowing equals a per-window loop, locality, output order, no sharing."""

import torch

from cos_model.resampler import ResamplerChain, windows_from_grid
from tests.tiny import tiny_config

GRID = 16
WIDTH = 32


def make_chain(seed: int = 0) -> tuple[ResamplerChain, list[torch.Tensor]]:
    config = tiny_config()  # global 16x16 window x 16 queries + 4x4 windows x 1 query, two levels
    torch.manual_seed(seed)
    chain = ResamplerChain(config).eval()
    for p in chain.parameters():  # random everything, so no term is trivially zero
        torch.nn.init.normal_(p, std=0.2)
    features = [torch.randn(2, GRID, GRID, WIDTH) for _ in config.feature_layers]
    return chain, features


def reference_chain(chain: ResamplerChain, features: list[torch.Tensor]) -> torch.Tensor:
    """Naive definition: loop over scales, then windows row-major, slicing each window's features."""
    tokens = []
    for scale in chain.scales:
        w, per_side = scale.window, int(scale.num_windows**0.5)
        for row in range(per_side):
            for col in range(per_side):
                x = scale.queries[row * per_side + col].unsqueeze(0).expand(features[0].shape[0], -1, -1)
                for block, level in zip(scale.levels, features, strict=True):
                    window = level[:, row * w : (row + 1) * w, col * w : (col + 1) * w].reshape(-1, w * w, WIDTH)
                    x = block(x, window)
                tokens.append(x)
    return torch.cat(tokens, dim=1)


def test_emits_32_tokens_for_the_pretraining_chain():
    """The default tiny chain returns (B, 32, vision width)."""
    chain, features = make_chain()
    assert chain(features).shape == (2, 32, WIDTH)


def test_batched_windows_equal_per_window_loop():
    """Batched reshape windowing matches the naive per-window loop to < 1e-5 (fp32)."""
    chain, features = make_chain()
    with torch.no_grad():
        diff = (chain(features) - reference_chain(chain, features)).abs().max().item()
    assert diff < 1e-5


def test_windows_from_grid_is_row_major():
    """Window k of the reshape holds exactly the patches of grid window (k // n, k % n)."""
    grid = torch.arange(GRID * GRID, dtype=torch.float32).reshape(1, GRID, GRID, 1)
    windows = windows_from_grid(grid, 4)
    assert windows.shape == (16, 16, 1)
    assert torch.equal(windows[5, :, 0], grid[0, 4:8, 4:8, 0].reshape(-1))


def test_changing_features_outside_a_window_leaves_its_tokens_unchanged():
    """Perturbing everything outside local window k changes neither that window's token nor ... only it."""
    chain, features = make_chain()
    k_row, k_col = 1, 2
    inside = torch.zeros(GRID, GRID, dtype=torch.bool)
    inside[k_row * 4 : (k_row + 1) * 4, k_col * 4 : (k_col + 1) * 4] = True
    perturbed = [torch.where(inside[None, :, :, None], f, f + torch.randn_like(f)) for f in features]
    with torch.no_grad():
        before, after = chain(features), chain(perturbed)
    k = 16 + k_row * 4 + k_col  # after the 16 global tokens
    assert torch.equal(before[:, k], after[:, k])
    others = [i for i in range(16, 32) if i != k]
    assert (before[:, others] - after[:, others]).abs().amax(dim=-1).min() > 1e-4
    assert (before[:, :16] - after[:, :16]).abs().max() > 1e-4  # the global window sees everything


def test_output_order_is_global_first_then_windows_row_major():
    """With every block an identity, the output lists the global queries, then local window queries row-major."""
    chain, features = make_chain()
    for block in (b for scale in chain.scales for b in scale.levels):
        for linear in (block.attn.out_proj, block.mlp[2]):
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)
    with torch.no_grad():
        out = chain(features)
    global_queries = chain.scales[0].queries.reshape(16, WIDTH)
    local_queries = chain.scales[1].queries.reshape(16, WIDTH)  # window index = row * 4 + col
    assert torch.equal(out[0, :16], global_queries)
    assert torch.equal(out[1, 16:], local_queries)


def test_weights_are_never_shared_between_scales_or_levels():
    """One block per (scale, level): 2 scales x 2 levels = 4 distinct blocks, distinct tensors."""
    chain, _ = make_chain()
    blocks = [b for scale in chain.scales for b in scale.levels]
    assert len(blocks) == 4
    storages = {p.data_ptr() for b in blocks for p in b.parameters()}
    assert len(storages) == sum(1 for b in blocks for _ in b.parameters())


def test_block_has_no_self_attention_and_no_bias_on_q_kv():
    """Cross-attention only: a query's output is unchanged when the other queries change."""
    chain, features = make_chain()
    scale = chain.scales[0]
    assert scale.levels[0].attn.q_proj.bias is None and scale.levels[0].attn.kv_proj.bias is None
    with torch.no_grad():
        before = scale(features)
        scale.queries[0, 1:] += 1.0
        after = scale(features)
    assert torch.equal(before[:, 0], after[:, 0])
