"""What a spec resolves to before anything runs (docs/design.md §5, §8): the one resolver that the run and
`cosctl plan` share (`resolve`), the DeepSpeed config templates and their filling (`deepspeed_config`),
the FLOP model (`flops`), the ZeRO communication model (`comm`), and `cosctl plan`'s summary
(`summary`).

May import: `cosctl.stages`, `checkpoint`, `data`, `spec`, `storage`, `common`, and `cos_model`.
"""
