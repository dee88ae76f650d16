"""Data sets shaped like users' LLaVA files, built from the synthetic set's images and tokenizer.

LLaVA-1.5's `llava_v1_5_mix665k.json` mixes image conversations (one `<image>` in the first human
turn, at its start or its end, often several turns) with text-only ShareGPT conversations (no
`image` key, a `model` key). `write_llava_set` writes such a file next to copies of the images,
with JPEGs re-encoded by PIL and, optionally, one JPEG cut short (it passes `Image.verify()` but does
not decode).
"""

from __future__ import annotations

import json
import shutil
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
