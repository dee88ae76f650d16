"""Peak host memory and time of building the Chain-of-Sight model from pretrained folders: the old way
(a fully initialised model, then `from_pretrained` copies swapped in) against `cos_model.loading.
build_pretrained` (meta-device build, checkpoint tensors assigned).

    .venv/bin/python bench/lean_build.py --out /tmp/lean_build            # ~230M-parameter LLM, fp32 + bf16
    .venv/bin/python bench/lean_build.py --out /tmp/lean_build --layers 4 --hidden 512   # smaller, faster

The folders (a ViT-L/14-geometry CLIP at width 128 and a Llama of `--hidden` x `--layers` with a
32000-token vocabulary, saved by transformers in 200 MB safetensors shards) are written once under
`--out`. Each build runs in a fresh process that reports, from /proc/self/status, VmRSS before the build
(imports only), VmHWM right after it and VmHWM after reading every parameter once (a forward pass would
touch them all too; memory-mapped checkpoint pages only count once touched), and the build time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common


def make_folders(out: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    vision, text = out / "clip", out / f"llama_{hidden}x{layers}"
    if not (vision / "config.json").is_file():
        clip_text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        common.save_clip(vision, width=128, intermediate=512, text=clip_text, projection_dim=64)
    if not (text / "config.json").is_file():
        common.save_llama(text, hidden=hidden, layers=layers, intermediate=int(hidden * 2.75))
    return vision, text


def cos_config(vision: Path, text: Path):
    from transformers import AutoConfig, CLIPVisionConfig

    from cos_model import CosConfig

    return CosConfig(
        vision_config=CLIPVisionConfig.from_pretrained(vision).to_dict(),
        text_config=AutoConfig.from_pretrained(text).to_dict(),
        feature_layers=[15, 22],
        resampler_num_heads=4,
        image_token_id=32000,
    )


def child(mode: str, dtype_name: str, vision: Path, text: Path) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    config = cos_config(vision, text)
    before = common.proc_status_kib()["VmRSS"]
    start = time.perf_counter()
    if mode == "old":
        from transformers import AutoModelForCausalLM

        from cos_model import CosForConditionalGeneration
        from cos_model.building import build_vision_tower

        torch.manual_seed(0)
        model = CosForConditionalGeneration(config)
        tower = build_vision_tower(vision, model.vision_tower.num_blocks)[0]
        model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
        del tower
        model.language_model = AutoModelForCausalLM.from_pretrained(text, dtype=dtype)
        model.to(dtype)
    else:
        from cos_model.building import build_pretrained

        model, _ = build_pretrained(config, vision, text, dtype=dtype, seed=0)
    seconds = time.perf_counter() - start
    built = common.proc_status_kib()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())
    touched = common.proc_status_kib()
    numel = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "dtype": dtype_name,
        "params_m": round(numel / 1e6, 1),
        "model_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20),
        "rss_before_mib": round(before / 1024),
        "peak_after_build_mib": round(built["VmHWM"] / 1024),
        "peak_after_touch_mib": round(touched["VmHWM"] / 1024),
        "anon_after_touch_mib": round(touched["RssAnon"] / 1024),
        "file_after_touch_mib": round(touched["RssFile"] / 1024),
        "build_s": round(seconds, 1),
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoints (reused)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    vision, text = make_folders(args.out, args.hidden, args.layers)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], vision, text)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        for mode in ("old", "lean"):
            command = [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--child",
                mode,
                dtype,
            ]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    columns = [
        "mode",
        "dtype",
        "params_m",
        "model_mib",
        "rss_before_mib",
        "peak_after_build_mib",
        "peak_after_touch_mib",
        "build_s",
    ]
    print(common.markdown_table(columns, [[row[c] for c in columns] for row in rows], "ll" + "r" * (len(columns) - 2)))


if __name__ == "__main__":
    main()
