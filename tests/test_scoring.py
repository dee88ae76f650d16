"""Scoring for `cosctl eval` (cosctl.evaluate.scoring, cosctl.evaluate.cider): hand-made cases with known answers."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from cosctl.evaluate.cider import cider, ptb_tokenize
from cosctl.evaluate.scoring import (
    EvalItem,
    answer_items,
    baseline_predictions,
    box_iou,
    eval_items,
    exact_match,
    infer_task,
    normalize_text,
    normalize_vqa_answer,
    parse_box,
    question_type,
    refexp_iou,
    refexp_score,
    score,
    tasks_without_answers,
    token_f1,
    vqa_accuracy,
)


def _record(sample_id, task, question, answer, **extra) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    record = {"id": sample_id, "image": f"images/{sample_id}.png", "conversations": turns, **extra}
    return record if task is None else {**record, "task": task}


# ------------------------------------------------------------------------------ VQA normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("YES", "yes"),  # case
        ("yes.", "yes"),  # a period not followed by a digit is dropped
        ("3.5", "3.5"),  # ... one followed by a digit stays
        ("e.g.", "eg"),
        ("red, blue", "red blue"),  # a mark next to a space is deleted
        ("red,blue", "red blue"),  # ... one inside a word becomes a space
        ("3,000", "3000"),  # digit,digit: every mark is deleted
        ("(red)", "red"),
        ("hot-dog", "hot-dog"),  # '-' is not in the evaluation's list
        ("a red circle", "red circle"),  # articles
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("two", "2"),  # number words
        ("Ten apples", "10 apples"),
        ("none", "0"),
        ("dont", "don’t"),  # contractions map
        ("isnt", "isn’t"),
        ("don't", "don t"),  # the straight apostrophe becomes a space first, as in vqaEval.py
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    """The official VQAv2 answer processing: case, punctuation rules, articles, numbers, contractions."""
    assert normalize_vqa_answer(raw) == expected


# ---------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matching, expected):
    """VQAv2 rule with 10 answers: k matching answers give 0.3 k up to k = 3 and 1.0 from k = 4."""
    references = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", references) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    """References and prediction are compared after normalisation ("Two" == "2", "the dog" == "dog")."""
    assert vqa_accuracy("2", ["Two"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0


def test_vqa_accuracy_single_reference_is_exact_match():
    """One reference: normalised exact match, 1.0 or 0.0."""
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0


def test_vqa_accuracy_few_references_use_the_vqa_rule():
    """Two matching references of two: each leave-one-out subset has one match, so 1/3."""
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


# ----------------------------------------------------------------------------------- exact match


def test_exact_match_normalisation():
    """OCR exact match ignores surrounding space, case and whitespace runs, but not punctuation."""
    assert normalize_text("  Hello \n  World ") == "hello world"
    assert exact_match(" Hello   World ", "hello world") == 1.0
    assert exact_match("STRASSE", "straße") == 1.0  # case-folded, not just lower-cased
    assert exact_match("hello world.", "hello world") == 0.0


# ------------------------------------------------------------------------------------------ boxes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[12, 40, 30, 62]", (0.12, 0.40, 0.30, 0.62)),  # integer percent, the synthetic set's format
        ("[0.1, 0.2, 0.5, 0.6]", (0.1, 0.2, 0.5, 0.6)),  # fractions
        ("The box is [0.1, 0.2, 0.5, 0.6].", (0.1, 0.2, 0.5, 0.6)),  # inside text
        ("(10, 20, 50, 60)", (0.1, 0.2, 0.5, 0.6)),
        ("[12.5, 40, 30, 62]", (0.125, 0.40, 0.30, 0.62)),  # decimals above 1 are percent
        ("[0, 0, 1, 1]", (0.0, 0.0, 0.01, 0.01)),  # integers are percent even when <= 1
        ("first [1, 2, 3, 4] then [5, 6, 7, 8]", (0.01, 0.02, 0.03, 0.04)),
    ],
)
def test_parse_box(text, expected):
    """Boxes parse to fractions of the image side from percent integers, fractions, or inside text."""
    assert parse_box(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "no box here",
        "",
        "[1, 2, 3]",
        "[a, b, c, d]",
        "[30, 40, 12, 62]",
        "[10, 10, 10, 20]",
        "[10, 10, 120, 50]",
        "[-5, 10, 20, 30]",
        "[0.5, 0.5, 0.2, 0.9]",
    ],
)
def test_parse_box_rejects(text):
    """Missing, malformed, out-of-image and empty (x2 <= x1 or y2 <= y1) boxes parse to None."""
    assert parse_box(text) is None


def test_box_iou():
    """IoU: 1 for identical boxes, 0 for disjoint or edge-touching ones, 1/7 for a one-cell overlap."""
    assert box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)


def test_refexp_score():
    """acc@0.5: a hit at IoU >= 0.5 (exactly 0.5 included), a miss below, mixed formats compared."""
    assert refexp_score("[12, 40, 30, 62]", "[12, 40, 30, 62]") == 1.0
    assert refexp_score("It is at [0.12, 0.40, 0.30, 0.62].", "[12, 40, 30, 62]") == 1.0
    assert refexp_score("[0, 0, 50, 100]", "[0, 0, 100, 100]") == 1.0  # IoU exactly 0.5
    assert refexp_iou("[20, 0, 60, 40]", "[0, 0, 40, 40]") == pytest.approx(1 / 3)
    assert refexp_score("[20, 0, 60, 40]", "[0, 0, 40, 40]") == 0.0
    assert refexp_score("[20, 0, 60, 40]", "[0, 0, 40, 40]", threshold=0.3) == 1.0


def test_refexp_bad_prediction_scores_zero():
    """An unparsable or degenerate predicted box is a miss, never an exception."""
    assert refexp_score("the red circle", "[12, 40, 30, 62]") == 0.0
    assert refexp_score("[30, 40, 12, 62]", "[12, 40, 30, 62]") == 0.0
    assert refexp_iou("[12, 40, 12, 62]", "[12, 40, 30, 62]") == 0.0


def test_refexp_bad_reference_raises():
    """A reference without a valid box is a data error and raises ValueError."""
    with pytest.raises(ValueError, match="no valid box"):
        refexp_score("[12, 40, 30, 62]", "somewhere")


# ------------------------------------------------------------------------------------- token F1


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("a red circle", "The red circle.", 1.0),  # articles, case and punctuation ignored
        ("red square", "red circle", 0.5),
        ("red red circle", "red circle on white", 4 / 7),  # P = 2/3, R = 1/2
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("the", "cat", 0.0),  # nothing left of the prediction
    ],
)
def test_token_f1(prediction, reference, expected):
    """SQuAD-style bag-of-tokens F1 with hand-computed precision/recall."""
    assert token_f1(prediction, reference) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ CIDEr-D


@pytest.mark.parametrize(
    "raw, expected",  # expected: Stanford PTBTokenizer (CoreNLP 3.4.1) + the COCO punctuation filter
    [
        (
            'a small red circle, a blue square on a white background, with the text "HELLO"',
            "a small red circle a blue square on a white background with the text hello",
        ),
        (
            "The man's dog doesn't like (big) cats... really?!",
            "the man 's dog does n't like -lrb- big -rrb- cats really ?!",
        ),
        (
            "It costs $3.50 -- or 3,000 yen; isn't it: great? e.g. U.S.A. o'clock",
            "it costs $ 3.50 or 3,000 yen is n't it great e.g. u.s.a. o'clock",
        ),
        (
            "Two dogs' toys weren't there - they'd gone. 'quoted' `tick`",
            "two dogs toys were n't there they 'd gone quoted tick",
        ),
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
    """ "cat" against "a cat": unigram cosine 1, no bigrams, lengths (in bigrams) 0 vs 1, so
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


