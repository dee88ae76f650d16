"""Caption scoring (cosctl.cider): hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest

from cosctl.cider import cider, ptb_tokenize


# ------------------------------------------------------------------------------------ CIDEr-D


@pytest.mark.parametrize(
    "raw, expected",  # expected: Stanford PTBTokenizer (CoreNLP 3.4.1) + the COCO punctuation filter
    [
        ('a small red circle, a blue square on a white background, with the text "HELLO"',
         "a small red circle a blue square on a white background with the text hello"),
        ("The man's dog doesn't like (big) cats... really?!",
         "the man 's dog does n't like -lrb- big -rrb- cats really ?!"),
        ("It costs $3.50 -- or 3,000 yen; isn't it: great? e.g. U.S.A. o'clock",
         "it costs $ 3.50 or 3,000 yen is n't it great e.g. u.s.a. o'clock"),
        ("Two dogs' toys weren't there - they'd gone. 'quoted' `tick`",
         "two dogs toys were n't there they 'd gone quoted tick"),
        ("cannot gonna wanna won't can't I'm we're you've", "can not gon na wan na wo n't ca n't i 'm we 're you 've"),
        ("don\u2019t \u201ccurly quotes\u201d it\u2019s", "do n't curly quotes it 's"),
        ("A [bracketed] word & 50% off", "a -lsb- bracketed -rsb- word & 50 % off"),
        ("Hello!!! What's up??  It's 5:30, ok.", "hello !!! what 's up ?? it 's 5:30 ok"),
    ],
)
def test_ptb_tokenize_matches_stanford(raw, expected):
    """The pure-Python tokenizer gives the Java PTBTokenizer's output on these captions."""
    assert ptb_tokenize(raw) == expected


def test_cider_hand_computed():
    """Two images, one reference each: idf(a) = 0, idf(cat) = log 2; a perfect match scores
    10 * mean(1, 1, 0, 0) = 5 and a disjoint one 0, so the corpus scores 2.5."""
    corpus, per_image = cider({"a": "a cat", "b": "a cat"}, {"a": ["a cat"], "b": ["a dog"]})
    assert per_image == pytest.approx({"a": 5.0, "b": 0.0})
    assert corpus == pytest.approx(2.5)


def test_cider_length_penalty():
    """"cat" against "a cat": unigram cosine 1, no bigrams, lengths (in bigrams) 0 vs 1, so
    10 * (exp(-1 / 72) / 4) for that image."""
    _, per_image = cider({"a": "cat", "b": "a dog"}, {"a": ["a cat"], "b": ["a dog"]})
    assert per_image["a"] == pytest.approx(2.5 * math.exp(-1 / 72))
    assert per_image["b"] == pytest.approx(5.0)


def test_cider_matches_coco_caption_eval():
    """Per-image and corpus CIDEr-D as pycocoevalcap 1.2 (PTBTokenizer + Cider) computes them."""
    references = {
        "1": ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave."],
        "2": ["Two giraffes standing next to each other in a field.", "Two giraffes in a grassy field."],
        "3": ["A red circle and a blue square on a white background.", "A blue square next to a red circle."],
    }
    predictions = {"1": "A man on a surfboard riding a wave.", "2": "Two giraffes standing in a field.",
                   "3": "A red square on a white background."}  # fmt: skip
    corpus, per_image = cider(predictions, references)
    assert per_image == pytest.approx({"1": 2.028083335159791, "2": 3.3115340728171114, "3": 2.9992881164064005})
    assert corpus == pytest.approx(2.7796351747944343)


def test_cider_prefers_the_reference_caption():
    """A candidate equal to its references scores higher than a different one on the same corpus."""
    references = {"1": ["a red circle on a white background"], "2": ["a blue square on a black background"],
                  "3": ["a green triangle on a grey background"]}  # fmt: skip
    same = cider({key: refs[0] for key, refs in references.items()}, references)[1]
    other = cider({**{key: refs[0] for key, refs in references.items()}, "1": "a blue square"}, references)[1]
    assert same["1"] > other["1"]
    assert same["2"] == pytest.approx(other["2"])


def test_cider_edge_cases():
    """One image scores 0 (idf = log 1 = 0, as in the COCO code), no images score 0, bad input raises."""
    assert cider({"a": "a cat"}, {"a": ["a cat"]}) == (0.0, {"a": 0.0})
    assert cider({}, {}) == (0.0, {})
    with pytest.raises(ValueError):
        cider({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError):
        cider({"a": "x"}, {"a": []})
