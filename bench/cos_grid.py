"""Chain-of-Sight (32 tokens -> inflate -> fine-tune) against 336 tokens throughout, under fine-tuning
variants: the comparison of `cosctl demo --compare` (docs/design.md §10) with one thing changed per row.

    python bench/cos_grid.py --out runs/cos_grid --seeds 0 --rows lora full steps300   # CPU, minutes a row
    python bench/cos_grid.py --out runs/cos_grid --table                               # re-print OUT/grid.json

Rows (every row has both arms; the default is all but the two long ones, about 60 minutes for one seed
on 2 idle cores):

    lora       the demo as it was: LoRA r16 + bridge in full at one lr, 120 steps, CoS pre-trained at 64 px,
               inflated 32to528
    full       whole-LLM fine-tuning: `lora: null`, `model.trainable: [resampler, projector, language_model]`
    bridge50   LoRA, the resampler and projector at 1/50 of their pre-training lr (`optim.lr_by_module`),
               as the authors' fine-tuning and LLaVA's LoRA recipe train the bridge
    full_bridge50  whole-LLM fine-tuning with the bridge at 1/50 of its pre-training lr (the authors' code)
    32to336    CoS inflated with 32to336 instead of 32to528 (336 tokens after inflation, like the baseline)
    cos128     CoS pre-trained at 128 px with 32 tokens (windows 32x16 + 8x1), then inflated to the 528
               geometry at the same 128 px (a plan, not a preset: no resolution change at inflation)
    recipe     the tiny recipe as adopted: bridge50 over 360 steps, 1.2x the pre-training's samples, as the
               authors fine-tune 665K samples after pre-training on 558K
    steps300   LoRA, 300 fine-tuning steps (warm-up and cosine scale with the steps, as the recipe says)
    steps600   LoRA, 600 fine-tuning steps (both long rows: on request)

Every stage is the product's own command in a subprocess from the repository root: `cosctl data synth`,
`cosctl pretrain recipes/tiny/pretrain.yaml` (CoS) or `recipes/tiny-compare/pretrain.yaml` (336
throughout), `cosctl inflate recipes/tiny/inflate.yaml`, `cosctl finetune recipes/tiny/finetune.yaml`,
and `cosctl eval` of each fine-tuned artefact on the held-out split (greedy, 32 new tokens, the
image-free baseline counted from the training records), with `--set` overrides only for the row's
change, the data and the seed. A run is keyed by what it depends on, so one pre-training per arm, variant
and seed, and one inflation per preset, serve every row that uses them; a run whose `summary.json`
(eval: `metrics.json`) exists under OUT is reused, so an interrupted grid continues where it stopped.

Per row and arm: held-out eval loss and swap gap (swapped-image minus own-image eval loss) after
fine-tuning, caption CIDEr and VQA accuracy of the greedy answers, and the training wall-clock
(`train_time_s` of the run's summary: steps, evals and checkpoints, not the model build) of pre-training
and fine-tuning. OUT/grid.json holds every figure; `--table` prints the table from it without running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common

RECIPES = common.REPO / "recipes"
FULL_LLM = ("lora=null", "model.trainable=[resampler, projector, language_model]")
COS128_SCALES = "[{window: 32, queries_per_window: 16}, {window: 8, queries_per_window: 1}]"
# 528 tokens at 128 px from the 128-px source: the 32to528 geometry, parents as in the preset.
COS128_PLAN = (
    "{image_size: 128, scales: [{window: 32, queries_per_window: 16, parent: 0}, "
    "{window: 8, queries_per_window: 16, parent: 0}, {window: 2, queries_per_window: 1, parent: 1}]}"
)
PRETRAINS = {  # name -> (recipe, overrides)
    "cos64": ("tiny/pretrain.yaml", ()),
    "cos128": ("tiny/pretrain.yaml", ("model.image_size=128", f"model.scales={COS128_SCALES}")),
    "tokens336": ("tiny-compare/pretrain.yaml", ()),
}
# The authors fine-tune the bridge at 2e-5 after pre-training it at 1e-3 (LLaVA's LoRA recipe sets
# mm_projector_lr 2e-5 the same way): 1/50 of the tiny pre-training's 2e-3.
BRIDGE_LR_50 = 4e-5
INFLATIONS = {"32to528": "32to528", "32to336": "32to336", "528at128": COS128_PLAN}  # name -> plan


@dataclass(frozen=True)
class Row:
    what: str
    cos_pretrain: str = "cos64"
    inflation: str = "32to528"
    full_llm: bool = False
    steps: int = 120
    bridge_lr: float | None = None  # the resampler's and projector's own peak lr; None: the recipe's lr

    def finetune_sets(self) -> list[str]:
        bridge = "{}" if self.bridge_lr is None else f"{{resampler: {self.bridge_lr}, projector: {self.bridge_lr}}}"
        return [*(FULL_LLM if self.full_llm else ()), f"optim.num_steps={self.steps}", f"optim.lr_by_module={bridge}"]

    def finetune_key(self) -> str:
        bridge = "" if self.bridge_lr is None else f"-bridge{self.bridge_lr:g}"
        return f"{'full' if self.full_llm else 'lora'}{self.steps}{bridge}"


ROWS = {
    "lora": Row("LoRA, 120 steps (the demo before)"),
    "full": Row("whole LLM, 120 steps", full_llm=True),
    "bridge50": Row("LoRA, bridge at its pre-training lr / 50", bridge_lr=BRIDGE_LR_50),
    "full_bridge50": Row("whole LLM, bridge at its pre-training lr / 50", full_llm=True, bridge_lr=BRIDGE_LR_50),
    "32to336": Row("CoS inflated 32to336", inflation="32to336"),
    "cos128": Row("CoS pre-trained at 128 px", cos_pretrain="cos128", inflation="528at128"),
    "recipe": Row("360 steps, bridge at lr / 50 (the recipe)", steps=360, bridge_lr=BRIDGE_LR_50),
    "steps300": Row("LoRA, 300 steps", steps=300),
    "steps600": Row("LoRA, 600 steps", steps=600),
}
LONG_ROWS = ("steps300", "steps600")
ARMS = ("cos", "tokens336")


class Grid:
    """The runs of one seed under `out/seed<S>`, each made once and read back from its own files."""

    def __init__(self, out: Path, seed: int, num_samples: int, threads: int):
        self.root, self.seed, self.num_samples = out / f"seed{seed}", seed, num_samples
        self.env = common.product_env() | {"OMP_NUM_THREADS": str(threads)}
        self.data = self.root / "data"

    def cosctl(self, args: list[str], log: Path) -> float:
        """`python -m cosctl ARGS` from the repository root, output in `log`; its wall-clock in s."""
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "cosctl", *map(str, args)]
        print(f"[grid] {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        with open(log, "w") as stream:
            stream.write(" ".join(command) + "\n")
            stream.flush()
            done = subprocess.run(command, cwd=common.REPO, env=self.env, stdout=stream, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"cosctl {args[0]} exited {done.returncode} (log {log}):\n{tail}")
        return time.monotonic() - started

    def ensure_data(self) -> None:
        if not (self.data / "eval.json").exists():
            self.cosctl(
                ["data", "synth", "--out", self.data, "--num-samples", self.num_samples, "--seed", self.seed],
                self.root / "logs" / "data.log",
            )

    def train(self, stage: str, name: str, recipe: str, sets: list[str]) -> dict:
        """A pretrain or finetune run under `root/name` (once): its summary.json plus the process time."""
        folder = self.root / name
        summary = folder / "work" / "summary.json"
        if not summary.exists():
            on_data = [f"data.root={self.data}", f"run.seed={self.seed}", *sets]
            args = [stage, RECIPES / recipe, "--run-dir", folder / "work", "--output", folder / "output"]
            args += ["--resume", "never", "--overwrite", *(a for s in on_data for a in ("--set", s))]
            process_s = self.cosctl(args, folder / "cosctl.log")
            (folder / "process_s").write_text(f"{process_s:.1f}\n")
        process_s = folder / "process_s"  # absent when the run was made by a grid process that was stopped
        return json.loads(summary.read_text()) | {
            "process_s": float(process_s.read_text()) if process_s.exists() else None
        }

    def pretrain(self, name: str) -> dict:
        recipe, sets = PRETRAINS[name]
        return self.train("pretrain", f"pretrain-{name}", recipe, [*sets, f"model.tokenizer={self.data / 'tokenizer'}"])

    def inflate(self, pretrain: str, inflation: str) -> Path:
        folder = self.root / f"inflate-{pretrain}-{inflation}"
        if not (folder / "work" / "done").exists():
            source = self.root / f"pretrain-{pretrain}" / "output"
            sets = [f"source={source}", f"plan={INFLATIONS[inflation]}"]
            args = ["inflate", RECIPES / "tiny" / "inflate.yaml", "--run-dir", folder / "work"]
            args += ["--output", folder / "output", *(a for s in sets for a in ("--set", s))]
            self.cosctl(args, folder / "cosctl.log")
            (folder / "work" / "done").write_text("")
        return folder / "output"

    def evaluate(self, run: dict, folder: Path) -> dict:
        metrics = folder / "eval" / "metrics.json"
        if not metrics.exists():
            args = ["eval", run["artefact"], "--data", self.data / "eval.json", "--images", self.data]
            args += ["--out", metrics.parent, "--max-new-tokens", 32, "--batch-size", 8]
            self.cosctl([*args, "--baseline-from", self.data / "train.json"], folder / "eval.log")
        return json.loads(metrics.read_text())

    def arm(self, row: Row, arm: str) -> dict:
        """Pre-train (shared), inflate (shared, CoS only), fine-tune and score one arm of `row`."""
        pretrain = row.cos_pretrain if arm == "cos" else "tokens336"
        pre = self.pretrain(pretrain)
        if arm == "cos":
            source = self.inflate(pretrain, row.inflation)
            name = f"finetune-{pretrain}-{row.inflation}-{row.finetune_key()}"
        else:
            source = self.root / f"pretrain-{pretrain}" / "output"
            name = f"finetune-{pretrain}-{row.finetune_key()}"
        fin = self.train("finetune", name, "tiny/finetune.yaml", [f"model.source={source}", *row.finetune_sets()])
        scores = self.evaluate(fin, self.root / name)
        return {"pretrain": figures(pre), "finetune": figures(fin), "scores": scores["tasks"]} | {
            "baseline": scores["baseline"]["tasks"]
        }


FIGURES = ("visual_tokens", "image_size", "steps", "final_eval_loss", "final_eval_loss_swapped_images")


def figures(summary: dict) -> dict:
    return {key: summary.get(key) for key in FIGURES} | {
        "train_time_s": summary.get("train_time_s"),
        "process_s": summary.get("process_s"),
        "first_eval_loss": summary.get("first_eval_loss"),
    }


def run_grid(out: Path, seeds: list[int], rows: list[str], arms: list[str], num_samples: int, threads: int) -> dict:
    """Every (seed, row, arm) of the grid, merged into OUT/grid.json after each one (so grid processes
    running other arms side by side keep each other's results); a failed run is recorded with its error
    and the grid goes on."""
    path = out / "grid.json"
    grid = json.loads(path.read_text()) if path.exists() else {"results": {}}
    grid["versions"] = common.versions()
    for seed in seeds:
        runs = Grid(out, seed, num_samples, threads)
        runs.ensure_data()
        for row in rows:
            for arm in arms:
                started = time.monotonic()
                try:
                    result = runs.arm(ROWS[row], arm)
                except RuntimeError as err:
                    print(f"[grid] seed {seed} {row} {arm}: {err}", flush=True)
                    result = {"error": str(err).splitlines()[0]}
                print(f"[grid] seed {seed} {row} {arm}: {time.monotonic() - started:.0f} s", flush=True)
                if path.exists():  # another grid process may have added its results meanwhile
                    grid["results"] = json.loads(path.read_text())["results"]
                grid["results"].setdefault(str(seed), {}).setdefault(row, {})[arm] = result
                path.write_text(json.dumps(grid, indent=1))
    return grid


def gap(stage: dict) -> float | None:
    own, swapped = stage.get("final_eval_loss"), stage.get("final_eval_loss_swapped_images")
    return None if own is None or swapped is None else swapped - own


# Column -> how an arm's result gives its number, and the number's format.
COLUMNS = {
    "pre-train s": (lambda r: r["pretrain"]["train_time_s"], ".0f"),
    "fine-tune s": (lambda r: r["finetune"]["train_time_s"], ".0f"),
    "tokens": (lambda r: r["finetune"]["visual_tokens"], ".0f"),
    "eval loss": (lambda r: r["finetune"]["final_eval_loss"], ".3f"),
    "swap gap": (lambda r: gap(r["finetune"]), ".3f"),
    "caption CIDEr": (lambda r: r["scores"].get("caption", {}).get("cider"), ".3f"),
    "VQA acc %": (lambda r: 100 * r["scores"]["vqa"]["accuracy"] if "vqa" in r["scores"] else None, ".1f"),
}


def cell(values: list, spec: str) -> str:
    """The mean over seeds, with the spread (sd) when there are several that differ."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:{spec}}" if len(set(values)) == 1 else f"{mean:{spec}} ± {statistics.stdev(values):{spec}}"


def seeds(num: int) -> str:
    return f"{num} seed{'s' * (num > 1)}"


def table(grid: dict) -> str:
    """One line per row and arm (cells: mean ± sd over the seeds that have it), then the image-free
    baseline (mean ± sd over the seeds: each seed draws its own data, so its own baseline)."""
    results = grid["results"]
    lines = []
    for row in (row for row in ROWS if any(row in by_row for by_row in results.values())):
        for arm in ARMS:
            done = [by_row[row][arm] for by_row in results.values() if "pretrain" in by_row.get(row, {}).get(arm, {})]
            failed = [
                by_row[row][arm]["error"] for by_row in results.values() if "error" in by_row.get(row, {}).get(arm, {})
            ]
            label = "CoS" if arm == "cos" else "336 throughout"
            if not done:
                lines.append([ROWS[row].what, label, f"failed: {failed[0]}" if failed else "not run"] + [""] * 6)
                continue
            cells = [cell([get(r) for r in done], spec) for get, spec in COLUMNS.values()]
            lines.append([ROWS[row].what, f"{label} ({seeds(len(done))})", *cells])
    # Every run of a seed scores the same image-free answers (one data set per seed).
    baseline_by_seed = {
        seed: result["baseline"]
        for seed, by_row in results.items()
        for by_arm in by_row.values()
        for result in by_arm.values()
        if "baseline" in result
    }
    if baseline_by_seed:
        free = {
            "caption CIDEr": [b.get("caption", {}).get("cider") for b in baseline_by_seed.values()],
            "VQA acc %": [100 * b["vqa"]["accuracy"] if "vqa" in b else None for b in baseline_by_seed.values()],
        }
        lines.append(
            [
                "image-free baseline",
                f"({seeds(len(baseline_by_seed))})",
                *(cell(free[c], spec) if c in free else "" for c, (_, spec) in COLUMNS.items()),
            ]
        )
    return common.markdown_table(["row", "arm", *COLUMNS], lines, "ll" + "r" * len(COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder of the runs and grid.json.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=[r for r in ROWS if r not in LONG_ROWS])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="Arms to run (default both).")
    parser.add_argument("--num-samples", type=int, default=1200, help="Synthetic records (the demo's 1200).")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run.")
    parser.add_argument("--table", action="store_true", help="Print the table of OUT/grid.json; run nothing.")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.table:
        grid = json.loads((out / "grid.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        grid = run_grid(out, args.seeds, args.rows, args.arms, args.num_samples, args.threads)
    print(table(grid))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
