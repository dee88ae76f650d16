"""Caption scoring: CIDEr-D as computed by the COCO caption evaluation (`pycocoevalcap` 1.2,
`cider/cider_scorer.py`), and a pure-Python stand-in for the Stanford PTBTokenizer it runs first.

Reimplemented rather than imported: pycocoevalcap's wheel is ~100 MB of Java jars (METEOR, SPICE, the
PTB tokenizer) around ~150 lines of Python, and pulls in pycocotools. The numbers match it to float
rounding, quirks included:

* n-grams n = 1..4, tf-idf vectors with idf = log(N) - log(max(1, df)), where N is the number of images
  in the set and df the number of images whose references contain the n-gram (a one-image set scores 0);
* per n, the cosine with each reference uses clipped products min(hyp, ref) * ref and is multiplied by
  exp(-delta^2 / (2 sigma^2)), sigma = 6, with delta the difference in *bigram* counts (the COCO code
  counts lengths with its 0-based n == 1 test, i.e. words - 1, floored at 0);
* an image's score is the mean over n, averaged over its references, times 10; the corpus score is the
  mean over images.

`ptb_tokenize` mimics `PTBTokenizer -preserveLines -lowerCase` followed by the COCO punctuation filter
for the common cases (checked against Stanford CoreNLP 3.4.1): lower-case; curly quotes and apostrophes
normalised; double quotes, quote-like apostrophes, , . ; : ? ! - -- ... dropped (kept inside numbers
such as 3,000, 2.5 and 5:30, and in letter-dot abbreviations such as e.g. or u.s.); clitics split
(does n't, ca n't, wo n't, it 's, we 're, i 've, they 'd, i 'm, you 'll); "cannot", "gonna", "wanna"
and "gotta" split in two; brackets become -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (the COCO filter compares
before lower-casing, so it keeps them); runs such as ?! or !!! and a split-off $ or % stay as tokens.
Not covered: PTB's abbreviation list (mr. becomes mr), and its splitting of units off numbers (5pm).
"""

from __future__ import annotations

import math
import re
from collections import Counter

CIDER_N = 4
CIDER_SIGMA = 6.0

_TRANSLATE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_IRREGULAR_NT = {"can't": ("ca", "n't"), "won't": ("wo", "n't"), "ain't": ("ai", "n't")}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'d|'m|'re|'ve|'ll)$")  # the suffixes in _CLITICS
_ABBREVIATION = re.compile(r"^(?:[a-z]\.){2,}$")
_LEADING = re.compile(r"^(['`]+|\$)(.+)$")
_TRAILING = re.compile(r"^(.*?)([.,;:?!'`%]+)$")
_CLITICS = {"n't", "'s", "'d", "'m", "'re", "'ve", "'ll"}
_DROPPED = {"'", "''", "`", "``", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _split_word(word: str) -> list[str]:
    """One whitespace-free chunk (quotes and brackets already separated) as PTB tokens, before filtering."""
    if _ABBREVIATION.match(word) or word in _CLITICS:
        return [word]
    leading = _LEADING.match(word)
    if leading:
        return [leading.group(1), *_split_word(leading.group(2))]
    trailing = _TRAILING.match(word)
    if trailing and trailing.group(1):
        head, tail = trailing.groups()
        if tail.startswith(".") and _ABBREVIATION.match(head + "."):  # "u.s.a." and "e.g." keep their dot
            head, tail = head + ".", tail[1:]
        return [*_split_word(head), *_split_punctuation(tail)] if tail else [head]
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if word in _IRREGULAR_NT:
        return list(_IRREGULAR_NT[word])
    clitic = _CLITIC.match(word)
    return [clitic.group(1), clitic.group(2)] if clitic else [word]


def _split_punctuation(run: str) -> list[str]:
    """A run of trailing punctuation as PTB groups it: '.'-runs, ?/! runs, and every other mark alone."""
    return re.findall(r"\.+|[?!]+|.", run)


def ptb_tokenize(text: str) -> str:
    """`text` tokenised like the COCO caption evaluation's PTBTokenizer, tokens joined by one space."""
    text = text.translate(_TRANSLATE).lower().replace('"', " ")
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    tokens = [token for chunk in text.split() for token in _split_word(chunk)]
    return " ".join(token for token in tokens if token not in _DROPPED)


def _ngrams(tokens: list[str], n: int = CIDER_N) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, doc_freq: Counter, log_num_images: float) -> tuple[list[dict], list[float], int]:
    """Per-n tf-idf vectors, their norms, and the length the COCO code uses (the number of bigrams)."""
    vectors: list[dict] = [{} for _ in range(CIDER_N)]
    for ngram, tf in counts.items():
        vectors[len(ngram) - 1][ngram] = tf * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
    norms = [math.sqrt(sum(value * value for value in vector.values())) for vector in vectors]
    return vectors, norms, sum(tf for ngram, tf in counts.items() if len(ngram) == 2)


def _similarity(hyp: tuple, ref: tuple) -> float:
    """Mean over n of the clipped, length-penalised cosine between a candidate and one reference."""
    (hyp_vecs, hyp_norms, hyp_len), (ref_vecs, ref_norms, ref_len) = hyp, ref
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * CIDER_SIGMA**2))
    total = 0.0
    for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms, strict=True):
        dot = sum(min(value, ref_vec.get(ngram, 0.0)) * ref_vec.get(ngram, 0.0) for ngram, value in hyp_vec.items())
        if hyp_norm != 0 and ref_norm != 0:
            dot /= hyp_norm * ref_norm
        total += dot * penalty
    return total / CIDER_N


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    """CIDEr-D of `predictions` against `references` (same keys, raw text, tokenised here with
    `ptb_tokenize`): the corpus score and the per-image scores. Document frequencies come from the
    references of exactly these images, so scores depend on the whole set; an empty set scores 0."""
    if predictions.keys() != references.keys():
        raise ValueError("cider: predictions and references must have the same ids")
    if any(not refs for refs in references.values()):
        raise ValueError("cider: every image needs at least one reference")
    if not predictions:
        return 0.0, {}
    ref_counts = {key: [_ngrams(ptb_tokenize(ref).split()) for ref in refs] for key, refs in references.items()}
    doc_freq = Counter(ngram for counts in ref_counts.values() for ngram in set().union(*counts))
    log_num_images = math.log(len(predictions))
    per_image = {}
    for key, prediction in predictions.items():
        hyp = _tfidf(_ngrams(ptb_tokenize(prediction).split()), doc_freq, log_num_images)
        refs = [_tfidf(counts, doc_freq, log_num_images) for counts in ref_counts[key]]
        per_image[key] = 10.0 * sum(_similarity(hyp, ref) for ref in refs) / len(refs)
    return sum(per_image.values()) / len(per_image), per_image
