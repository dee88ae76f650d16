"""Data sets shaped like users' LLaVA files, built from the synthetic set's images and tokenizer.

LLaVA-1.5's `llava_v1_5_mix665k.json` mixes image conversations (one `<image>` in the first human
turn, at its start or its end, often several turns) with text-only ShareGPT conversations (no
`image` key, a `model` key). `write_llava_set` writes such a file next to copies of the images,
with JPEGs re-encoded by PIL and, optionally, one JPEG cut short (it passes `Image.verify()` but does
not decode).

`write_llava665k_set(out_dir, synth_dir, num_records, seed) -> Path` writes the published mix's shape
in full (`llava665k_records`): blocks of records on one image in a row (VQA, OCR-VQA, RefCOCO boxes as
fractions), runs of text-only records, over-long records, ids shared by the records of one image and
no `task` field.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path

from PIL import Image

LONG_ANSWER = "The scene shows shapes of several colours placed apart on a plain background. " * 12


def truncated_jpeg(source: Path, target: Path) -> None:
    """`source` saved as a JPEG by PIL, then cut to 60% of its bytes (as an interrupted download)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as image:
        image.convert("RGB").save(target, "JPEG", quality=90)
    data = target.read_bytes()
    target.write_bytes(data[: int(len(data) * 0.6)])
    with Image.open(target) as image:
        image.verify()  # the header survives: verify() passes; decoding the pixels does not


