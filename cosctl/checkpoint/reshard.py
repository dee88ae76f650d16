"""Resuming a ZeRO checkpoint on another number of ranks (docs/design.md §6).

A checkpoint's optimizer state is partitioned for the world size that wrote it. To continue on W' ranks,
the node's first rank converts the fetched shards into DeepSpeed's universal checkpoint (one file per
parameter: fp32 weights and both AdamW moments, full and unpartitioned; `ds_to_universal`), and every
rank loads it with `load_universal`, which re-partitions for W'. Frozen parameters are not in it; they
come from the model the stage built, as they do on every resume.

DeepSpeed's conversion and its universal load call `torch.load(weights_only=False)` on every file; both
run here under `safe_load.weights_only_loads`, so no checkpoint file is unpickled beyond tensors (the
conversion runs with one worker, in this process, where that holds).

Two DeepSpeed 0.19.8 ZeRO-3 universal-load bugs are repaired after the load (both measured to change
the continuation when they apply): every optimizer sub-group receives the same AdamW `step` tensor, so
it is advanced once per sub-group; and every param group receives group 0's hyper-parameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .safe_load import load_weights_only, weights_only_loads

CONVERTED_MARKER = "CONVERTED_OK"
UNIVERSAL_TAG = "universal"


def convert_to_universal(tag_dir: Path, checkpoint_dir: Path) -> Path:
    """Write the universal form of the ZeRO shards in `tag_dir` as `checkpoint_dir/universal` (reused
    when a complete conversion is already there). Pure file I/O; no process group needed."""
    from deepspeed.checkpoint import ds_to_universal

    out_dir = Path(checkpoint_dir) / UNIVERSAL_TAG
    if (out_dir / CONVERTED_MARKER).is_file():
        return out_dir
    with weights_only_loads():  # one worker each: DeepSpeed's ProcessPool would escape the guard
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=str(tag_dir),
                output_folder=str(out_dir),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
    (out_dir / CONVERTED_MARKER).write_text(str(tag_dir))
    return out_dir


def load_universal(engine, checkpoint_dir: Path) -> None:
    """Load `checkpoint_dir/universal` into `engine` (collective), re-partitioned for this world size,
    every file weights-only."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        with weights_only_loads():
            engine.load_checkpoint(str(checkpoint_dir), tag=UNIVERSAL_TAG, load_module_strict=False)
    finally:
        config.load_universal_checkpoint = False
    _separate_step_counters(engine)
    _restore_param_group_settings(engine, Path(checkpoint_dir) / UNIVERSAL_TAG)


def _separate_step_counters(engine) -> None:
    """One `step` tensor per optimizer sub-group (the load shares one; AdamW increments it in place)."""
    zero = engine.optimizer
    for flat in getattr(zero, "fp32_partitioned_groups_flat", []):
        state = zero.optimizer.state.get(flat)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _restore_param_group_settings(engine, universal_dir: Path) -> None:
    """Each param group's own saved lr, weight decay, ... (the load copies group 0's into all)."""
    saved = load_weights_only(str(universal_dir / "zero" / "optimizer_state.pt"), map_location="cpu")
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    groups = engine.optimizer.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise RuntimeError(f"{universal_dir}: {len(saved_groups)} saved param groups, the optimizer has {len(groups)}")
    for group, saved_group in zip(groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
