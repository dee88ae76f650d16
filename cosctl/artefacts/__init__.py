"""The artefacts stages publish and how they are read back (docs/design.md §6, §9): the `model/` and peft
`adapter/` folders with the code and processor that let transformers (and peft) load them alone, the
adapter's record of its base, exact loading of any artefact from any store, and `cosctl export`'s merged
folder.

    published.py    writing model and adapter folders; finding a model folder from a URI; the base record
    remote_code.py  the `cos_model` modules and `auto_map` a folder ships as remote code
    loading.py      fetching and loading an artefact exactly (`load_for_eval`, `load_model_folder`)
    export.py       `cosctl export`: one self-contained Hugging Face folder

May import: `cosctl.checkpoint`, `data`, `storage`, `common`, and `cos_model`.
"""
