"""Generation-based evaluation: `cosctl eval` and the in-process API a training loop calls.

    records.py     reading and checking eval records; each record's prompt, as training tokenised it
    generation.py  `generate_and_score`: batched greedy generation sharded over ranks (ZeRO-3 safe), scored
    loading.py     the model from an export, a run output (model/ or adapter/ + its base), any store
    command.py     `run_eval`: files, the baseline beside the model, the table

Heavy imports (torch, transformers, peft) happen in the submodules; import them directly.
"""
