"""Scoring for `cosctl eval`: per-task metrics of predictions against LLaVA-format eval records, and an
image-free baseline to score the same way. Pure functions: no I/O, no torch.

Tasks and what scores them (`TASK_FAMILIES` maps dataset names onto these):

* vqa (vqav2, gqa, okvqa, textvqa, vizwiz): VQA accuracy after the official VQAv2 answer normalisation
  (`normalize_vqa_answer`); with several references the VQAv2 rule, else exact match;
* ocr: exact match after `normalize_text` (strip, case-fold, collapse whitespace; punctuation counts);
* refexp (refcoco, refcoco+, refcocog): IoU >= 0.5 between the predicted and reference boxes;
* caption (coco_caption, nocaps, flickr30k, textcaps): CIDEr-D over the task's records
  (`cosctl.evaluate.cider`; a task with one record scores 0, as in the COCO code) and SQuAD-style token F1;
* any other task: exact match after `normalize_text`, listed in `Scores.fallback_tasks`.

A record's references are its `answers` list when present (VQAv2's 10 human answers, several captions),
else the last `gpt` turn; its question is the human turn that turn answers. With several references,
ocr/refexp/token F1/fallback take the best match. Records and predictions meet by `str(record["id"])`.

A record's task is its `task` field; without one (LLaVA's files have none) it is read from LLaVA-1.5's
instructions in its question (`TASK_INSTRUCTIONS`: "Answer the question using a single word or
phrase." is vqa, a bounding-box request answered by a box is refexp, ...), else `default_task`. Eval
records and the records an image-free baseline counts get their tasks by this one rule (`infer_task`).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from cosctl.evaluate.cider import cider

TASK_FAMILIES = {
    **dict.fromkeys(["vqa", "vqav2", "gqa", "okvqa", "textvqa", "vizwiz"], "vqa"),
    **dict.fromkeys(["refexp", "refcoco", "refcoco+", "refcocog"], "refexp"),
    **dict.fromkeys(["caption", "coco_caption", "nocaps", "flickr30k", "textcaps"], "caption"),
    "ocr": "ocr",
}
REFEXP_IOU = 0.5
IOU_TOLERANCE = 1e-9  # boxes in percent become binary fractions: an IoU of exactly 0.5 may land at 0.4999...
QUESTION_TYPE_WORDS = 3  # VQAv2's question types ("how many", "what color is the") are 1-5 leading words
# LLaVA-1.5's task instructions, as its training mix (llava_v1_5_mix665k.json) and eval files write them,
# lower-cased: a question holding one is of that task (refexp only when the answer is a box).
TASK_INSTRUCTIONS = (
    ("answer the question using a single word or phrase", "vqa"),
    ("answer with the option's letter from the given choices directly", "vqa"),
    ("please provide the bounding box coordinate of the region this sentence describes", "refexp"),
    ("provide a one-sentence caption for the provided image", "caption"),
)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class EvalItem:
    """What scoring needs of one eval record; the prediction comes separately, keyed by `id`."""

    id: str
    task: str
    references: tuple[str, ...]
    question: str = ""


@dataclass
class Scores:
    """Per-record metric values (id -> {metric: value}), per-task aggregates (task -> {metric: mean,
    "num": count}), and the tasks scored by the exact-match fallback."""

    per_record: dict[str, dict[str, float]] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    fallback_tasks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The scores as one JSON-serialisable dict."""
        return {"tasks": self.tasks, "fallback_tasks": self.fallback_tasks, "per_record": self.per_record}


def infer_task(question: str, answer: str) -> str | None:
    """The task LLaVA-1.5's instruction in `question` names (`TASK_INSTRUCTIONS`), or None."""
    text = " ".join(question.lower().split())
    for instruction, task in TASK_INSTRUCTIONS:
        if instruction in text and (task != "refexp" or parse_box(answer) is not None):
            return task
    return None


