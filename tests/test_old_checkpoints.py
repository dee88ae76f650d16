"""Checkpoints written before a change keep resuming after it.

`tests/golden/checkpoint_7ff66f5` was written by commit 7ff66f5 (before the packages were laid out by
concern and before loader positions pinned their data): a 4-step tiny pretrain (frozen random towers,
the projector trained) on the 24-sample synthetic set beside it, saving at step 2. `straight_run.json`
holds that run's per-step loss and learning rate. Its step-2 checkpoint, resumed by today's code, must
continue exactly where the old straight run went.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.harness import RECIPES, cosctl, ok, steps

GOLDEN = Path(__file__).resolve().parent / "golden" / "checkpoint_7ff66f5"

pytestmark = pytest.mark.slow


def test_a_checkpoint_written_before_the_relayout_resumes_exactly(tmp_path):
    """Today's code resumes the old step-2 checkpoint (no data pin in its loader position: said once)
    and trains steps 3 and 4 with the old straight run's losses and learning rates. The run starts in a
    copy of the old run's folder with the same (relative) paths, as a user continues a run."""
    shutil.copytree(GOLDEN / "data", tmp_path / "data")
    shutil.copytree(GOLDEN / "out", tmp_path / "out")
    result = ok(
        cosctl(
            "pretrain",
            str(RECIPES / "tiny" / "pretrain.yaml"),
            "--run-dir",
            "work",
            "--output",
            "out",
            *[
                arg
                for setting in (
                    "data.root=data",
                    "model.tokenizer=data/tokenizer",
                    "run.output=out",
                    "optim.num_steps=4",
                    "checkpoint.every_steps=2",
                    "checkpoint.keep_last=5",
                    "eval.every_steps=null",
                    "batch.samples_per_step=8",
                    "batch.tokens_per_micro_batch=1024",
                    "model.trainable=[projector]",
                )
                for arg in ("--set", setting)
            ],
            tmp=tmp_path,
            cwd=tmp_path,
        )
    )
    old = json.loads((GOLDEN / "straight_run.json").read_text())["steps"]
    resumed = steps(tmp_path / "work")
    assert sorted(resumed) == [3, 4] and json.loads((tmp_path / "work" / "summary.json").read_text())["steps"] == 4
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(old[str(step)]["loss"], rel=1e-6, abs=1e-7)
        assert resumed[step]["lr"] == pytest.approx(old[str(step)]["lr"], rel=1e-9)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "pin" in line]
    assert len(said) == 1, said
