"""cosctl: CLI, run specs, training, checkpoints, storage and SLURM for Chain-of-Sight MLLMs."""