# ---------------------------------------------------------------------------------- records, score


def test_eval_items_from_records():
    """References are `answers` when present, else the last gpt turn; the question is the human turn
    that turn answers, without `<image>`."""
    multi_turn = _record("m", "vqa", "What colour?", "red")
    multi_turn["conversations"] += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]
    items = eval_items([_record("a", "vqa", "Is it red?", "yes", answers=["yes"] * 9 + ["no"]), multi_turn,
                        _record("c", None, "What is it?", "cat")])  # fmt: skip
    assert items[0] == EvalItem("a", "vqa", ("yes",) * 9 + ("no",), "Is it red?")
    assert items[1].references == ("circle",) and items[1].question == "And the shape?"
    assert items[2].task == "unknown"
    assert eval_items([_record("c", None, "q", "cat")], default_task="vqa")[0].task == "vqa"
    with pytest.raises(ValueError, match="empty"):
        eval_items([_record("d", "vqa", "q", "a", answers=[])])


def test_score_all_tasks():
    """Per-record values and per-task aggregates for vqa, ocr, refexp and caption records."""
    items = [
        EvalItem("v1", "vqa", ("2",) * 2 + ("3",) * 8, "How many?"),
        EvalItem("v2", "vqa", ("yes",), "Is there?"),
        EvalItem("o1", "ocr", ("Cos 42",), "Read."),
        EvalItem("r1", "refexp", ("[0, 0, 40, 40]",), "Where?"),
        EvalItem("r2", "refexp", ("[12, 40, 30, 62]",), "Where?"),
        EvalItem("c1", "caption", ("a cat",), "Describe."),
        EvalItem("c2", "caption", ("a dog",), "Describe."),
    ]
    predictions = {"v1": "two", "v2": "Yes", "o1": "cos  42", "r1": "[20, 0, 60, 40]", "r2": "[12, 40, 30, 62]",
                   "c1": "a cat", "c2": "a cat", "unused": "x"}  # fmt: skip
    scores = score(items, predictions)
    assert scores.tasks["vqa"] == {"accuracy": pytest.approx((0.6 + 1.0) / 2), "num": 2}
    assert scores.tasks["ocr"] == {"exact_match": 1.0, "num": 1}
    assert scores.tasks["refexp"] == {"acc@0.5": 0.5, "mean_iou": pytest.approx((1 / 3 + 1) / 2), "num": 2}
    assert scores.tasks["caption"] == {"cider": pytest.approx(2.5), "token_f1": 0.5, "num": 2}
    assert scores.per_record["c1"] == {"cider": pytest.approx(5.0), "token_f1": 1.0}
    assert scores.per_record["r1"] == {"acc@0.5": 0.0, "iou": pytest.approx(1 / 3)}
    assert scores.fallback_tasks == []
    assert set(scores.to_dict()) == {"tasks", "fallback_tasks", "per_record"}


