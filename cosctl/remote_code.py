"""The model's Python source as transformers "remote code": the files an exported folder ships so that
`Auto*.from_pretrained(folder, trust_remote_code=True)` needs neither `cos_model` nor `cosctl`.

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


__all__ = ["RemoteCodeError", "module_sources", "write_sources"]
