"""The rows of the stage-speed table, which bench/stage_speed.py (the product) and bench/engine_step.py
(the engine alone) both time: the model shapes, the visual-token layouts at each resolution, the options
that pick them, a row's pretrain spec, its synthetic data set, and the table with its x336 ratios.

Rows are TOKENS/RESOLUTION: visual tokens, and the resolution named as ViT-L/14 has it (224 px = a 16x16
patch grid, 336 = 24x24, 448 = 32x32); the other shapes keep the grid at their own patch size (the tiny
shape's 224 is 64 px). A bare TOKENS takes its default resolution (32 at 224, 576 at 336, the rest at
448). Layouts (windows in patches; docs/design.md §3): the 32-token chain runs at the pre-training grid
of 16x16 patches; 80/336/528 at 448 are the scale lists that `cos_model.inflate_config` makes from it at
twice the resolution (32x32 patches); at 224 they are the same lists with every window halved, so the
token count is the same at a quarter of the ViT's work:

    32   16x16  global 16 -> 1x16 + local 4 -> 16x1                      (the pre-training chain)
    80   32x32  "32to80":  32 -> 1x16 + 4 -> 64x1                        (16x16: 16 -> 1x16 + 2 -> 64x1)
    336  32x32  "32to336": 32 -> 1x16 + 16 -> 4x16 + 2 -> 256x1          (16x16: 16, 8, 1)
    528  32x32  "32to528": 32 -> 1x16 + 8 -> 16x16 + 2 -> 256x1          (16x16: 16, 4, 1)
    576  24x24  one scale, window 1 -> 576x1 (336 px with ViT-L/14, 96 px tiny): one query per patch,
                a plain LLaVA-like 576-token baseline

Shapes (random weights; the ViT is frozen everywhere):
    tiny  ViT width 64, 3 blocks, patch 4 + LLaMA width 128, 2 layers, vocab 512 (CPU/CI-sized); LLM trained
    1b    CLIP ViT-L/14 + TinyLlama-1.1B shape (2048 wide, 22 layers, 32/4 heads, vocab 32000); LLM trained
    7b    CLIP ViT-L/14 + Vicuna-7B shape (vocab 32000); LLM frozen, only the bridge trains (the paper's
          pre-training)
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import common

from cos_model import DEFAULT_SCALES, PRESETS
from cos_model.configuration import VIT_L14_224
from cosctl.plan.flops import ASSUMED_MFU, peak_tflops, predict_step_seconds
from cosctl.spec.specs import PretrainSpec, apply_overrides, parse_spec

REFERENCE_TOKENS = 336  # the x336 column's reference
BASE_GRID = 16  # patches per side of the 32-token pre-training chain
# Token count -> the preset that inflates the 32-token chain to it (on the doubled grid).
INFLATE_PRESETS = {
    sum(scale.num_tokens(2 * BASE_GRID) for scale in preset.scales): name
    for name, preset in PRESETS.items()
    if preset.source_tokens == 32
}
LLAVA_TOKENS, LLAVA_GRID = 576, 24
# Resolutions as ViT-L/14 has them -> patch grids (every shape keeps the grid at its own patch size).
RESOLUTION_GRIDS = {224: 16, 336: 24, 448: 32}
DEFAULT_ROWS = "32/224,336/224,336/448,528/448"
SUPPORTED_ROWS = [(32, 224), *((t, r) for r in (224, 448) for t in INFLATE_PRESETS), (LLAVA_TOKENS, 336)]
SUPPORTED_TOKENS = (32, *INFLATE_PRESETS, LLAVA_TOKENS)
VIT_L14 = {k: v for k, v in VIT_L14_224.items() if k != "image_size"}  # the row sets the resolution


@dataclass(frozen=True)
class Shape:
    """A model shape and its benchmark defaults."""

    vision: dict  # CLIPVisionConfig fields, without image_size
    text: dict  # causal-LM config fields (random init)
    feature_layers: tuple[int, ...]
    resampler_num_heads: int
    tokens_per_micro_batch: int
    llm_trainable: bool
    warmup: int
    steps: int

    @property
    def vocab_size(self) -> int:
        return self.text["vocab_size"]


def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, positions: int) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": positions,
    }


TINY_VIT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
SHAPES = {
    "tiny": Shape(
        vision={**TINY_VIT, "patch_size": 4},
        text=_llama(512, 128, 256, 2, 4, 4, 1024),
        feature_layers=(1, 2),
        resampler_num_heads=4,
        tokens_per_micro_batch=2048,
        llm_trainable=True,
        warmup=3,
        steps=10,
    ),
    "1b": Shape(  # TinyLlama-1.1B: ~192 samples per micro-batch at 32 + 64 tokens
        vision=VIT_L14,
        text={**_llama(32000, 2048, 5632, 22, 32, 4, 2048), "rms_norm_eps": 1e-5},
        feature_layers=(15, 22),
        resampler_num_heads=16,
        tokens_per_micro_batch=192 * 96,
        llm_trainable=True,
        warmup=3,
        steps=10,
    ),
    "7b": Shape(  # Vicuna-7B: the paper's micro-batches 64 / 16 / 10; this budget gives 64 / 15 / 10
        vision=VIT_L14,
        text={**_llama(32000, 4096, 11008, 32, 32, 32, 4096), "rms_norm_eps": 1e-5},
        feature_layers=(15, 22),
        resampler_num_heads=16,
        tokens_per_micro_batch=64 * 96,
        llm_trainable=False,
        warmup=2,
        steps=6,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Layouts and specs


def default_grid(num_tokens: int) -> int:
    """The patch grid a token count runs at when no resolution is given."""
    return {32: BASE_GRID, LLAVA_TOKENS: LLAVA_GRID}.get(num_tokens, 2 * BASE_GRID)


def resolution_of(grid: int) -> int | None:
    return {g: r for r, g in RESOLUTION_GRIDS.items()}.get(grid)


def layout(shape: Shape, num_tokens: int, grid: int | None = None) -> tuple[int, list[dict]]:
    """(image size in px, scale list) of a row at a patch grid (default: the token count's); see the
    module docstring."""
    patch = shape.vision["patch_size"]
    grid = default_grid(num_tokens) if grid is None else grid
    if num_tokens == LLAVA_TOKENS and grid == LLAVA_GRID:
        return LLAVA_GRID * patch, [{"window": 1, "queries_per_window": 1}]
    if num_tokens == 32 and grid == BASE_GRID:
        return BASE_GRID * patch, [s.to_dict() for s in DEFAULT_SCALES]
    if num_tokens in INFLATE_PRESETS and grid == 2 * BASE_GRID:  # what inflate_config makes of the 32 chain
        return 2 * BASE_GRID * patch, [s.to_dict() for s in PRESETS[INFLATE_PRESETS[num_tokens]].scales]
    if num_tokens in INFLATE_PRESETS and grid == BASE_GRID:  # the preset with every window halved
        scales = PRESETS[INFLATE_PRESETS[num_tokens]].scales
        return BASE_GRID * patch, [
            {"window": s.window // 2, "queries_per_window": s.queries_per_window} for s in scales
        ]
    resolution = resolution_of(grid) or f"a {grid}x{grid} grid"
    supported = ", ".join(f"{t}/{r}" for t, r in SUPPORTED_ROWS)
    raise ValueError(f"--rows: no layout for {num_tokens} tokens at {resolution}; choose from {supported}")


def row_name(args: argparse.Namespace, num_tokens: int, image_size: int) -> str:
    return f"stage-speed-{args.shape}-{num_tokens}-{image_size}px"


def spec_dict(shape: Shape, num_tokens: int, grid: int | None, args: argparse.Namespace) -> dict:
    """A row's pretrain spec as YAML would give it, before the `--set` overrides: random towers of the
    shape, the row's scales and image size, the token budget; paths are placeholders."""
    image_size, scales = layout(shape, num_tokens, grid)
    trainable = ["resampler", "projector"] + (["language_model"] if args.llm_trainable else [])
    return {
        "stage": "pretrain",
        "run": {"name": row_name(args, num_tokens, image_size), "output": "bench-unused", "seed": 0},
        "model": {
            "vision": {"config": dict(shape.vision)},
            "text": {"config": dict(shape.text)},
            "tokenizer": "unused-synthetic-token-ids",
            "image_size": image_size,
            "feature_layers": list(shape.feature_layers),
            "scales": scales,
            "resampler_num_heads": shape.resampler_num_heads,
            "trainable": trainable,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "data": {"root": "unused", "max_text_tokens": args.text_tokens},
        # A small lr: random bf16 weights should not diverge within the few steps timed.
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "num_steps": args.warmup + args.steps},
        "batch": {"samples_per_step": 1 << 20, "tokens_per_micro_batch": args.tokens_per_micro_batch},
        "deepspeed": {"template": "zero3"},
    }


def row_spec(shape: Shape, num_tokens: int, args: argparse.Namespace, grid: int | None = None) -> PretrainSpec:
    raw = apply_overrides(spec_dict(shape, num_tokens, grid, args), args.overrides)
    return parse_spec(raw, source=f"<{raw['run']['name']}>")


def prediction(samples_per_step: float, flops_per_sample: float, peak: float | None, world_size: int = 1) -> dict:
    """What `cosctl plan` predicts for the step: its model FLOPs at peak x `ASSUMED_MFU`."""
    seconds = predict_step_seconds(samples_per_step * flops_per_sample, peak, world_size=world_size)
    return {"predicted_s_per_step": seconds, "predicted_samples_per_s": samples_per_step / seconds if seconds else None}


# ---------------------------------------------------------------------------------------------------
# Command line


def token_list(text: str) -> list[int]:
    tokens = [int(part) for part in text.split(",") if part.strip()]
    unknown = sorted(set(tokens) - set(SUPPORTED_TOKENS))
    if not tokens or unknown:
        raise argparse.ArgumentTypeError(f"token counts must come from {list(SUPPORTED_TOKENS)}, got {text!r}")
    return tokens


def row_list(text: str) -> list[tuple[int, int]]:
    """TOKENS/RESOLUTION items -> (tokens, patch grid); a bare TOKENS takes its default resolution."""
    rows = []
    for part in (p.strip() for p in text.split(",")):
        tokens, slash, resolution = part.partition("/")
        if not tokens.isdigit() or (slash and not (resolution.isdigit() and int(resolution) in RESOLUTION_GRIDS)):
            raise argparse.ArgumentTypeError(f"rows are TOKENS/RESOLUTION (resolution 224, 336 or 448), got {part!r}")
        rows.append((int(tokens), RESOLUTION_GRIDS[int(resolution)] if slash else default_grid(int(tokens))))
    return rows


def budget_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or auto, got {text!r}")
    return int(text)


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and size the rows, shared by the scripts that time them."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rows", type=row_list, help=f"TOKENS/RESOLUTION rows, in this order (default {DEFAULT_ROWS})")
    parser.add_argument(
        "--tokens", type=token_list, help="visual-token counts at their default resolutions, instead of --rows"
    )
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample a step is sized for")
    parser.add_argument(
        "--tokens-per-micro-batch",
        type=budget_arg,
        help="token budget per micro-batch, or auto (default per shape: tiny 2048, 1b 18432, 7b 6144)",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default per shape)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default per shape)")
    trains = parser.add_mutually_exclusive_group()
    trains.add_argument("--llm-trainable", dest="llm_trainable", action="store_true", help="default for tiny and 1b")
    trains.add_argument("--llm-frozen", dest="llm_trainable", action="store_false", help="default for 7b (the paper)")
    parser.set_defaults(llm_trainable=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU, HFU and predictions")
    parser.add_argument("--measure-peak", action="store_true", help="measure the matmul peak first and use it")
    common.add_set_argument(parser, "every row's spec")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="only print the table of an earlier --json file")


