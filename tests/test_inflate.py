"""Token scaling and parameter inflation (docs/design.md §3)."""

import copy

import pytest
import torch

from cos_model import CosForConditionalGeneration, inflate_config, inflate_state_dict
from tests.tiny import tiny_config, tiny_inputs, tiny_model

SCALES_32 = [{"window": 16, "queries_per_window": 16}, {"window": 4, "queries_per_window": 1}]
SCALES_80 = [{"window": 16, "queries_per_window": 16}, {"window": 4, "queries_per_window": 4}]

# The token table of docs/design.md §3: (source chain, preset, [(window, windows, queries per window)], tokens)
TOKEN_TABLE = [
    (SCALES_32, "32to80", [(32, 1, 16), (4, 64, 1)], 80),
    (SCALES_32, "32to336", [(32, 1, 16), (16, 4, 16), (2, 256, 1)], 336),
    (SCALES_32, "32to528", [(32, 1, 16), (8, 16, 16), (2, 256, 1)], 528),
    (SCALES_80, "80to336", [(32, 1, 16), (16, 4, 16), (4, 64, 4)], 336),
    (SCALES_80, "80to1296", [(32, 1, 16), (8, 16, 16), (2, 256, 4)], 1296),
]


@pytest.mark.parametrize("src_scales, preset, expected_scales, tokens", TOKEN_TABLE, ids=[r[1] for r in TOKEN_TABLE])
def test_token_table(src_scales, preset, expected_scales, tokens):
    """Every row of the token table (docs/design.md §3) comes out exactly, at twice the resolution (32x32 grid)."""
    src = tiny_config(scales=src_scales)
    dst = inflate_config(src, preset)
    assert dst.image_size == 2 * src.image_size and dst.grid_size == 32
    assert [(s.window, s.num_windows(32), s.queries_per_window) for s in dst.scales] == expected_scales
    assert dst.num_visual_tokens == tokens


def test_token_table_on_the_real_vit_l14_geometry():
    """On the default config, 32to528 yields 528 tokens at 448 px."""
    from cos_model import CosConfig

    dst = inflate_config(CosConfig(), "32to528")
    assert (dst.image_size, dst.num_visual_tokens) == (448, 528)


def test_proportional_windows_add_no_tokens():
    """Windows kept proportional to the image (global 32, local 8 at 448 px): 32 -> 32 and 80 -> 80."""
    for src_scales, q, tokens in ((SCALES_32, 1, 32), (SCALES_80, 4, 80)):
        plan = {
            "image_size": 128,
            "scales": [{"window": 32, "queries_per_window": 16}, {"window": 8, "queries_per_window": q}],
        }
        assert inflate_config(tiny_config(scales=src_scales), plan).num_visual_tokens == tokens


@pytest.fixture(scope="module")
def inflated():
    src = tiny_config()
    model = tiny_model(src)
    for p in model.resampler.parameters():  # distinct values everywhere, so copies are traceable
        torch.nn.init.normal_(p, std=0.5)
    dst = inflate_config(src, "32to528")
    state = model.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    out = inflate_state_dict(state, src, dst)
    return src, dst, state, snapshot, out


def test_every_destination_key_has_the_right_shape(inflated):
    """The inflated dict has exactly the destination model's keys and shapes."""
    _, dst, _, _, out = inflated
    expected = CosForConditionalGeneration(dst).state_dict()
    assert set(out) == set(expected)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_every_source_key_is_used(inflated):
    """Each source key reappears: unchanged keys verbatim, scale keys under each child scale."""
    _, _, state, _, out = inflated
    children_of = {0: [0, 1], 1: [2]}
    for key in state:
        if key.startswith("resampler.scales."):
            index, rest = key.split(".", 3)[2], key.split(".", 3)[3]
            assert all(f"resampler.scales.{j}.{rest}" in out for j in children_of[int(index)])
        else:
            assert key in out


def test_new_scales_copy_their_parents_weights(inflated):
    """Every block weight of each destination scale equals its parent scale's."""
    _, dst, state, _, out = inflated
    for j, scale in enumerate(dst.scales):
        prefix = f"resampler.scales.{scale.parent}."
        for key, value in state.items():
            if key.startswith(prefix) and not key.endswith("queries"):
                assert torch.equal(out[f"resampler.scales.{j}." + key[len(prefix) :]], value)


