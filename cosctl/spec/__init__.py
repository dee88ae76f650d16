"""Run specs (docs/design.md §6): strict, frozen pydantic models of the YAML files in `recipes/`.

    specs.py       the stage specs and `load_spec` (YAML -> overrides -> validation -> one `SpecError`)
    sections.py    the sections that say how to train (data, optim, batch, DeepSpeed, checkpoint, ...)
    model.py       the model sections and their checks in plain Python
    subconfigs.py  the towers' sub-configs checked without transformers
    paths.py       `check_paths`: the files a spec names (the pre-flight)
    frozen.py      the read-only containers specs are made of

May import: `cosctl.storage` (settings), `common`, and `cos_model.scales` (plain Python).
"""
