"""Llama/Vicuna-style SentencePiece tokenizers, made the way users' tokenizer folders are made.

A BPE `tokenizer.model` is trained with `sentencepiece` as Llama's was (byte fallback, digits split,
a dummy "▁" prefix, no normalisation; `<unk>`=0, `<s>`=1, `</s>`=2) on the synthetic set's chat texts,
then converted by transformers' own `LlamaTokenizer` with `legacy=False` or `legacy=True` and saved
with `save_pretrained`. The saved tokenizer.json has a Metaspace pre-tokenizer with prepend_scheme
"first" (legacy=False) or "always" (legacy=True). transformers 5's `save_pretrained` leaves `legacy` out
of tokenizer_config.json, which then loads as legacy=False whatever tokenizer.json says; the Hub's
Llama-2/Vicuna folders (written by transformers 4) record it, so it is written back here.

`llama_tokenizer_dirs` (a session fixture, registered in conftest.py) builds both once per session:
{False: folder, True: folder}; load them with `cosctl.data.records.load_tokenizer`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

VOCAB_SIZE = 512
NUM_CORPUS_SAMPLES = 200


def corpus(num_samples: int = NUM_CORPUS_SAMPLES) -> list[str]:
    """The synthetic set's conversations as chat text (the placeholder left out)."""
    from cosctl.data.synth import make_sample

    texts = []
    for index in range(num_samples):
        human, gpt = make_sample(0, index, 64)[0]["conversations"]
        texts.append("USER: " + human["value"].replace("<image>", "") + " ASSISTANT: " + gpt["value"])
    return texts


def train_sentencepiece(texts: list[str]) -> bytes:
    """A Llama-like BPE `tokenizer.model` trained on `texts` (deterministic: one thread)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def save_llama_tokenizer(sentencepiece_model: bytes, out_dir: Path, legacy: bool) -> Path:
    """`LlamaTokenizer.from_pretrained` of a folder holding only `tokenizer.model`, `save_pretrained` to
    `out_dir`, with `legacy` recorded in tokenizer_config.json as the Hub's folders record it."""
    from transformers import LlamaTokenizer

    source = out_dir / "sentencepiece"
    source.mkdir(parents=True)
    (source / "tokenizer.model").write_bytes(sentencepiece_model)
    tokenizer = LlamaTokenizer.from_pretrained(source, legacy=legacy)
    folder = out_dir / "tokenizer"
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(legacy=legacy, add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def llama_tokenizer_dirs(tmp_path_factory) -> dict[bool, Path]:
    """Llama-style tokenizer folders by `legacy`, built once per session."""
    model = train_sentencepiece(corpus())
    root = tmp_path_factory.mktemp("llama_tokenizer")
    return {legacy: save_llama_tokenizer(model, root / f"legacy_{legacy}", legacy) for legacy in (False, True)}
