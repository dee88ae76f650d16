"""No checkpoint file is unpickled beyond tensors: our loads, DeepSpeed's `torch.load(weights_only=False)`
calls inside `weights_only_loads`, and DeepSpeed's universal conversion of a planted shard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cosctl.checkpoint.safe_load import load_weights_only, weights_only_loads
from cosctl.common.errors import CheckpointError


class Plant:
    """Unpickling this runs code: it opens (creates) `marker` for writing."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Overwrite a checkpoint file with a torch.save'd state whose unpickling would create `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"optimizer_state_dict": Plant(marker), "weights": torch.zeros(2)}, path)


def plant_in_checkpoint(checkpoint: Path, relative: str, marker: Path) -> None:
    """`plant` a file of a committed checkpoint and give the manifest its true size and sha256, so that
    only the unpickling can stop it."""
    plant(checkpoint / relative, marker)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / relative).read_bytes()
    manifest["files"][relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def test_a_pickle_that_runs_code_is_refused_naming_the_file(tmp_path):
    """load_weights_only refuses a file whose pickle names a callable, in one line naming the file and
    the callable, and the callable never runs; plain tensors load."""
    marker = tmp_path / "marker"
    plant(tmp_path / "shard.pt", marker)
    with pytest.raises(CheckpointError) as refused:
        load_weights_only(tmp_path / "shard.pt", map_location="cpu")
    message = str(refused.value)
    assert "\n" not in message and str(tmp_path / "shard.pt") in message and "open" in message
    assert not marker.exists()
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    assert torch.equal(load_weights_only(tmp_path / "plain.pt")["w"], torch.ones(3))


def test_deepspeeds_own_torch_load_calls_are_weights_only_inside_the_guard(tmp_path):
    """Inside weights_only_loads, torch.load(path, weights_only=False) — DeepSpeed's call — refuses the
    planted file; torch.load is the real one again afterwards."""
    marker = tmp_path / "marker"
    plant(tmp_path / "shard.pt", marker)
    real = torch.load
    with weights_only_loads(), pytest.raises(CheckpointError, match="refused to load"):
        torch.load(tmp_path / "shard.pt", map_location="cpu", weights_only=False)
    assert torch.load is real and not marker.exists()


def test_the_universal_conversion_refuses_a_planted_shard(tmp_path):
    """DeepSpeed's ds_to_universal, as `reshard.convert_to_universal` runs it, stops at a planted
    optimizer shard without running it."""
    from cosctl.checkpoint.reshard import convert_to_universal

    marker = tmp_path / "marker"
    plant(tmp_path / "ckpt" / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load"):
        convert_to_universal(tmp_path / "ckpt" / "zero", tmp_path / "ckpt")
    assert not marker.exists()
