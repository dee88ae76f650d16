"""The one summary table of a `bench/gpu.sh` run, from the files it left in its output folder: the device and
its measured matmul peak (env.txt), the GPU tier's result and figures (gpu_tier.txt, gpu_tier.json: pytest -m
gpu), and each stage-speed variant's product rows beside the engine-alone rows matched to them
(<variant>.json, <variant>-engine.json).

    python bench/gpu_summary.py OUT            # prints the table and writes OUT/summary.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import common


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tier_result(out: Path) -> str:
    """pytest's closing line ("6 passed in 231.04s"), or why there is none."""
    try:
        lines = (out / "gpu_tier.txt").read_text(errors="replace").splitlines()
    except OSError:
        return "not run"
    found = [line.strip("= ") for line in lines if re.search(r"\b(passed|failed|skipped|error)", line)]
    return found[-1] if found else "no result (cut off?)"


def device_rows(out: Path) -> list[list[str]]:
    try:
        env = (out / "env.txt").read_text().splitlines()
    except OSError:
        return [["device", "unknown (no env.txt)"]]
    peak = next((line.split(":", 1)[1].strip() for line in env if line.startswith("measured bf16 peak")), "-")
    return [["device", env[0] if env else "-"], ["measured bf16 matmul peak", peak]]


def tier_rows(out: Path) -> list[list[str]]:
    rows = [["GPU tier (pytest -m gpu tests/test_gpu.py)", tier_result(out)]]
    report = _read_json(out / "gpu_tier.json")
    if report is None:
        return rows
    seconds = ", ".join(f"{name} {value:g}" for name, value in report["seconds"].items())
    pre = report["pretrain"]
    rows += [
        [f"tier: seconds per command ({report['shape']} shape)", seconds],
        [
            "tier: pretrain median step",
            f"{common.cell(pre['step_time_s'], '.3g')} s, {common.cell(pre['samples_per_s'], '.4g')} samples/s, "
            f"MFU {common.cell(pre['mfu'], '.1%')}, HFU {common.cell(pre['hfu'], '.1%')}, "
            f"peak {report['peak_mem_gib']:.1f} GiB",
        ],
        ["tier: auto budget", report["probe"] or "-"],
    ]
    return rows


def speed_rows(out: Path) -> list[list[str]]:
    rows = []
    for path in sorted(out.glob("*.json")):
        if path.stem in ("gpu_tier",) or path.stem.endswith("-engine"):
            continue
        report = _read_json(path)
        if not report or "rows" not in report:
            continue
        engine = _read_json(out / f"{path.stem}-engine.json") or {"rows": []}
        matched = {(r["tokens"], r["image_size"]): r for r in engine["rows"] if "error" not in r}
        for row in report["rows"]:
            name = f"{path.stem}: {row['tokens']}/{row.get('resolution') or row.get('image_size')}"
            if "error" in row:
                rows.append([name, row["error"]])
                continue
            text = (
                f"{row['samples_per_s']:.4g} samples/s, {row['s_per_step']:.3g} s/step, "
                f"MFU {common.cell(row.get('mfu'), '.1%')}, HFU {common.cell(row.get('hfu'), '.1%')}, "
                f"peak {common.cell(row.get('peak_mem_gib'), '.1f')} GiB"
            )
            alone = matched.get((row["tokens"], row["image_size"]))
            if alone:
                text += (
                    f"; engine alone {alone['samples_per_s']:.4g} samples/s "
                    f"(product/engine {common.cell(alone.get('product_over_engine'), '.2f')})"
                )
            rows.append([name, text])
        if report.get("ratio_32_vs_336") is not None:
            rows.append(
                [
                    f"{path.stem}: 32 vs 336 tokens",
                    f"{report['ratio_32_vs_336']:.2f}x measured, "
                    f"{report['flop_ratio_32_vs_336']:.2f}x by the FLOP model",
                ]
            )
    return rows


def summary(out: Path) -> str:
    return common.markdown_table(["item", "value"], [*device_rows(out), *tier_rows(out), *speed_rows(out)], "ll")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python bench/gpu_summary.py OUT")
    out = Path(args[0])
    table = summary(out)
    print(table)
    (out / "summary.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
