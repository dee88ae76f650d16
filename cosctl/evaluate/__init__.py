"""Generation-based evaluation: `cosctl eval` and the in-process API a training loop calls.

    records.py     reading and checking eval records; each record's prompt, as training tokenised it
    generation.py  `generate_and_score`: batched greedy generation sharded over ranks (ZeRO-3 safe), scored
    scoring.py     per-task metrics and the image-free baseline (pure)
    cider.py       CIDEr-D
    command.py     `run_eval`: files, the baseline beside the model, the table

Heavy imports (torch, transformers, peft) happen in the submodules; import them directly. The model to
evaluate is loaded by `cosctl.artefacts.loading`.

May import: `cosctl.artefacts`, `data`, `storage`, `common`, and `cos_model`.
"""
