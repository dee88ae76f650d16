"""The training loop of the pretrain and finetune stages (docs/design.md §5): the run put together
(`run.setup_run`), the loop (`loop`), the DeepSpeed engine (`engine`), steps cut into token-budget
micro-batches per rank (`batching`) and read (`loader`), the `auto` budget probe (`autobatch`), the held-out evaluation
(`heldout`), and the per-step sinks (`metrics`).

May import: `cosctl.plan`, `evaluate`, `stages`, `artefacts`, `checkpoint`, `data`, `spec`, `storage`,
`common`, and `cos_model`.
"""
