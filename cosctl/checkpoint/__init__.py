"""Checkpoints of a running job (docs/design.md §6, §7): the layout and commit protocol over a store, saving
and restoring, uploading and committing in the background, resuming on another world size, and loading
shards without unpickling code.

    layout.py        names, manifests, commit, retention, rollback, publishing a folder
    checkpointer.py  `Checkpointer`: save (staged, then queued) and restore a running job
    staging.py       writing the staged copy without stranding a rank
    committer.py     the background uploads and commits, through outages
    reshard.py       DeepSpeed's universal checkpoint for another world size
    safe_load.py     weights-only `torch.load` on every resume path

May import: `cosctl.spec`, `storage`, `common`.
"""
