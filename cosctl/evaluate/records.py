"""Eval records: reading and checking a LLaVA-format file, and each record's generation prompt.

A record is a training record whose last `gpt` turn is the reference (`{"id", "image"?, "task"?,
"answers"?, "conversations": [human, gpt, ..., human, gpt]}`); one without `image` (LLaVA-1.5's
text-only ShareGPT records) is generated for from its text alone. Its prompt is the conversation up to
and including the last human turn, followed by "ASSISTANT: ", tokenised by
`cosctl.data.conversation.encode_conversation` itself: the prompt ids are exactly the ids training produced
for the same conversation, cut where the last answer's labels start.

Eval numbers must cover the whole file, so a bad record is not skipped: `check_records` raises one
`DataError` naming how many records are bad, why, and the first ids.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cos_model import IGNORE_INDEX
from cos_model.chat import render

from ..common.errors import DataError
from ..common.log import log
from ..data.conversation import conversation_problem, encode_conversation, record_image
from ..data.images import ImageSource
from ..data.records import read_records, resolve_image_path
from .scoring import TASK_FAMILIES, eval_items, parse_box

MAX_REPORTED_IDS = 5


@dataclass(frozen=True)
class EvalPrompt:
    """One record ready for generation: `input_ids` hold the prompt with the image placeholder expanded
    to the visual-token slots; `text` is the rendered prompt with the placeholder as written; `image`
    is None for a text-only record."""

    id: str
    task: str
    image: Path | None
    input_ids: tuple[int, ...]
    text: str
    reference: str


def _is_answer_list(answers) -> bool:
    if isinstance(answers, str):
        return bool(answers)
    return isinstance(answers, list) and bool(answers) and all(isinstance(a, str) for a in answers)


def image_source(image_root: str | Path | ImageSource) -> ImageSource:
    """Where eval images are read from: a folder or an `s3://` root (`cosctl.data.images.ImageSource`)."""
    return image_root if isinstance(image_root, ImageSource) else ImageSource(image_root)


def _record_problem(record, seen: set[str], images: ImageSource | None, checked: dict) -> str | None:
    if not isinstance(record, dict):
        return "not_a_mapping"
    if "id" not in record:
        return "no_id"
    if str(record["id"]) in seen:
        return "duplicate_id"
    seen.add(str(record["id"]))
    problem = conversation_problem(record)
    if problem is not None:
        return problem
    answers = record.get("answers")
    if answers is not None and not _is_answer_list(answers):
        return "bad_answers"
    item = eval_items([record])[0]
    if TASK_FAMILIES.get(item.task) == "refexp" and any(parse_box(ref) is None for ref in item.references):
        return "reference_without_box"
    image = record_image(record)
    if image is not None and images is not None:
        if image not in checked:
            checked[image] = images.problem(image)
        return checked[image]
    return None


def check_records(
    records: list,
    source: str,
    image_root: str | Path | ImageSource | None = None,
    *,
    skip_bad: bool = False,
    limit: int | None = None,
) -> list[dict]:
    """The records that can be evaluated: a mapping with an id, unique; a training-valid conversation;
    `answers`, when present, a non-empty list of strings; a box in each reference of a
    referring-expression task; its image, if it has one, readable under `image_root` (a folder, an
    `s3://` root or an `ImageSource`) when one is given. Text-only records are evaluated too.

    A bad record raises a `DataError` naming the problems and the first bad ids, unless `skip_bad`:
    then bad records are left out with a warning, and checking stops at `limit` good ones."""
    good: list[dict] = []
    bad: Counter[str] = Counter()
    bad_ids: list[str] = []
    seen: set[str] = set()
    checked: dict[str, str | None] = {}
    images = None if image_root is None else image_source(image_root)
    for index, record in enumerate(records):
        if skip_bad and limit is not None and len(good) == limit:
            break
        problem = _record_problem(record, seen, images, checked)
        if problem is None:
            good.append(record)
            continue
        bad[problem] += 1
        if len(bad_ids) < MAX_REPORTED_IDS:
            bad_ids.append(str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}")
    if bad:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()))
        checked = len(good) + sum(bad.values())
        message = (
            f"{source}: {sum(bad.values())} of {checked} records cannot be evaluated ({reasons}; first: "
            f"{', '.join(bad_ids)})"
        )
        if not skip_bad:
            raise DataError(message)
        log.warning(f"{message}; they are left out")
    return good


def load_eval_records(
    path: str | Path,
    image_root: str | Path | ImageSource | None = None,
    limit: int | None = None,
    *,
    skip_bad: bool = False,
) -> list[dict]:
    """The first `limit` (all when None) records of a LLaVA-format JSON file, checked by `check_records`;
    with `skip_bad`, the first `limit` good ones (the training loop's held-out samples)."""
    records = read_records(Path(path))
    if limit is not None and not skip_bad:
        records = records[:limit]
    return check_records(records, str(path), image_root, skip_bad=skip_bad, limit=limit)


def load_answer_records(path: str | Path) -> list[dict]:
    """The records of a LLaVA-format JSON file (e.g. the training set) whose answers an image-free
    baseline may count: every training-valid conversation. Ids may repeat (LLaVA's files give the
    records of one image one id) and images are not read; others are left out with a warning."""
    records = read_records(Path(path))
    bad: Counter[str] = Counter()
    good = []
    for record in records:
        problem = "not_a_mapping" if not isinstance(record, dict) else conversation_problem(record)
        if problem is None:
            good.append(record)
        else:
            bad[problem] += 1
    if bad:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(bad.items()))
        log.warning(f"{path}: {sum(bad.values())} of {len(records)} records left out of the baseline ({reasons})")
    return good


def render_prompt(turns: list[dict], bos: str, eos: str) -> str:
    """The prompt as text under the training chat template (`<image>` as written)."""
    pairs = [(human["value"], gpt["value"]) for human, gpt in zip(turns[0::2], turns[1::2], strict=True)]
    return render(pairs[:-1] + [(pairs[-1][0], None)], bos, eos)


def build_prompt(
    record: dict, tokenizer, num_visual_tokens: int, image_root: str | Path, default_task: str = "unknown"
) -> EvalPrompt:
    """The generation prompt of a checked record: the training ids of its conversation up to where the
    last answer's labels begin."""
    turns = record["conversations"]
    input_ids, labels = encode_conversation(turns, tokenizer, num_visual_tokens)
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    text = render_prompt(turns, tokenizer.bos_token or "", tokenizer.eos_token)
    image = record_image(record)
    return EvalPrompt(
        str(record["id"]),
        record.get("task") or default_task,
        None if image is None else resolve_image_path(image_root, image),
        tuple(input_ids[:start]),
        text,
        turns[-1]["value"],
    )
