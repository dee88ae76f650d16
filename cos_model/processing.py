"""`CosProcessor`: images and chat text -> model inputs, exactly as training prepares them.

- Images: RGB, bicubic resize to the model's square `image_size`, [0, 1], CLIP mean/std; the same
  operations in the same order as the training loader, so inference sees bit-identical pixels.
- Text: the training chat template (`cos_model.chat.CHAT_TEMPLATE`, shipped as `chat_template.jinja`):

      <s>USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:

  A templated string is cut back into the pieces training tokenises one by one (`cos_model.chat`:
  after bos, at each eos, after each turn's " ASSISTANT: ", around each `<image>`), so its ids are
  training's token for token, whatever the tokenizer. Each `<image>` placeholder becomes
  `num_visual_tokens` copies of the image token id. Batches are left-padded for generation.

Self-contained (torch, numpy, PIL, transformers and `chat.py`): the export ships it as remote code.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from .chat import CHAT_TEMPLATE, IMAGE_TOKEN, encode, template_pieces

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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

    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(text token ids, image positions) of each templated text, tokenised as training does."""
        tokenizer = self.tokenizer
        pieces = [template_pieces(t, tokenizer.bos_token, tokenizer.eos_token, self.image_token) for t in texts]
        return [(ids, images) for ids, _, images in encode(tokenizer, pieces)]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of one templated text, bos first, each placeholder one image token id."""
        ((ids, images),) = self._encode([text])
        return _insert(ids, images, [self.image_token_id])

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
        encoded = self._encode([text] if isinstance(text, str) else list(text))
        images = _flatten(images)
        num_placeholders = sum(len(positions) for _, positions in encoded)
        if num_placeholders != len(images):
            raise ValueError(
                f"CosProcessor: the text has {num_placeholders} {self.image_token} placeholders "
                f"but {len(images)} images were given"
            )
        slots = [self.image_token_id] * self.num_visual_tokens
        rows = [_insert(ids, positions, slots) for ids, positions in encoded]
        data = _pad(rows, self.tokenizer.pad_token_id, padding_side)
        if images:
            data["pixel_values"] = self.image_processor(images)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)


def _insert(ids: list[int], positions: list[int], slots: list[int]) -> list[int]:
    """`ids` with `slots` before each of `positions` (ascending)."""
    row: list[int] = []
    start = 0
    for position in positions:
        row += ids[start:position] + slots
        start = position
    return row + ids[start:]


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
