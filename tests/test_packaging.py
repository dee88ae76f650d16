"""Packaging: every third-party module the project imports is a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys

import tomllib

from tests.harness import REPO

FIRST_PARTY = {"cosctl", "cos_model", "tests"}


def imported_top_level_modules() -> set[str]:
    found = set()
    for folder in ("cosctl", "cos_model", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            if "golden" in path.relative_to(REPO).parts:  # files other tools wrote (DeepSpeed's scripts)
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module.split(".")[0])
    bench_scripts = {path.stem for path in (REPO / "bench").glob("*.py")}  # run as scripts: siblings import
    return found - set(sys.stdlib_module_names) - FIRST_PARTY - bench_scripts


def declared_distributions() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_package_is_declared():
    """Each third-party import maps to a distribution named in pyproject's dependencies or extras."""
    owners = metadata.packages_distributions()
    declared = declared_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        distributions = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