def finish_row_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The shape's defaults filled in, --rows or --tokens resolved to (tokens, grid) pairs, every row's
    layout checked."""
    shape = SHAPES[args.shape]
    for name in ("tokens_per_micro_batch", "warmup", "steps", "llm_trainable"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    if args.steps < 1 or args.warmup < 0 or args.text_tokens < 1:
        parser.error("--steps must be >= 1, --warmup >= 0 and --text-tokens >= 1")
    if args.rows is not None and args.tokens is not None:
        parser.error("give --rows or --tokens, not both")
    if args.rows is None:
        args.rows = [(t, default_grid(t)) for t in args.tokens] if args.tokens is not None else row_list(DEFAULT_ROWS)
    for tokens, grid in args.rows:
        try:
            layout(shape, tokens, grid)
        except ValueError as err:
            parser.error(str(err))
    return args


def resolve_peak(args: argparse.Namespace, device) -> tuple[float | None, str]:
    """`--peak-tflops`, else a measured matmul peak with `--measure-peak`, else the card's datasheet bf16
    peak or COSCTL_PEAK_TFLOPS (none on CPU); and where it came from."""
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if args.measure_peak:
        return common.measure_matmul_tflops(device), "measured matmul"
    peak = peak_tflops(device)
    return peak, ("datasheet or COSCTL_PEAK_TFLOPS" if peak else "unknown")


# ---------------------------------------------------------------------------------------------------
# The table


# (title, row key, format) of the table's columns; see bench/README.md for what each means.
COLUMNS = [
    ("tokens", "tokens", "d"),
    ("px", "image_size", "d"),
    ("text", "text_tokens", ".3g"),
    ("samples/step", "samples_per_step", ".4g"),
    ("micro", "micro_batch", ".4g"),
    ("ub", "micro_batches", ".3g"),
    ("s/step", "s_per_step", ".4g"),
    ("samples/s", "samples_per_s", ".4g"),
    ("tokens/s", "tokens_per_s", ".4g"),
    ("TFLOP/s", "tflops", ".3g"),
    ("MFU", "mfu", ".1%"),
    ("HFU", "hfu", ".1%"),
    ("peak GiB", "peak_mem_gib", ".2f"),
    ("data s", "data_s_per_step", ".3g"),
    ("pred s/step", "predicted_s_per_step", ".3g"),
    ("x336", "ratio_vs_336", ".2f"),
]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["tokens"], row.get("image_size", "-"), row["error"], *[""] * (len(columns) - 3)])
        else:
            lines.append([common.cell(row.get(key), spec) for _, key, spec in columns])
    return common.markdown_table([title for title, _, _ in columns], lines, "r" * len(columns))


def update_ratios(report: dict) -> None:
    """Each row's samples/s over the 336-token row's at the highest resolution (`ratio_vs_336`), and
    32 vs 336 tokens at each resolution with a 336 row, measured and by the FLOP model (which needs no
    peak: samples/s at a fixed MFU is peak x MFU / FLOPs)."""
    done = [row for row in report["rows"] if "error" not in row]
    references = sorted((r for r in done if r["tokens"] == REFERENCE_TOKENS), key=lambda r: r["image_size"])
    for row in done:
        row["ratio_vs_336"] = row["samples_per_s"] / references[-1]["samples_per_s"] if references else None
    base = next((row for row in done if row["tokens"] == 32), None)
    report["ratios"] = {
        str(ref.get("resolution") or ref["image_size"]): {
            "measured": base["samples_per_s"] / ref["samples_per_s"],
            "flop_model": ref["flops_per_sample"] / base["flops_per_sample"],
        }
        for ref in (references if base else [])
    }
    top = list(report["ratios"].values())[-1] if report["ratios"] else None  # the highest resolution's
    report["ratio_32_vs_336"] = top["measured"] if top else None
    report["flop_ratio_32_vs_336"] = top["flop_model"] if top else None


def print_report(report: dict, columns: list[tuple[str, str, str]] = COLUMNS) -> None:
    """The table and the 32-vs-336 ratios (recomputed from the rows, so an older file prints too)."""
    update_ratios(report)
    print(format_table(report["rows"], columns))
    for resolution, pair in report["ratios"].items():
        print(
            f"samples/s 32 vs 336 at {resolution}: {common.cell(pair['measured'], '.2f')}x measured, "
            f"{common.cell(pair['flop_model'], '.2f')}x by the FLOP model"
        )


def new_report(args: argparse.Namespace, device, peak: float | None, peak_source: str, **settings) -> dict:
    """A report with no rows yet: the shape, the machine and software, the settings every row shares."""
    shared = ("text_tokens", "tokens_per_micro_batch", "llm_trainable", "warmup", "steps", "overrides")
    return {
        "shape": args.shape,
        "device": common.device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "versions": common.versions(),
        **{key: getattr(args, key) for key in shared},
        **settings,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "assumed_mfu": ASSUMED_MFU,
        "rows": [],
        "complete": False,
    }


def record_rows(args: argparse.Namespace, report: dict, time_row, describe, columns=COLUMNS) -> dict:
    """Every row of `args.rows` in order, timed by `time_row(shape, tokens, grid)` (a row that failed
    says why in `error`, and the next row still runs), printed with `describe(row)`, and the report
    rewritten after each, so a run cut off by a time limit keeps the rows it finished."""
    shape, script = SHAPES[args.shape], Path(sys.argv[0]).stem
    print(
        f"[{script}] {args.shape} on {report['device']}; peak {common.cell(report['peak_tflops'], '.4g')} TFLOP/s "
        f"({report['peak_source']})",
        flush=True,
    )
    for num_tokens, grid in args.rows:
        row = time_row(shape, num_tokens, grid)
        print(
            f"[{script}] {num_tokens} tokens at {row['image_size']} px: {row.get('error') or describe(row)}", flush=True
        )
        report["rows"].append(row)
        update_ratios(report)
        common.write_report(args.json, report)
    report["complete"] = True
    common.write_report(args.json, report)
    print_report(report, columns)
    return report
