"""`check_paths`: the local files a valid spec names (data, tokenizer, model folders and their
config.json), which `cosctl validate` and every training command's pre-flight run. Reads no weights and
imports no torch. Every problem is one `key: what is wrong` line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from .data import DataSpec
from .model import PretrainModelSpec, layout_problems
from .subconfigs import KNOWN_FIELDS, VISION_MODEL_TYPE, field_problems, fields_for, resolve, shape_problems

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def check_paths(spec) -> list[str]:
    """What is missing among the local files a valid spec names, as `key: problem` lines (empty when
    nothing is): the data root and its train/eval JSON files (an `s3://` root only for its syntax), the
    tokenizer folder, and the model folders with their config.json, whose shapes are then checked with
    the spec's overrides as `cosctl validate` checks a random-init spec. Reads no weights, imports no
    torch: the pre-flight of `cosctl validate`, for training commands to run before launching ranks."""
    problems: list[str] = []
    if getattr(spec, "data", None) is not None:  # the training stages
        problems += _data_problems(spec.data)
    if isinstance(getattr(spec, "model", None), PretrainModelSpec):  # the model section with local folders
        problems += _model_folder_problems(spec.model)
    return problems


def _data_problems(data: DataSpec) -> list[str]:
    root = data.root
    if root.startswith("s3://"):
        bucket = root[len("s3://") :].split("/", 1)[0]
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            return [
                f"data.root: {root!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                "dots and hyphens)"
            ]
        return []
    if "://" in root and not root.startswith("file://"):
        return [f"data.root: unsupported URI scheme in {root!r}; use a path, file:// or s3://"]
    folder = Path(root.removeprefix("file://"))
    if not folder.is_dir():
        return [f"data.root: {root} {'is not a folder' if folder.exists() else 'does not exist'}"]
    files = (("eval", data.eval),) if data.format == "webdataset" else (("train", data.train), ("eval", data.eval))
    return [
        f"data.{key}: {folder / name} {'is not a file' if (folder / name).exists() else 'does not exist'}"
        for key, name in files
        if name is not None and not (folder / name).is_file()
    ] + _missing_shards(data, folder)


def _missing_shards(data: DataSpec, root: Path) -> list[str]:
    """The first local shards of data.format webdataset that are not files (shards in a bucket are
    looked up when the data is prepared)."""
    paths = [
        Path(name.removeprefix("file://")) if name.startswith(("/", "file://")) else root / name
        for name in (data.shard_names() if data.format == "webdataset" else [])
        if not name.startswith("s3://")
    ]
    missing = [path for path in paths if not path.is_file()]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return [f"data.shards: {missing[0]} does not exist{more}"] if missing else []


def _model_folder_problems(model: PretrainModelSpec) -> list[str]:
    tokenizer = Path(model.tokenizer)
    if not tokenizer.is_dir():
        state = "is not a folder" if tokenizer.exists() else "does not exist"
        found = [f"model.tokenizer: {model.tokenizer} {state} (a local tokenizer folder)"]
    else:
        found = []
    problems: list[str] = []
    folders: dict[str, dict] = {}
    for name, component in (("vision", model.vision), ("text", model.text)):
        if component.path is None:
            continue
        config_file = Path(component.path) / "config.json"
        if not config_file.is_file():
            problems.append(f"model.{name}.path: {component.path} is not a local model folder with a config.json")
            continue
        try:
            folders[name] = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"model.{name}.path: cannot read {config_file}: {err}")
            continue
        if not isinstance(folders[name], dict):
            problems.append(f"model.{name}.path: {config_file} is not a JSON object")
            del folders[name]
    if folders and not problems:
        problems += _folder_shape_problems(model, folders)
    return found + problems


def _folder_shape_problems(model: PretrainModelSpec, folders: dict[str, dict]) -> list[str]:
    """The shapes of components built from a folder's config.json plus the spec's overrides."""
    problems = []
    vision_fields = KNOWN_FIELDS[VISION_MODEL_TYPE]
    if "vision" in folders:
        stored = folders["vision"]
        if stored.get("model_type") == "clip":  # a whole CLIP model's config: the tower's part
            stored = stored.get("vision_config") or {}
        vision = resolve(
            {**{k: v for k, v in stored.items() if k in vision_fields}, **model.vision.config}, vision_fields
        )
        where = f"{model.vision.path}/config.json"
        found = shape_problems(vision, vision_fields, "vision.config") or layout_problems(model, vision)
        problems += [_blame(line, model.vision.config, where, "vision") for line in found]
    if "text" in folders:
        model_type = model.text.config.get("model_type", folders["text"].get("model_type"))
        text_fields = fields_for(model_type) if isinstance(model_type, str) else None
        where = f"{model.text.path}/config.json"
        if text_fields is None:
            return problems + [f"model.text.path: {where}: unknown model_type {model_type!r}"]
        overrides = {k: v for k, v in model.text.config.items() if k != "model_type"}
        problems += [f"model.{line}" for line in field_problems(overrides, text_fields, "text.config")]
        if not problems:
            text = resolve({**folders["text"], **overrides}, text_fields)
            problems += [
                _blame(line, model.text.config, where, "text")
                for line in shape_problems(text, text_fields, "text.config")
            ]
    return problems


def _blame(line: str, overrides: Mapping, config_file: str, name: str) -> str:
    """A shape problem found in `{name}.config.<field>: ...` named after the spec key when the spec sets
    that field, else after the folder's config.json."""
    key, _, message = line.partition(": ")
    field = key.rsplit(".", 1)[-1]
    if not key.startswith(f"{name}.config.") or field in overrides:
        return f"model.{line}"
    return f"model.{name}.path: {config_file}: {field}: {message}"