def test_score_unknown_task_falls_back_to_exact_match():
    """An unknown task is scored by normalised exact match (best over references) and listed as such."""
    items = [EvalItem("a", "counting", ("Three", "3"), "q"), EvalItem("b", "counting", ("four",), "q"),
             EvalItem("c", "gqa", ("left",), "q")]  # fmt: skip
    scores = score(items, {"a": " three ", "b": "4", "c": "Left"})
    assert scores.tasks["counting"] == {"exact_match": 0.5, "num": 2}
    assert scores.tasks["gqa"] == {"accuracy": 1.0, "num": 1}
    assert scores.fallback_tasks == ["counting"]


def test_score_requires_unique_ids_and_every_prediction():
    """A missing prediction or a repeated id is an error that names the id."""
    with pytest.raises(ValueError, match="'b'"):
        score([EvalItem("a", "vqa", ("x",)), EvalItem("b", "vqa", ("y",))], {"a": "x"})
    with pytest.raises(ValueError, match="more than once.*'a'"):
        score([EvalItem("a", "vqa", ("x",)), EvalItem("a", "ocr", ("y",))], {"a": "x"})


# -------------------------------------------------------------------------------------- baseline


def test_question_type():
    """The question type is the first three words, lower-cased, without punctuation or <image>."""
    assert question_type("<image>\nHow many circles are there?") == "how many circles"
    assert question_type("Is there a red square?") == "is there a"
    assert question_type("Why?") == "why"


def test_records_without_task_are_typed_by_llava_instructions():
    """A record without `task` takes the task its question's LLaVA-1.5 instruction names (a box request
    only when answered by a box), else the default; its own `task` always wins."""
    suffix = "\nAnswer the question using a single word or phrase."
    box_request = "Please provide the bounding box coordinate of the region this sentence describes: the dog."
    records = [
        _record("v", None, "What colour is the bus?" + suffix, "Red"),
        _record("r", None, box_request, "[0.12, 0.3, 0.55, 0.9]"),
        _record("n", None, box_request, "the dog on the left"),
        _record("c", None, "Provide a one-sentence caption for the provided image.", "A dog."),
        _record("m", None, "A\nAnswer with the option's letter from the given choices directly.", "B"),
        _record("t", "ocr", "What is the title of this book?" + suffix, "Emma"),
        _record("u", None, "Describe the image in detail.", "A long text."),
    ]
    assert [item.task for item in eval_items(records)] == [
        "vqa",
        "refexp",
        "unknown",
        "caption",
        "vqa",
        "ocr",
        "unknown",
    ]
    assert infer_task("how many?  ANSWER THE QUESTION USING A SINGLE WORD OR PHRASE.", "2") == "vqa"


