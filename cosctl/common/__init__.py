"""What every package shares: the errors a user can cause (`errors`), the one rank-0 logger (`log`), and
the process group with the few collectives ranks agree with (`dist`).

May import: nothing of cosctl (torch and DeepSpeed only, in `dist`).
"""
