"""`cosctl demo`: the whole pipeline on tiny random models in one process (`pipeline`), and the paper's
comparison at that scale, Chain-of-Sight against 336 tokens throughout (`compare`); docs/design.md §10.

May import: every package but `cosctl.cli`.
"""
