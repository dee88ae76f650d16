"""`CosProcessor`: images and chat text -> model inputs, exactly as training prepares them.

- Images: RGB, bicubic resize to the model's square `image_size`, [0, 1], CLIP mean/std; the same
  operations in the same order as the training loader, so inference sees bit-identical pixels.
- Text: the training chat template (`CHAT_TEMPLATE`, shipped as `chat_template.jinja`):

      <s>USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:

  Each `<image>` placeholder becomes `num_visual_tokens` copies of the image token id, and the text is
  cut after every "ASSISTANT: " before tokenising, so an answer tokenises as it was trained (on its own)
  and as it is generated. Batches are left-padded for generation.

Self-contained (torch, numpy, PIL, transformers): the export ships this file as remote code.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
ANSWER_PREFIX = "ASSISTANT: "

# User turns: images first (each "<image>\n"), then the text. Assistant turns end with eos.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{{- item['text'] -}}{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('only user and assistant turns are supported, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT: ' -}}{%- endif -%}"
)


def image_to_pixels(image: Image.Image, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB, bicubic resize to a square, [0, 1], normalised: float32 (3, image_size, image_size)."""
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(tuple(mean)).view(3, 1, 1)
    std = torch.tensor(tuple(std)).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    with Image.open(image) as opened:  # a path
        opened.load()
        return opened.copy()


class CosImageProcessor(BaseImageProcessor):
    """PIL images (or HWC uint8 arrays, or paths) -> `pixel_values` (N, 3, size, size)."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 224, image_mean=CLIP_MEAN, image_std=CLIP_STD, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if kwargs:
            raise TypeError(f"CosImageProcessor: unexpected arguments {sorted(kwargs)}")
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels = [image_to_pixels(_as_pil(image), self.image_size, self.image_mean, self.image_std) for image in images]
        return BatchFeature({"pixel_values": torch.stack(pixels)}, tensor_type=return_tensors)


def _flatten(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in _flatten(item)]


class CosProcessor(ProcessorMixin):
    """Chain-of-Sight processor: `CosImageProcessor` + the LLM's tokenizer + the chat template."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_visual_tokens: int = 32,
        image_token: str = IMAGE_TOKEN,
    ):
        self.num_visual_tokens = num_visual_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one templated text, bos first, each placeholder still one image token id."""
        pieces = re.split(f"(?<={re.escape(ANSWER_PREFIX)})", text)
        ids = [i for piece in pieces if piece for i in self.tokenizer.encode(piece, add_special_tokens=False)]
        bos = self.tokenizer.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        return_tensors=None,
        padding_side: str = "left",
        add_special_tokens=None,
    ) -> BatchFeature:
        """`text` (one string or a batch, usually `apply_chat_template` output) and the images of its
        placeholders, in order -> `input_ids` (each placeholder expanded), `attention_mask` (padded on
        `padding_side`), `pixel_values`. bos comes from the template (or is added when missing), so
        `add_special_tokens` is ignored."""
        if videos is not None or audio is not None:
            raise ValueError("CosProcessor: the model takes images and text only")
        if text is None:
            raise ValueError("CosProcessor: `text` is required (see `apply_chat_template`)")
        rows = [self.tokenize(t) for t in ([text] if isinstance(text, str) else text)]
        images = _flatten(images)
        image_id = self.image_token_id
        num_placeholders = sum(row.count(image_id) for row in rows)
        if num_placeholders != len(images):
            raise ValueError(
                f"CosProcessor: the text has {num_placeholders} {self.image_token} placeholders "
                f"but {len(images)} images were given"
            )
        rows = [[i for t in row for i in ([t] * self.num_visual_tokens if t == image_id else [t])] for row in rows]
        data = _pad(rows, self.tokenizer.pad_token_id, padding_side)
        if images:
            data["pixel_values"] = self.image_processor(images)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> dict[str, list[list[int]]]:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side: 'left' or 'right', got {side!r}")
    width = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        fill = width - len(row)
        ids.append([pad_id] * fill + row if side == "left" else row + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
    return {"input_ids": ids, "attention_mask": mask}


__all__ = ["CHAT_TEMPLATE", "CLIP_MEAN", "CLIP_STD", "CosImageProcessor", "CosProcessor", "image_to_pixels"]
