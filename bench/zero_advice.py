"""`cosctl plan`'s ZeRO-2 / ZeRO-3 advice for the paper-scale recipes (recipes/vicuna7b and recipes/vicuna13b,
pre-training and fine-tuning) at a world size, in one table: each row is `cosctl.plan.summary.build_plan` of a
recipe, the same numbers `cosctl plan RECIPE --world-size N` prints.

The model folders are not needed: the script writes config.json-only folders as users have them (CLIP
ViT-L/14, Vicuna-7B and Vicuna-13B geometries, by transformers' own config classes) and the 528-token
inflated config the fine-tuning recipes start from, and points the recipes at them with `--set`
overrides. No data is read: the micro-batch is the recipe's (`auto`: one per step assumed).

    python bench/zero_advice.py                          # 8 x 8 ranks, 100 Gb/s per rank between nodes
    python bench/zero_advice.py --world-size 8           # one node
    python bench/zero_advice.py --bandwidth-gbps 400 --json advice.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common

# (recipe folder, LLM width, layers, MLP width): the Vicuna v1.5 geometries (32 or 40 heads of 128).
SIZES = {"vicuna7b": (4096, 32, 11008), "vicuna13b": (5120, 40, 13824)}
STAGES = ("pretrain", "finetune")


def write_folders(root: Path, width: int, layers: int, intermediate: int) -> dict[str, list[str]]:
    """config.json-only folders and the overrides that point a recipe's stages at them."""
    from transformers import CLIPConfig, LlamaConfig

    from cos_model import inflate_config
    from cosctl.spec.specs import load_spec
    from cosctl.stages.pretrain import pretrain_config

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
    CLIPConfig(vision_config={**vision, "patch_size": 14, "image_size": 224}).save_pretrained(root / "clip")
    LlamaConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=width // 128,
        num_key_value_heads=width // 128,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ).save_pretrained(root / "llm")
    pretrain = [f"model.vision.path={root / 'clip'}", f"model.text.path={root / 'llm'}"]
    pretrain.append(f"model.tokenizer={root / 'llm'}")
    spec = load_spec(common.REPO / "recipes/vicuna7b/pretrain.yaml", [*pretrain, f"run.output={root / 'out'}"])
    inflate_config(pretrain_config(spec, 32001, 32000), "32to528").save_pretrained(root / "inflated")
    return {"pretrain": pretrain, "finetune": [f"model.source={root / 'inflated'}"]}


def advice_row(recipe: str, stage: str, plan: dict) -> dict:
    comm = plan["communication"]
    zero3, zero2 = comm["stages"]["zero3"], comm["stages"]["zero2"]
    return {
        "recipe": f"{recipe}/{stage}",
        "trainable_params": plan["trainable_params"],
        "total_params": plan["total_params"],
        "micro_batches": comm["micro_batches_per_step"],
        "zero3_all_gather": zero3["all_gather"],
        "zero3_backward_all_gather": zero3["backward_all_gather"],
        "zero3_once_per_micro_batch": (
            comm["micro_batches_per_step"] * comm["params"]["total"] * comm["bytes_per_param"]
        ),
        "zero3_per_rank": zero3["per_rank"],
        "zero3_s": zero3["seconds"],
        "zero2_per_rank": zero2["per_rank"],
        "zero2_s": zero2["seconds"],
        "zero2_gib": sum(zero2["memory_gib"].values()),
        "compute_s": comm["compute_s"],
        "recommended": comm["recommended"],
        "reason": comm["reason"],
    }


def format_table(rows: list[dict]) -> str:
    header = [
        "recipe",
        "trainable / total",
        "ub",
        "ZeRO-3 all-gather GB (again for backward)",
        "x once per ub",
        "ZeRO-3 GB/rank, s",
        "ZeRO-2 GB/rank, s",
        "compute s",
        "ZeRO-2 GiB/rank",
        "advice",
    ]
    lines = [
        [
            row["recipe"],
            f"{row['trainable_params'] / 1e6:.0f}M / {row['total_params'] / 1e9:.2f}B",
            row["micro_batches"],
            f"{row['zero3_all_gather'] / 1e9:.1f} ({row['zero3_backward_all_gather'] / 1e9:.1f})",
            f"{row['zero3_all_gather'] / row['zero3_once_per_micro_batch']:.2f}",
            f"{row['zero3_per_rank'] / 1e9:.1f}, {row['zero3_s']:.3g}",
            f"{row['zero2_per_rank'] / 1e9:.2f}, {row['zero2_s']:.3g}",
            common.cell(row["compute_s"], ".3g"),
            f"{row['zero2_gib']:.1f}",
            "ZeRO-2" if row["recommended"] == "zero2" else "ZeRO-3",
        ]
        for row in rows
    ]
    return common.markdown_table(header, lines, "lrrrrrrrrl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=64)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--bandwidth-gbps", type=float, default=None, help="per-rank inter-node link (plan default)")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="per-rank peak for the compute time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from cosctl.plan.comm import DEFAULT_INTER_NODE_GBPS
    from cosctl.plan.summary import build_plan
    from cosctl.spec.specs import load_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, geometry in SIZES.items():
            root = Path(tmp) / recipe
            sets = write_folders(root, *geometry)
            for stage in STAGES:
                path = common.REPO / "recipes" / recipe / f"{stage}.yaml"
                spec = load_spec(path, [*sets[stage], f"run.output={root / 'out'}"])
                plan = build_plan(
                    spec,
                    args.world_size,
                    "cuda",
                    peak=args.peak_tflops,
                    bandwidth_gbps=args.bandwidth_gbps or DEFAULT_INTER_NODE_GBPS,
                    ranks_per_node=args.ranks_per_node,
                )
                rows.append(advice_row(recipe, stage, plan))
    print(format_table(rows))
    for row in rows:
        print(f"{row['recipe']}: {row['reason']}")
    common.write_report(args.json, {"command": " ".join(sys.argv), "world_size": args.world_size, "rows": rows})


if __name__ == "__main__":
    main()
