"""Records to tensors (docs/design.md §5): reading LLaVA-format JSON or webdataset tar shards and the
tokenizer, one conversation to token ids and labels, image bytes and pixels, preparing a split into a
memory-mapped token store and reading it, collating, and the built-in synthetic set.

    records.py       files of records -> examples -> collated tensors; the tokenizer
    conversation.py  one record -> text token ids and labels (through `cos_model.chat`)
    images.py        image bytes and pixels from a folder or a bucket, cached
    shards.py        webdataset tar shards: identities, one pass over a shard, images read by range
    split.py         a split's source, its store's key, location and publishing
    prepare.py       finding or building a split's store over the ranks
    prepare_parts.py the per-rank work of preparing, in forked processes
    tokenstore.py    the store's format, and reading it
    synth.py         the deterministic synthetic multitask set

May import: `cosctl.spec` (a default), `cosctl.storage`, `common`, and `cos_model`.
"""
