"""`python -m cosctl` (what torchrun launches for multi-rank runs)."""

from .cli import main

main()