def _question(text: str) -> str:
    return text.replace("<image>", "").strip()


def eval_items(records: list[dict], default_task: str = "unknown") -> list[EvalItem]:
    """EvalItems from LLaVA-format records: the question is the last human turn (the one the last gpt
    turn answers); a record without `task` gets the task its question's LLaVA instruction names
    (`infer_task`, judged on the last answer), else `default_task`."""
    items = []
    for record in records:
        turns = record["conversations"]
        last_answer = next(turn["value"] for turn in reversed(turns) if turn["from"] == "gpt")
        answers = record.get("answers")
        if answers is None:
            answers = [last_answer]
        elif isinstance(answers, str):
            answers = [answers]
        if not answers:
            raise ValueError(f"record {record['id']!r}: empty `answers`")
        question = _question(next((turn["value"] for turn in reversed(turns) if turn["from"] == "human"), ""))
        task = record.get("task") or infer_task(question, last_answer) or default_task
        items.append(EvalItem(str(record["id"]), task, tuple(answers), question))
    return items


def answer_items(records: list[dict], default_task: str = "unknown") -> list[EvalItem]:
    """Every question/answer turn pair of `records` (e.g. a training file) as an EvalItem, for an
    image-free baseline to count: the pair's task is the record's `task`, else the one its question's
    LLaVA instruction names (`infer_task`), else `default_task`, as `eval_items` assigns an eval
    record's. Text-only records (no `image`) ask nothing about an image and are left out."""
    items = []
    for record in records:
        if not record.get("image"):
            continue
        turns = record["conversations"]
        for number, (human, gpt) in enumerate(zip(turns[0::2], turns[1::2], strict=False)):
            question = _question(human["value"])
            task = record.get("task") or infer_task(question, gpt["value"]) or default_task
            items.append(EvalItem(f"{record.get('id')}#{number}", task, (gpt["value"],), question))
    return items


# ----------------------------------------------------------------------------------------- answers

# The official VQAv2 evaluation's tables (vqaEval.py). Its keys with a capital I or a straight apostrophe
# are left out: the evaluation lower-cases and drops straight apostrophes before looking words up, so
# they never match.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t", "dont": "don’t", "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve", "hasnt": "hasn’t", "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve",
    "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d", "howll": "how’ll", "hows": "how’s", "isnt": "isn’t",
    "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s", "maam": "ma’am",
    "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve", "oclock": "o’clock",
    "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at",
    "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s", "thered": "there’d",
    "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re", "theres": "there’s",
    "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve", "theyll": "they’ll",
    "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve",
    "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re",
    "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d", "wheres": "where's",
    "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve", "wholl": "who’ll",
    "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s", "wont": "won’t",
    "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve", "wouldn’tve": "wouldn’t’ve",
    "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll", "yall’d’ve": "y’all’d’ve",
    "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d", "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}  # fmt: skip
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # vqaEval's "(?!<=\d)(\.)(?!\d)": its leading lookahead always holds


def _vqa_punctuation(text: str) -> str:
    # vqaEval.processPunctuation: a mark next to a space (or any mark, once the text has a digit,digit
    # comma) is deleted, else replaced by a space; then every period not followed by a digit is deleted.
    deleted = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if deleted or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The official VQAv2 evaluation's answer processing: newlines/tabs to spaces, strip, punctuation
    (`_vqa_punctuation`), lower-case, number words to digits ("two" -> "2", "none" -> "0"), articles
    dropped, contractions map ("dont" -> "don’t"), words joined by one space. Like the evaluation it
    replaces a straight apostrophe inside a word by a space ("don't" -> "don t")."""
    text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQA accuracy after `normalize_vqa_answer` on both sides. One reference: exact match. Several: the
    VQAv2 rule, the mean over the leave-one-out subsets of min(#matches / 3, 1); with 10 answers, k
    matching give 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >= 4. The rule assumes ~10 answers: with fewer it
    stays below 1 (two matching references of two give 1/3). The official evaluation takes its reference
    answers pre-processed and only strips their punctuation; references here are raw text, so both sides
    get the full processing."""
    if not references:
        raise ValueError("vqa_accuracy: no references")
    answer = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(reference) == answer for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min((total - match) / 3, 1.0) for match in matches) / len(matches)