def test_child_windows_start_with_their_parent_windows_queries(inflated):
    """Window (a, b) of a child scale holds the queries of the parent window containing it."""
    src, dst, state, _, out = inflated
    for j, child in enumerate(dst.scales):
        parent = src.scales[child.parent]
        child_side, parent_side = child.windows_per_side(dst.grid_size), parent.windows_per_side(src.grid_size)
        ratio = child_side // parent_side
        parent_q = state[f"resampler.scales.{child.parent}.queries"]
        child_q = out[f"resampler.scales.{j}.queries"]
        for a in range(child_side):
            for b in range(child_side):
                p = (a // ratio) * parent_side + b // ratio
                assert torch.equal(child_q[a * child_side + b], parent_q[p])


def test_position_embedding_is_resized_to_32x32(inflated):
    """The position table grows to 32*32+1 rows with the CLS row kept."""
    _, _, state, _, out = inflated
    key = "vision_tower.embeddings.position_embedding.weight"
    assert out[key].shape[0] == 32 * 32 + 1
    assert torch.equal(out[key][0], state[key][0])


def test_input_state_dict_is_not_mutated(inflated):
    """inflate_state_dict leaves its input's keys and values untouched."""
    _, _, state, snapshot, _ = inflated
    assert set(state) == set(snapshot)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)


def test_inflated_model_runs_at_448px(inflated):
    """The inflated weights load strictly and a forward pass at the doubled resolution works."""
    _, dst, _, _, out = inflated
    model = CosForConditionalGeneration(dst).eval()
    model.load_state_dict(out, strict=True)
    inputs = tiny_inputs(dst)
    assert inputs["pixel_values"].shape[-1] == 128
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 7 + 528, 100) and torch.isfinite(logits).all()


def test_identity_plan_reproduces_logits_exactly():
    """Same scales and resolution: the inflated model's logits equal the original's bit for bit."""
    src = tiny_config()
    model = tiny_model(src)
    dst = inflate_config(src, {"image_size": src.image_size, "scales": copy.deepcopy(src.scales)})
    clone = CosForConditionalGeneration(dst).eval()
    clone.load_state_dict(inflate_state_dict(model.state_dict(), src, dst), strict=True)
    inputs = tiny_inputs(src, num_images=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, clone(**inputs).logits)


@pytest.mark.parametrize(
    "src_scales, plan, message",
    [
        (SCALES_32, "32to9999", "unknown preset"),
        (SCALES_80, "32to528", "needs a 32-token source"),
        (SCALES_32, {"image_size": 130, "scales": SCALES_32}, "plan.image_size"),
        (
            SCALES_32,
            {"image_size": 128, "scales": [{"window": 5, "queries_per_window": 16}]},
            r"plan.scales\[0\].window",
        ),
        # queries per window cannot change
        (
            SCALES_32,
            {
                "image_size": 128,
                "scales": [
                    {"window": 32, "queries_per_window": 16},
                    {"window": 2, "queries_per_window": 2, "parent": 1},
                ],
            },
            "queries per window",
        ),
        # 3x3 child windows do not nest inside the parent's 4x4 windows
        (
            SCALES_32,
            {
                "image_size": 96,
                "scales": [
                    {"window": 24, "queries_per_window": 16},
                    {"window": 8, "queries_per_window": 1, "parent": 1},
                ],
            },
            "inside",
        ),
        # the local scale would be dropped
        (SCALES_32, {"image_size": 128, "scales": [{"window": 32, "queries_per_window": 16}]}, "not inflated"),
        # no parent with 3 queries per window
        (SCALES_32, {"image_size": 128, "scales": [{"window": 32, "queries_per_window": 3}]}, "no source scale"),
        (
            SCALES_32,
            {
                "image_size": 128,
                "scales": [
                    {"window": 32, "queries_per_window": 16, "parent": 7},
                    {"window": 4, "queries_per_window": 1},
                ],
            },
            "not a source scale",
        ),
        (SCALES_32, {"scales": SCALES_32}, "expected a preset name"),
    ],
)
def test_impossible_plans_raise(src_scales, plan, message):
    """Plans that cannot be realised raise ValueError with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        inflate_config(tiny_config(scales=src_scales), plan)


def test_state_dict_that_does_not_match_the_source_raises():
    """A state dict naming a scale the source config lacks is rejected."""
    src = tiny_config()
    dst = inflate_config(src, "32to80")
    state = tiny_model(src).state_dict()
    state["resampler.scales.5.queries"] = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match="scale 5"):
        inflate_state_dict(state, src, dst)