def llava_records(synth_records: list[dict]) -> list[dict]:
    """Records in LLaVA-1.5's shapes from synthetic ones: single-turn, multi-turn with `<image>` at
    the end of the first turn, text-only (ShareGPT-style), and a long multi-turn one."""
    records = []
    for index, record in enumerate(synth_records):
        question, answer = (turn["value"] for turn in record["conversations"])
        image = "coco/train2017/" + Path(record["image"]).with_suffix(".jpg").name
        kind = index % 4
        if kind == 0:  # as published for COCO: <image> first, then the question
            records.append({"id": record["id"], "image": image, "conversations": record["conversations"]})
        elif kind == 1:  # multi-turn, <image> at the end of the first human turn
            text = question.replace("<image>", "").strip()
            records.append(
                {
                    "id": record["id"],
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": f"{text}\n<image>"},
                        {"from": "gpt", "value": answer},
                        {"from": "human", "value": "Are you sure?"},
                        {"from": "gpt", "value": f"Yes. {answer}"},
                    ],
                }
            )
        elif kind == 2:  # text-only, as LLaVA-1.5's ShareGPT part
            records.append(
                {
                    "id": f"sharegpt-{index}",
                    "model": "",
                    "conversations": [
                        {"from": "human", "value": "Name a colour and a shape."},
                        {"from": "gpt", "value": answer},
                        {"from": "human", "value": "Another one?"},
                        {"from": "gpt", "value": "A blue circle."},
                    ],
                }
            )
        else:  # long multi-turn: truncated at a small data.max_text_tokens
            records.append(
                {
                    "id": record["id"],
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": question},
                        {"from": "gpt", "value": LONG_ANSWER},
                        {"from": "human", "value": "And in short?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return records


def write_llava_set(
    synth_dir: Path,
    out_dir: Path,
    *,
    num_records: int | None = None,
    truncated: int = 0,
    name: str = "train.json",
    source: str = "train.json",
) -> list[dict]:
    """LLaVA-shaped records (`llava_records`) in `out_dir/name`, their images as JPEGs under
    `out_dir/coco/train2017/` and the synthetic tokenizer in `out_dir/tokenizer`; the first
    `truncated` image records point at JPEGs cut short. Returns the records."""
    synth_records = json.loads((synth_dir / source).read_text())[:num_records]
    records = llava_records(synth_records)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer").exists():
        shutil.copytree(synth_dir / "tokenizer", out_dir / "tokenizer")
    cut = 0
    for synth, record in zip(synth_records, records, strict=True):
        if "image" not in record:
            continue
        target = out_dir / record["image"]
        if cut < truncated:
            truncated_jpeg(synth_dir / synth["image"], target)
            cut += 1
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(synth_dir / synth["image"]) as image:
                image.convert("RGB").save(target, "JPEG", quality=90)
    (out_dir / name).write_text(json.dumps(records, indent=1))
    return records


# --- the published mix's shape: llava_v1_5_mix665k.json -------------------------------------------

VQA_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer instruction
REF_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
REGION_PROMPT = "Please provide a short description for this region: "
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
# Block kinds and their weights, roughly the published mix's shares (coco 55%, gqa 11%, ocr_vqa 12%,
# textvqa 3%, text-only 6%, with RefCOCO and LLaVA-Instruct's long answers inside the coco part).
LLAVA665K_KINDS = {"coco_vqa": 6, "gqa": 2, "ocr_vqa": 2, "refcoco": 2, "textcaps": 1, "detail": 1, "sharegpt": 2}


def _scene_questions(synth: dict) -> list[tuple[str, str]]:
    """Short-answer questions a VQAv2/GQA annotator could ask about a synthetic scene, with answers."""
    objects = synth["objects"]
    shapes = Counter(obj["shape"] for obj in objects)
    colours = Counter(obj["colour"] for obj in objects)
    pairs = [("How many shapes are there?", str(len(objects)))]
    for shape in sorted(shapes):
        pairs.append((f"How many {shape}s are there?", str(shapes[shape])))
    for obj in objects:
        if shapes[obj["shape"]] == 1:
            pairs.append((f"What colour is the {obj['shape']}?", obj["colour"]))
        if colours[obj["colour"]] == 1:
            pairs.append((f"What shape is the {obj['colour']} object?", obj["shape"]))
    first = objects[0]
    pairs.append((f"Is there a {first['colour']} {first['shape']}?", "Yes"))
    absent = next(c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c not in colours)
    pairs.append((f"Is there a {absent} {first['shape']}?", "No"))
    return pairs


def _box(box: list[int], image_size: int) -> str:
    """A pixel box as LLaVA writes RefCOCO boxes: fractions of the image side, 2 decimals."""
    return "[" + ", ".join(str(round(value / image_size, 2)) for value in box) + "]"


def _image_name(kind: str, synth: dict) -> str:
    number = int(synth["id"].rsplit("-", 1)[1])
    if kind in ("coco_vqa", "refcoco", "detail"):
        return f"coco/train2017/{581000 + number:012d}.jpg"
    if kind == "gqa":
        return f"gqa/images/{2380000 + number}.jpg"
    if kind == "ocr_vqa":
        return f"ocr_vqa/images/{1565900000 + 37 * number}.jpg"
    return f"textvqa/train_images/{hashlib.sha256(synth['id'].encode()).hexdigest()[:16]}.jpg"


def _turns(pairs: list[tuple[str, str]], image: str | None = "first") -> list[dict]:
    """Conversation turns; `<image>` opens (`first`) or ends (`last`) the first question, or is absent."""
    turns = []
    for position, (question, answer) in enumerate(pairs):
        if position == 0 and image is not None:
            question = f"{question}\n<image>" if image == "last" else f"<image>\n{question}"
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _image_block(kind: str, synth: dict, rng: random.Random, image_size: int) -> list[list[tuple[str, str]]]:
    """The conversations (question/answer pairs) of one image's block of records."""
    if kind in ("coco_vqa", "gqa"):  # several records in a row on one image, each several questions
        questions = _scene_questions(synth)
        return [
            [(f"{q}\n{VQA_SUFFIX}", a) for q, a in rng.sample(questions, min(len(questions), rng.randint(2, 4)))]
            for _ in range(rng.randint(1, 3))
        ]
    if kind == "ocr_vqa":  # one record of many turns, as OCR-VQA's book covers
        text, box = synth["text"]["value"], synth["text"]["box"]
        upper = box[1] < image_size // 2
        pairs = [
            ("What does the text say?", text),
            ("Is there text in the image?", "Yes"),
            ("Is the text in the upper half of the image?", "Yes" if upper else "No"),
            ("Is the text in the lower half of the image?", "No" if upper else "Yes"),
            ("How many letters does the text have?", str(len(text))),
            ("What colour is the text?", "black"),
        ]
        return [[(f"{q}\n{VQA_SUFFIX}", a) for q, a in pairs]]
    if kind == "refcoco":  # boxes as answers, and the region-description turns beside them
        kinds = Counter((obj["colour"], obj["shape"]) for obj in synth["objects"])
        unique = [obj for obj in synth["objects"] if kinds[obj["colour"], obj["shape"]] == 1]
        pairs = []
        for obj in unique[:3]:
            phrase = f"the {obj['colour']} {obj['shape']}"
            pairs.append((f"{REF_PROMPT}{phrase}.", _box(obj["box"], image_size)))
            pairs.append((f"{REGION_PROMPT}{_box(obj['box'], image_size)}", phrase))
        return [pairs[:4], pairs[4:]] if len(pairs) > 4 else [pairs]
    if kind == "textcaps":
        caption = synth["conversations"][1]["value"] if synth["task"] == "caption" else None
        caption = caption or f"{len(synth['objects'])} shapes with the text {synth['text']['value']}"
        return [[(CAPTION_PROMPT, caption.capitalize() + ".")]]
    # detail: LLaVA-Instruct's long descriptions, longer than a tiny data.max_text_tokens
    return [[("Describe the image in detail.", LONG_ANSWER.strip()), ("What is the largest shape?", "A square.")]]


def _sharegpt_block(rng: random.Random, serial: int) -> list[dict]:
    """A run of text-only ShareGPT conversations: no `image`, a `model` key, ids like `i6IyJda_0`."""
    records = []
    for part in range(rng.randint(3, 6)):
        colour, shape = rng.choice(["red", "green", "blue"]), rng.choice(["circle", "square", "triangle"])
        turns = [("Name a colour and a shape.", f"A {colour} {shape}."), ("Another one?", "A yellow star.")]
        if part % 3 == 2:
            turns.append(("Write a long paragraph about shapes.", LONG_ANSWER.strip()))
        records.append(
            {
                "id": f"sg{serial:05d}_{part}",
                "model": "",
                "conversations": _turns(turns[: rng.randint(1, len(turns))], None),
            }
        )
    return records


def _fits(kind: str, synth: dict) -> bool:
    if kind in ("ocr_vqa", "textcaps"):
        return synth.get("text") is not None
    if kind == "refcoco":
        counts = Counter((obj["colour"], obj["shape"]) for obj in synth["objects"])
        return any(count == 1 for count in counts.values())
    return True


def llava665k_records(
    synth_records: list[dict], num_records: int, seed: int, image_size: int, *, shared_ids: bool = True
) -> tuple[list[dict], dict[str, str]]:
    """`num_records` records shaped like `llava_v1_5_mix665k.json` from synthetic scenes, and each image
    name's synthetic image: blocks in a seeded order of COCO/GQA-style VQA (1-3 records in a row on
    one image, 2-4 questions each, LLaVA's short-answer suffix), OCR-VQA (one record of six turns),
    RefCOCO (boxes as `[x0, y0, x1, y1]` fractions with 2 decimals, and region descriptions; half of
    them on a COCO image an earlier block used), TextCaps-style captions, LLaVA-Instruct-style long
    descriptions (over a tiny `data.max_text_tokens`) and runs of 3-6 text-only ShareGPT records (no
    `image`, a `model` key). No `task` field, as published. With `shared_ids`, the records of one image
    share an id, as published; without, every record has its own (what `cosctl eval` needs)."""
    rng = random.Random(f"llava665k:{seed}")
    kinds = [kind for kind, weight in LLAVA665K_KINDS.items() for _ in range(weight)]
    records: list[dict] = []
    images: dict[str, str] = {}
    coco_used: list[dict] = []
    cursor = 0
    first = list(LLAVA665K_KINDS)  # every kind once, in a seeded order, then drawn by weight
    rng.shuffle(first)
    while len(records) < num_records:
        kind = first.pop() if first else rng.choice(kinds)
        if kind == "sharegpt":
            block = [{**record, "_kind": kind} for record in _sharegpt_block(rng, len(records))]
        else:
            if kind == "refcoco" and coco_used and rng.random() < 0.5:
                synth = rng.choice(coco_used)
            else:
                synth = None
            if synth is None or not _fits(kind, synth):
                for _ in range(len(synth_records)):
                    candidate = synth_records[cursor % len(synth_records)]
                    cursor += 1
                    if _fits(kind, candidate):
                        synth = candidate
                        break
                else:
                    continue
            name = _image_name(kind, synth)
            images[name] = synth["image"]
            if name.startswith("coco/"):
                coco_used.append(synth)
            base = name.rsplit("/", 1)[1].removesuffix(".jpg")
            block = [
                {
                    "id": base,
                    "image": name,
                    "conversations": _turns(pairs, "last" if kind == "gqa" else "first"),
                    "_kind": kind,
                }
                for pairs in _image_block(kind, synth, rng, image_size)
            ]
        records.extend(block)
    records = records[:num_records]
    for number, record in enumerate(records):
        record.pop("_kind")
        if not shared_ids:
            record["id"] = f"{record['id']}-{number}"
    return records, images


def write_llava665k_set(
    out_dir: Path,
    synth_dir: Path,
    num_records: int = 200,
    seed: int = 0,
    *,
    name: str = "train.json",
    source: str = "train.json",
    shared_ids: bool = True,
) -> Path:
    """`llava665k_records` from the synthetic split `synth_dir/source`, written to `out_dir/name`, with
    each image a JPEG re-encoded by PIL under its published-style path (`coco/train2017/...`,
    `gqa/images/...`, `ocr_vqa/images/...`, `textvqa/train_images/...`) and the synthetic tokenizer in
    `out_dir/tokenizer`. Deterministic in (the synthetic set, num_records, seed). Returns the JSON path."""
    synth_records = json.loads((synth_dir / source).read_text())
    image_size = json.loads((synth_dir / "synth.json").read_text())["image_size"]
    records, images = llava665k_records(synth_records, num_records, seed, image_size, shared_ids=shared_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "tokenizer").exists():
        shutil.copytree(synth_dir / "tokenizer", out_dir / "tokenizer")
    for image_name, synth_image in sorted(images.items()):
        target = out_dir / image_name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(synth_dir / synth_image) as image:
                image.convert("RGB").save(target, "JPEG", quality=90)
    path = out_dir / name
    path.write_text(json.dumps(records, indent=1))
    return path