def normalize_text(text: str) -> str:
    """Light normalisation for exact match: strip, case-fold, every whitespace run to one space."""
    return " ".join(text.split()).casefold()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when `prediction` and `reference` are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def _squad_normalize(text: str) -> str:
    # SQuAD v1.1 evaluate.py: lower, drop punctuation, drop articles, collapse whitespace.
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1 after SQuAD normalisation; 1.0 when both sides are empty after it,
    0.0 when only one is."""
    pred, ref = _squad_normalize(prediction).split(), _squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------- boxes

_NUMBER = r"\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*"
_BOX = re.compile(r"[\[(]" + ",".join([_NUMBER] * 4) + r"[\])]")


def parse_box(text: str) -> Box | None:
    """The first `[x1, y1, x2, y2]` (or parenthesised) box in `text`, as fractions of the image side.

    Values written with a decimal point and all <= 1 are fractions already ([0.1, 0.2, 0.5, 0.6]);
    otherwise they are percent ([12, 40, 30, 62], the synthetic set's format, or [12.5, 40, 30, 62]).
    None when there is no box, a value lies outside the image, or the box is empty (x2 <= x1, y2 <= y1).
    """
    match = _BOX.search(text)
    if match is None:
        return None
    values = [float(value) for value in match.groups()]
    fractions = all(value <= 1.0 for value in values) and any("." in value for value in match.groups())
    x1, y1, x2, y2 = values if fractions else [value / 100.0 for value in values]
    if min(x1, y1) < 0.0 or max(x2, y2) > 1.0 or x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0.0 when they do not overlap."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


def refexp_iou(prediction: str, reference: str) -> float:
    """IoU of the predicted box with the reference box; 0.0 for an unparsable or empty prediction.
    Raises ValueError for an unparsable reference: that is a data error, not a model error."""
    truth = parse_box(reference)
    if truth is None:
        raise ValueError(f"reference {reference!r} holds no valid box")
    predicted = parse_box(prediction)
    return 0.0 if predicted is None else box_iou(predicted, truth)


def refexp_score(prediction: str, reference: str, threshold: float = REFEXP_IOU) -> float:
    """1.0 when the predicted box overlaps the reference box with IoU >= `threshold` (less
    `IOU_TOLERANCE`), else 0.0."""
    return float(refexp_iou(prediction, reference) >= threshold - IOU_TOLERANCE)


# ----------------------------------------------------------------------------------------- scoring


def _best(metric, prediction: str, references: tuple[str, ...]) -> float:
    return max(metric(prediction, reference) for reference in references)


def _score_task(family: str | None, items: list[EvalItem], predictions: dict[str, str]) -> tuple[dict, dict]:
    """Per-record values and the task's aggregate for the items of one task."""
    per_record: dict[str, dict[str, float]] = {}
    for item in items:
        prediction = predictions[item.id]
        if family == "vqa":
            per_record[item.id] = {"accuracy": vqa_accuracy(prediction, list(item.references))}
        elif family == "refexp":
            iou = _best(refexp_iou, prediction, item.references)
            per_record[item.id] = {"acc@0.5": float(iou >= REFEXP_IOU - IOU_TOLERANCE), "iou": iou}
        elif family == "caption":
            per_record[item.id] = {"token_f1": _best(token_f1, prediction, item.references)}
        else:  # ocr, and the fallback for unknown tasks
            per_record[item.id] = {"exact_match": _best(exact_match, prediction, item.references)}
    if family == "caption":
        _, per_image = cider({item.id: predictions[item.id] for item in items},
                             {item.id: list(item.references) for item in items})  # fmt: skip
        for key, value in per_image.items():
            per_record[key] = {"cider": value, **per_record[key]}
    names = next(iter(per_record.values())).keys()
    aggregate = {name: math.fsum(values[name] for values in per_record.values()) / len(items) for name in names}
    if "iou" in aggregate:
        aggregate["mean_iou"] = aggregate.pop("iou")
    return per_record, {**aggregate, "num": len(items)}


def score(items: list[EvalItem], predictions: dict[str, str]) -> Scores:
    """Score `predictions` (id -> generated text) against `items`, task by task (see the module
    docstring). Ids must be unique and every item needs a prediction; predictions for other ids are
    ignored. Tasks appear in the order of their first item."""
    duplicates = sorted(key for key, count in Counter(item.id for item in items).items() if count > 1)
    if duplicates:
        raise ValueError(f"{len(duplicates)} eval id(s) occur more than once, e.g. {duplicates[:3]}")
    missing = [item.id for item in items if item.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} eval item(s), e.g. {missing[:3]}")
    by_task: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        by_task[item.task].append(item)
    scores = Scores()
    for task, task_items in by_task.items():
        family = TASK_FAMILIES.get(task)
        per_record, scores.tasks[task] = _score_task(family, task_items, predictions)
        scores.per_record.update(per_record)
        if family is None:
            scores.fallback_tasks.append(task)
    return scores


# ---------------------------------------------------------------------------------------- baseline


def question_type(question: str) -> str:
    """The first `QUESTION_TYPE_WORDS` words of the question, lower-cased, punctuation and `<image>`
    removed: "How many circles are there?" -> "how many circles"."""
    text = question.replace("<image>", " ").lower()
    text = "".join(" " if char in string.punctuation else char for char in text)
    return " ".join(text.split()[:QUESTION_TYPE_WORDS])


def tasks_without_answers(items: list[EvalItem], source: list[EvalItem]) -> list[str]:
    """The tasks of `items` (in order of first appearance) for which `source` holds no answer: an
    image-free baseline counted over `source` would answer them with nothing."""
    counted = {item.task for item in source}
    return [task for task in dict.fromkeys(item.task for item in items) if task not in counted]


def _answer_key(task: str, answer: str) -> str:
    return normalize_vqa_answer(answer) if TASK_FAMILIES.get(task) == "vqa" else normalize_text(answer)


def _most_common(task: str, answers: Counter, raw: dict[tuple[str, str], str]) -> str:
    # Highest count first, then the smallest normalised answer: independent of the items' order.
    key = min(answers, key=lambda answer: (-answers[answer], answer))
    return raw[task, key]


def baseline_predictions(items: list[EvalItem], source: list[EvalItem] | None = None) -> dict[str, str]:
    """An image-free baseline: for each item, the most common reference answer among the `source` items
    (default: `items` themselves, the item included) of the same task and `question_type`, else of the
    same task, else "". Answers are counted by their normalised form (VQA normalisation for VQA tasks,
    `normalize_text` otherwise), each of an item's references once (VQAv2's 10 answers count 10
    times); each normalised answer is represented by its smallest raw spelling in that task. Score the
    result with `score`, next to the model's predictions: the gap is what the image contributes."""
    by_type: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_task: dict[str, Counter] = defaultdict(Counter)
    raw: dict[tuple[str, str], str] = {}
    for item in items if source is None else source:
        for answer in item.references:
            key = _answer_key(item.task, answer)
            raw[item.task, key] = min(raw.get((item.task, key), answer), answer)
            by_type[item.task, question_type(item.question)][key] += 1
            by_task[item.task][key] += 1
    predictions = {}
    for item in items:
        answers = by_type.get((item.task, question_type(item.question))) or by_task.get(item.task)
        predictions[item.id] = _most_common(item.task, answers, raw) if answers else ""
    return predictions