def test_answer_items_count_every_turn_of_image_records_as_eval_types_them():
    """A training file's answers for the baseline: one item per question/answer pair of each record with
    an image (ids may repeat across records), typed by the rule `eval_items` uses; text-only records
    add nothing; `tasks_without_answers` names the eval tasks left with none."""
    suffix = "\nAnswer the question using a single word or phrase."
    vqa = _record("1", None, "How many dogs?" + suffix, "2")
    vqa["conversations"] += [{"from": "human", "value": "Is it red?" + suffix}, {"from": "gpt", "value": "No"}]
    same_id = _record("1", None, "How many cats?" + suffix, "3")
    text_only = {"id": "sg_0", "model": "", "conversations": [{"from": "human", "value": "Hi" + suffix},
                                                                {"from": "gpt", "value": "Hello"}]}  # fmt: skip
    items = answer_items([vqa, same_id, text_only])
    assert [(item.task, item.question, item.references) for item in items] == [
        ("vqa", "How many dogs?" + suffix, ("2",)),
        ("vqa", "Is it red?" + suffix, ("No",)),
        ("vqa", "How many cats?" + suffix, ("3",)),
    ]
    wanted = eval_items([_record("e", "vqa", "How many dogs are there?", "2"), _record("o", "ocr", "q", "a")])
    assert tasks_without_answers(wanted, items) == ["ocr"]
    assert baseline_predictions(wanted[:1], source=items) == {"e": "2"}


def test_baseline_predictions():
    """Most common answer per (task, question type); ties go to the smallest normalised answer; unseen
    types fall back to the task's most common answer, unseen tasks to ""."""
    items = [
        EvalItem("1", "vqa", ("2",), "How many circles are there?"),
        EvalItem("2", "vqa", ("Two",), "How many circles are there?"),
        EvalItem("3", "vqa", ("3",), "How many circles are there?"),
        EvalItem("4", "vqa", ("yes",), "Is there a red square?"),
        EvalItem("5", "vqa", ("no",), "Is there a blue circle?"),
        EvalItem("6", "refexp", ("[1, 2, 3, 4]",), "Give the box of the red circle."),
    ]
    predictions = baseline_predictions(items)
    assert predictions == {"1": "2", "2": "2", "3": "2", "4": "no", "5": "no", "6": "[1, 2, 3, 4]"}
    unseen = [EvalItem("7", "vqa", ("x",), "What colour is it?"), EvalItem("8", "ocr", ("x",), "Read.")]
    assert baseline_predictions(unseen, source=items) == {"7": "2", "8": ""}


def test_baseline_is_order_independent_and_scored_like_a_model():
    """The baseline does not depend on item order, and `score` rates it below correct answers."""
    items = [EvalItem(str(i), "vqa", (answer,), "Is there a circle?") for i, answer in enumerate("yes yes no".split())]
    assert baseline_predictions(items) == baseline_predictions(items[::-1])
    baseline = score(items, baseline_predictions(items)).tasks["vqa"]["accuracy"]
    assert baseline == pytest.approx(2 / 3)
    assert score(items, {item.id: item.references[0] for item in items}).tasks["vqa"]["accuracy"] == 1.0


def test_synthetic_records_score_perfectly():
    """The built-in synthetic set's own answers score 1.0 on vqa, ocr and refexp, and their captions
    beat the image-free baseline's on CIDEr."""
    from cosctl.data.synth import make_sample

    records = [make_sample(seed=0, index=index, image_size=64)[0] for index in range(60)]
    items = eval_items(records)
    assert {item.task for item in items} == {"vqa", "ocr", "refexp", "caption"}
    scores = score(items, {item.id: item.references[0] for item in items})
    assert scores.tasks["vqa"]["accuracy"] == 1.0
    assert scores.tasks["ocr"]["exact_match"] == 1.0
    assert scores.tasks["refexp"]["acc@0.5"] == 1.0
    assert scores.tasks["caption"]["token_f1"] == 1.0
    baseline = score(items, baseline_predictions(items))
    assert baseline.tasks["caption"]["cider"] < scores.tasks["caption"]["cider"]
    assert baseline.tasks["refexp"]["acc@0.5"] < 1.0


def test_scoring_imports_neither_torch_nor_numpy():
    """cosctl.evaluate.scoring is pure Python: importing it loads no torch and no numpy."""
    code = "import sys, cosctl.evaluate.scoring\nassert not {'torch', 'numpy'} & set(sys.modules), 'heavy import'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
