"""Starting and stopping runs (docs/design.md §7): local ranks under torchrun's launcher in this process
(`local`), the checks before any rank starts (`preflight`), and SLURM batch scripts with the preemption
protocol (`slurm`).

May import: `cosctl.checkpoint`, `spec`, `storage`, `common`.
"""
