"""The `data:` section of a run spec: where the records and images are, in which format (LLaVA JSON or
webdataset tar shards, whose brace patterns `expand_braces` expands as webdataset and bash do), and how
they are tokenised and checked."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .sections import Section

DEFAULT_CAPTION_PROMPT = "<image>\nDescribe the image briefly."
MAX_SHARDS = 1_000_000
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """A shard pattern expanded as webdataset and bash do: `{00000..00009}` is a numeric range (zero-
    padded to its bounds' width), `{a,b}` alternatives, several braces combine left to right. Raises
    ValueError for what it cannot expand (a reversed range, nested or unclosed braces)."""
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"{pattern!r}: unbalanced or nested braces")
        return [pattern]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        low, high = bounds.groups()
        if int(high) < int(low):
            raise ValueError(f"{pattern!r}: the range {{{body}}} runs backwards")
        if int(high) - int(low) >= MAX_SHARDS:
            raise ValueError(f"{pattern!r}: more than {MAX_SHARDS} shards")
        width = max(len(low), len(high)) if low.startswith("0") or high.startswith("0") else 0
        choices = [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"{pattern!r}: {{{body}}} is neither a range {{A..B}} nor alternatives {{a,b}}")
    head, tail = pattern[: match.start()], expand_braces(pattern[match.end() :])
    return [f"{head}{choice}{rest}" for choice in choices for rest in tail]


class DataSpec(Section):
    """Where the records and images are. `format: llava` reads a JSON list of conversations plus one file
    (or object) per image; `format: webdataset` reads img2dataset/webdataset tar shards (`KEY.jpg` with
    `KEY.txt` and/or `KEY.json`) and keeps, per image, where it lies in its shard (docs/design.md §5)."""

    root: str = Field(description="Folder or s3://BUCKET/PREFIX holding the JSON files and the images they name.")
    format: Literal["llava", "webdataset"] = Field(
        "llava",
        description="Training records: llava (data.train, a JSON list, images as files under root) or "
        "webdataset (data.shards, tar shards holding the images and their captions or conversations).",
    )
    train: str = Field("train.json", description="LLaVA-format training records, relative to root.")
    shards: str | tuple[str, ...] | None = Field(
        None,
        description="data.format webdataset: the training shards, a brace pattern such as "
        "shards/{00000..00099}.tar or a list of them; relative to root, or absolute paths or s3:// URIs.",
    )
    caption_prompt: str = Field(
        DEFAULT_CAPTION_PROMPT,
        description="data.format webdataset: the human turn of a sample captioned by its .txt (the "
        "caption is the answer); <image> marks where the image goes. A .json with conversations wins.",
    )
    eval: str | None = Field(
        None, description="Held-out records for the periodic eval loss: LLaVA JSON under root, whatever format is."
    )
    max_text_tokens: int = Field(
        256,
        gt=0,
        description="Longer records are cut to this many text tokens (visual tokens are never cut); "
        "a record whose answers would all be cut counts as bad.",
    )
    max_bad_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Stop when more records are bad: at preparation, plus images that fail "
        "to decode during training (those samples train nothing).",
    )
    num_workers: int = Field(0, ge=0, description="Image-loading (and data-preparing) worker processes per rank.")
    prepared: str | None = Field(
        None,
        description="Where prepared token stores go (a folder or s3:// URI); default <root>/prepared. A "
        "store is reused while the data file, tokenizer and data settings are unchanged.",
    )
    cache_dir: str | None = Field(
        None,
        description="Local cache for data from s3:// (prepared stores, JSON, images); default "
        "$COSCTL_CACHE or ~/.cache/cosctl.",
    )
    image_cache_mb: int = Field(2048, ge=0, description="Bound on the local cache of images read from s3:// (MiB).")
    image_check: Literal["decode", "exists", "none"] = Field(
        "decode",
        description="What preparation checks of each image: that every pixel decodes, that it exists, "
        "or nothing (images that fail later are skipped and counted then).",
    )

    @field_validator("root", "prepared")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" in value and not value.startswith(("file://", "s3://")):
            raise ValueError(f"unsupported URI scheme in {value!r}; use a path, file:// or s3://")
        return value

    @field_validator("shards")
    @classmethod
    def _shard_patterns(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        for pattern in (value,) if isinstance(value, str) else value or ():
            if not pattern or "#" in pattern:
                raise ValueError(f"{pattern!r}: a shard is a non-empty path or URI without '#'")
            if "://" in pattern and not pattern.startswith(("file://", "s3://")):
                raise ValueError(f"unsupported URI scheme in {pattern!r}; use a path, file:// or s3://")
            expand_braces(pattern)
        if value is not None and not value:
            raise ValueError("an empty list of shards")
        return value

    @field_validator("caption_prompt")
    @classmethod
    def _one_image(cls, value: str) -> str:
        if value.count("<image>") != 1 or not value.replace("<image>", "").strip():
            raise ValueError(f"{value!r}: a prompt with exactly one <image> and some text")
        return value

    @model_validator(mode="after")
    def _format_settings(self) -> DataSpec:
        if self.format == "webdataset":
            if self.shards is None:
                raise ValueError("shards: required with format: webdataset (e.g. shards/{00000..00099}.tar)")
            if self.train != "train.json":
                raise ValueError("train: LLaVA JSON only; with format: webdataset the training records are shards")
        else:
            if self.shards is not None:
                raise ValueError("shards: only read with format: webdataset")
            if self.caption_prompt != DEFAULT_CAPTION_PROMPT:
                raise ValueError("caption_prompt: only used with format: webdataset")
        return self

    def shard_names(self) -> list[str]:
        """Every training shard, patterns expanded in order (as written: relative to root, or absolute)."""
        patterns = (self.shards,) if isinstance(self.shards, str) else self.shards or ()
        return [name for pattern in patterns for name in expand_braces(pattern)]
