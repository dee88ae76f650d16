"""Deterministic synthetic multitask data: the built-in dataset of the demo and the tests.

`synthesize(out_dir, num_samples, seed)` renders scenes of 2-5 coloured shapes (some of them small) and
usually a short text string in PIL's small default font, with every box known, and writes:

    out_dir/images/{id}.png         RGB, image_size x image_size
    out_dir/train.json, eval.json   LLaVA-format records, one question/answer pair each
    out_dir/tokenizer/              byte-level BPE trained on the set (loads with transformers)
    out_dir/synth.json              seed, sizes and counts per task per split

The task mix follows the paper's pre-training mix: captioning, VQA (colour, shape, count, existence),
OCR-style reading and referring expressions whose answer is the object's box as integer percent of
the image width/height, e.g. `[12, 40, 30, 62]`. Each record also carries its scene (`objects` with
pixel boxes, `text`), so answers can be checked against what was drawn.

Determinism: each sample draws from its own RNG seeded by (seed, index); PNGs carry no metadata and
the BPE trainer breaks ties by token id, so equal arguments give byte-identical files.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TASKS = ("caption", "vqa", "ocr", "refexp")
# Captioning and VQA dominate the paper's mix; text reading and grounding are smaller shares.
TASK_WEIGHTS = (0.3, 0.35, 0.15, 0.2)
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "cream": (245, 240, 228), "light blue": (232, 238, 245)}
SHAPES = ("circle", "square", "triangle")
# Side length as a fraction of the image; "small" shapes are what more visual tokens should resolve.
SIZE_RANGES = {"small": (0.08, 0.12), "medium": (0.16, 0.24), "large": (0.28, 0.36)}
SIZE_WEIGHTS = (0.4, 0.35, 0.25)
MIN_SIDE_PX = 5
# No 0/O or 1/I: the answer must be readable from the pixels.
TEXT_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
TEXT_PROBABILITY = 0.85
TEXT_COLOUR = (25, 25, 25)
NUM_PLACEMENT_TRIES = 60
GAP_PX = 2
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
TOKENIZER_VOCAB_SIZE = 768

Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels; right/bottom exclusive


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: Box


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    text: str | None
    text_box: Box | None
    text_origin: tuple[int, int] | None


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


def size_name(side_px: int, image_size: int) -> str:
    """'small', 'medium' or 'large' for a shape of this side length (thresholds between the ranges)."""
    fraction = side_px / image_size
    return "small" if fraction < 0.14 else "large" if fraction >= 0.26 else "medium"


def _overlaps(box: Box, others: list[Box]) -> bool:
    return any(
        box[0] < other[2] + GAP_PX
        and other[0] < box[2] + GAP_PX
        and box[1] < other[3] + GAP_PX
        and other[1] < box[3] + GAP_PX
        for other in others
    )


def _place(rng: random.Random, width: int, height: int, image_size: int, taken: list[Box]) -> Box | None:
    if width > image_size or height > image_size:
        return None
    for _ in range(NUM_PLACEMENT_TRIES):
        left, top = rng.randint(0, image_size - width), rng.randint(0, image_size - height)
        box = (left, top, left + width, top + height)
        if not _overlaps(box, taken):
            return box
    return None


def compose_scene(rng: random.Random, image_size: int) -> Scene:
    """Draw a scene description: non-overlapping shapes, then maybe a text string in free space."""
    taken: list[Box] = []
    objects = []
    for _ in range(rng.randint(2, 5)):
        low, high = SIZE_RANGES[rng.choices(list(SIZE_RANGES), SIZE_WEIGHTS)[0]]
        side = max(MIN_SIDE_PX, round(image_size * rng.uniform(low, high)))
        box = _place(rng, side, side, image_size, taken)
        # A crowded scene shrinks the shape rather than dropping it, so every scene keeps >= 2 shapes.
        while box is None and side > MIN_SIDE_PX:
            side = max(MIN_SIDE_PX, side // 2)
            box = _place(rng, side, side, image_size, taken)
        if box is None:
            continue
        taken.append(box)
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(PALETTE)), box))
    text = text_box = text_origin = None
    if rng.random() < TEXT_PROBABILITY:
        candidate = "".join(rng.choices(TEXT_ALPHABET, k=rng.randint(2, 4)))
        left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), candidate, font=_font())
        placed = _place(rng, right - left, bottom - top, image_size, taken)
        if placed is not None:
            text, text_box, text_origin = candidate, placed, (placed[0] - left, placed[1] - top)
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(objects), text, text_box, text_origin)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Rasterise a scene; shapes are not antialiased, so each fills its box with one exact colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = obj.box[0], obj.box[1], obj.box[2] - 1, obj.box[3] - 1
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=colour)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=colour)
    if scene.text is not None:
        draw.text(scene.text_origin, scene.text, fill=TEXT_COLOUR, font=_font())
    return image


def box_to_text(box: Box, image_size: int) -> str:
    """A pixel box as `[left, top, right, bottom]` in integer percent of the image side."""
    return "[" + ", ".join(str(round(100 * value / image_size)) for value in box) + "]"


def _phrase(obj: SceneObject, image_size: int) -> str:
    size = size_name(obj.box[2] - obj.box[0], image_size)
    return " ".join(word for word in ("a", "" if size == "medium" else size, obj.colour, obj.shape) if word)


def _caption_qa(rng: random.Random, scene: Scene, image_size: int) -> tuple[str, str]:
    phrases = [_phrase(obj, image_size) for obj in sorted(scene.objects, key=lambda obj: obj.box[0])]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    caption = f"{listed} on a {scene.background} background"
    if scene.text is not None:
        caption += f', with the text "{scene.text}"'
    return rng.choice(["Describe the image briefly.", "Write a short caption.", "What is in this picture?"]), caption


def _vqa_qa(rng: random.Random, scene: Scene) -> tuple[str, str]:
    shapes = Counter(obj.shape for obj in scene.objects)
    colours = Counter(obj.colour for obj in scene.objects)
    kinds = ["count_shape", "count_all", "exists"]
    kinds += ["colour"] * any(shapes[obj.shape] == 1 for obj in scene.objects)
    kinds += ["shape"] * any(colours[obj.colour] == 1 for obj in scene.objects)
    kind = rng.choice(kinds)
    if kind == "colour":
        target = rng.choice([obj for obj in scene.objects if shapes[obj.shape] == 1])
        return f"What colour is the {target.shape}?", target.colour
    if kind == "shape":
        target = rng.choice([obj for obj in scene.objects if colours[obj.colour] == 1])
        return f"What shape is the {target.colour} object?", target.shape
    if kind == "count_shape":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(shapes[shape])
    if kind == "count_all":
        return "How many shapes are there?", str(len(scene.objects))
    # Half the existence questions ask about a drawn object, so "yes" and "no" are both common.
    if rng.random() < 0.5:
        target = rng.choice(scene.objects)
        shape, colour = target.shape, target.colour
    else:
        shape, colour = rng.choice(SHAPES), rng.choice(list(PALETTE))
    present = any(obj.shape == shape and obj.colour == colour for obj in scene.objects)
    return f"Is there a {colour} {shape}?", "yes" if present else "no"


def _unique_objects(scene: Scene) -> list[SceneObject]:
    kinds = Counter((obj.colour, obj.shape) for obj in scene.objects)
    return [obj for obj in scene.objects if kinds[(obj.colour, obj.shape)] == 1]


def make_qa(rng: random.Random, scene: Scene, image_size: int) -> tuple[str, str, str]:
    """(task, question, answer) for a scene; tasks the scene cannot support fall back to VQA."""
    task = rng.choices(TASKS, TASK_WEIGHTS)[0]
    if task == "caption":
        return (task, *_caption_qa(rng, scene, image_size))
    if task == "ocr" and scene.text is not None:
        question = rng.choice(["What does the text say?", "What is written in the image?", "Read the text."])
        return task, question, scene.text
    unique = _unique_objects(scene)
    if task == "refexp" and unique:
        target = rng.choice(unique)
        question = rng.choice(["Give the box of the {} {}.", "Where is the {} {}? Answer with a box."])
        return task, question.format(target.colour, target.shape), box_to_text(target.box, image_size)
    return ("vqa", *_vqa_qa(rng, scene))


def make_sample(seed: int, index: int, image_size: int) -> tuple[dict, Image.Image]:
    """The record and image of sample `index`; depends only on (seed, index, image_size)."""
    rng = random.Random(f"cosctl-synth:{seed}:{index}")
    scene = compose_scene(rng, image_size)
    task, question, answer = make_qa(rng, scene, image_size)
    sample_id = f"synth-{index:06d}"
    record = {
        "id": sample_id,
        "image": f"images/{sample_id}.png",
        "task": task,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "objects": [{"shape": obj.shape, "colour": obj.colour, "box": list(obj.box)} for obj in scene.objects],
        "text": None if scene.text is None else {"value": scene.text, "box": list(scene.text_box)},
    }
    return record, render_scene(scene, image_size)


def train_tokenizer(texts: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (digits split one by one, so boxes and counts tokenise uniformly), saved for
    `transformers`' `from_pretrained` with bos/eos/pad/unk and `<image>` as special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<image>"],
    )
    wrapped.save_pretrained(out_dir)
    return wrapped


def _template_text(record: dict) -> str:
    # The chat template of cosctl.data.records, minus the special tokens the trainer must not split.
    human, gpt = (turn["value"] for turn in record["conversations"])
    return "USER: " + human.replace("<image>", "") + " ASSISTANT: " + gpt


def _task_counts(records: list[dict]) -> dict[str, int]:
    counts = Counter(record["task"] for record in records)
    return {task: counts[task] for task in TASKS}


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def synthesize(out_dir: Path, num_samples: int, seed: int, image_size: int = 128, eval_fraction: float = 0.1) -> dict:
    """Write the synthetic set to `out_dir` (see the module docstring) and return its metadata.

    The last `round(num_samples * eval_fraction)` samples (at most all but one) form the eval split.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if image_size < 32:
        raise ValueError(f"image_size: must be >= 32 px so shapes and text fit, got {image_size}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: must be in [0, 1), got {eval_fraction}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_samples):
        record, image = make_sample(seed, index, image_size)
        image.save(out_dir / record["image"], format="PNG")
        records.append(record)
    num_eval = min(round(num_samples * eval_fraction), num_samples - 1)  # train is never empty
    splits = {"train": records[: num_samples - num_eval], "eval": records[num_samples - num_eval :]}
    for name, split in splits.items():
        _write_json(out_dir / f"{name}.json", split)
    tokenizer = train_tokenizer([_template_text(record) for record in records], out_dir / "tokenizer")
    metadata = {
        "seed": seed,
        "num_samples": num_samples,
        "image_size": image_size,
        "eval_fraction": eval_fraction,
        "num_train": len(splits["train"]),
        "num_eval": len(splits["eval"]),
        "tokenizer_vocab_size": len(tokenizer),
        "tasks": {name: _task_counts(split) for name, split in splits.items()},
    }
    _write_json(out_dir / "synth.json", metadata)
    return metadata
