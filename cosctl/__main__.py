"""`python -m cosctl` (what torchrun launches for multi-rank runs)."""

from .cli.app import main

# Guarded: a spawned child process (data preparation) imports this module again under another name.
if __name__ == "__main__":
    main()
