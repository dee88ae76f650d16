"""The model's Python source as transformers "remote code": the files an exported or published model
folder ships so that `Auto*.from_pretrained(folder, trust_remote_code=True)` (and peft on top) needs
neither `cos_model` nor `cosctl`.

`write_loadable_files(folder, tokenizer)` turns a saved model folder (config.json, weights, tokenizer)
into one transformers alone loads:

    <module>.py             the cos_model modules the config, model and processor import
    config.json             + `auto_map` (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                            AutoProcessor)
    processor_config.json   CosProcessor (+ its `auto_map`): visual tokens per image, image size, CLIP mean/std
    chat_template.jinja     the training chat template
    generation_config.json  the tokenizer's bos/eos/pad ids

transformers copies a remote-code module and, recursively, the files it names with `from .x import`
into one flat package (`dynamic_module_utils.get_relative_import_files`). So `module_sources` starts
from the modules that define the auto classes, follows their imports inside the package, and returns
exactly those files: modules nobody imports (inflation, `__main__`, `__init__`) stay out. Absolute
imports of the package itself (`from cos_model.x import y`) are rewritten as `from .x import y`; any
other import of the package (`import cos_model`, `from . import x`, subpackages) cannot be expressed
in a flat folder and is refused, naming the file and line.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path


class RemoteCodeError(ValueError):
    """A module of the package cannot be shipped as transformers remote code."""


def _package_imports(path: Path, package: str) -> tuple[list[str], list[int]]:
    """(modules of `package` that `path` imports, lines of absolute `from package.x import` to rewrite)."""
    found, absolute_lines = [], []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
            raise RemoteCodeError(f"{where}: `import {package}...` cannot be shipped; use `from .module import name`")
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] == package:
            module = module[len(package) + 1 :]
            absolute_lines.append(node.lineno)
        elif node.level == 0:
            continue
        elif node.level > 1:
            raise RemoteCodeError(f"{where}: imports from a parent package cannot be shipped")
        if not module or "." in module:
            raise RemoteCodeError(f"{where}: only `from .module import name` imports can be shipped")
        found.append(module)
    return found, absolute_lines


def _rewritten(path: Path, package: str, lines: list[int]) -> str:
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for lineno in lines:
        text[lineno - 1] = re.sub(rf"\bfrom\s+{package}\.", "from .", text[lineno - 1], count=1)
    return "".join(text)


def module_sources(package_dir: Path, roots: list[str]) -> dict[str, str]:
    """{file name: source} of the modules `roots` of the package in `package_dir` and every module of
    the package they import, directly or not."""
    package_dir = Path(package_dir)
    package = package_dir.name
    sources: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        path = package_dir / f"{name}.py"
        if f"{name}.py" in sources:
            continue
        if not path.is_file():
            raise RemoteCodeError(f"{package_dir}: no module {name}.py")
        imported, absolute_lines = _package_imports(path, package)
        sources[path.name] = _rewritten(path, package, absolute_lines)
        pending += imported
    return sources


def write_sources(sources: dict[str, str], out_dir: Path) -> list[str]:
    for name, text in sources.items():
        (Path(out_dir) / name).write_text(text, encoding="utf-8")
    return sorted(sources)


def class_reference(cls: type) -> str:
    """`module.Class` as `auto_map` names a class of a remote-code folder."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def auto_classes() -> dict[str, type]:
    """The transformers auto class -> the cos_model class it loads from a shipped folder."""
    from cos_model import CosConfig, CosForConditionalGeneration
    from cos_model.processing import CosImageProcessor, CosProcessor

    return {
        "AutoConfig": CosConfig,
        "AutoModel": CosForConditionalGeneration,
        "AutoModelForCausalLM": CosForConditionalGeneration,
        "AutoModelForImageTextToText": CosForConditionalGeneration,
        "AutoProcessor": CosProcessor,
        "AutoImageProcessor": CosImageProcessor,
    }


def write_loadable_files(folder: Path, tokenizer) -> list[str]:
    """Make the saved model folder `folder` loadable by transformers alone (see the module docstring);
    returns the code files written."""
    import cos_model
    from cos_model import CosConfig

    folder = Path(folder)
    classes = auto_classes()
    roots = sorted({cls.__module__.rsplit(".", 1)[-1] for cls in classes.values()})
    files = write_sources(module_sources(Path(cos_model.__file__).parent, roots), folder)
    auto_map = {name: class_reference(cls) for name, cls in classes.items() if name != "AutoImageProcessor"}
    _update_json(folder / "config.json", lambda config: config.update(auto_map=auto_map))
    _write_processor(folder, CosConfig.from_pretrained(folder), tokenizer, classes)
    _write_generation_config(folder, tokenizer)
    return files


def _write_processor(folder: Path, config, tokenizer, classes: dict[str, type]) -> None:
    from transformers.utils import PROCESSOR_NAME

    image_processor = classes["AutoImageProcessor"](image_size=config.image_size)
    processor = classes["AutoProcessor"](image_processor, tokenizer, num_visual_tokens=config.num_visual_tokens)
    processor.save_pretrained(folder)

    def add_auto_map(saved: dict) -> None:
        saved["auto_map"] = {"AutoProcessor": class_reference(classes["AutoProcessor"])}
        saved["image_processor"]["auto_map"] = {"AutoImageProcessor": class_reference(classes["AutoImageProcessor"])}

    _update_json(folder / PROCESSOR_NAME, add_auto_map)


def _write_generation_config(folder: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(folder)


def _update_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


__all__ = [
    "RemoteCodeError",
    "auto_classes",
    "class_reference",
    "module_sources",
    "write_loadable_files",
    "write_sources",
]
