"""Writing a checkpoint to the local staging folder without stranding a rank: whether the disk has
room (the ranks that share a filesystem counted together), DeepSpeed's writes recorded rather than
raised (its save ends in a barrier every rank must reach), and one line for a failed write.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

import torch


class RecordingWriter:
    """Wraps a DeepSpeed checkpoint engine's `save` so that a failed write is recorded, not raised."""

    def __init__(self, checkpoint_engine):
        self.checkpoint_engine, self.original = checkpoint_engine, checkpoint_engine.save
        self.error: Exception | None = None
        checkpoint_engine.save = self._save

    def _save(self, state_dict, path: str):
        if self.error is not None:
            return None
        try:
            return self.original(state_dict, path)
        except Exception as err:  # disk full (torch.save raises RuntimeError), quota, permissions
            self.error = err
            return None

    def restore(self) -> None:
        self.checkpoint_engine.save = self.original


def write_problem(err: Exception, staging: Path, local: Path) -> str:
    """One line for a failed staging write: "no space left on <path>" when the disk (or a quota) is
    full, whatever type the writer raised it as."""
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(current):
            return f"no space left on {staging}"
        current = current.__cause__ or current.__context__
    return f"cannot write {local}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "lustre",
    "gpfs",
    "beegfs",
    "cephfs",
    "ceph",
    "glusterfs",
    "cifs",
    "smb3",
    "wekafs",
    "fuse.sshfs",
    "9p",
    "panfs",
    "fuse.juicefs",
}


def filesystem_group(folder: Path) -> str:
    """Which ranks share `folder`'s disk: everyone on a network filesystem, else one node's ranks."""
    folder.mkdir(parents=True, exist_ok=True)
    target = str(folder.resolve())
    fstype, longest = "", -1
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")):
                if len(parts[1]) > longest:
                    fstype, longest = parts[2], len(parts[1])
    except OSError:
        pass
    if fstype in NETWORK_FILESYSTEMS:
        return f"shared:{fstype}"
    return f"{socket.gethostname()}:{os.stat(folder).st_dev}"


def free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def partition_bytes(engine) -> int:
    """About what this rank's first checkpoint writes: its partition of the trainable weights, in fp32
    with two AdamW moments, and the same again in the module state."""
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    return int(numel / torch.distributed.get_world_size() * (4 * 3 + 4)) + (1 << 20)
